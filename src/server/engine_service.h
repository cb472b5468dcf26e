#pragma once
// The server's engine thread. HTTP threads submit generation requests and read their progress from a
// channel; only the engine thread touches the Engine, the backend and the KV cache. Between passes it
// takes new requests and cancellations from an inbox; after each pass it turns the sampled tokens into
// text deltas (holding back a cut UTF-8 character and the tail a stop string could still claim),
// logprobs and, for requests that ask, the routes of every token the pass computed.
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "routing/routing_sink.h"

namespace moescope::server {

// One token's routes: per MoE layer, the top-k ids and weights.
struct TokenRoutes {
  int32_t token_idx = 0;
  int32_t token_id = 0;
  std::vector<int32_t> topk_ids;    // [moe layers, top_k]
  std::vector<float> topk_weights;  // [moe layers, top_k]
};

// What one pass added to one request.
struct ChoiceDelta {
  std::string text;                       // new text
  std::vector<int32_t> token_ids;         // new token ids
  std::vector<float> logprobs;            // [token_ids] when asked
  std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;  // [token_ids][k]
  std::vector<TokenRoutes> routes;        // tokens whose routes this pass computed, when asked
  std::string finish_reason;              // set on the last delta: "stop", "length", "abort" or "error"
  std::string error;                      // the engine failed this request
};

// The channel of one engine request, between the engine thread and one HTTP thread.
class Channel {
 public:
  // Waits up to `timeout` for deltas; returns those queued (possibly none).
  std::vector<ChoiceDelta> pop(std::chrono::milliseconds timeout);
  void push(ChoiceDelta delta);
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<ChoiceDelta> deltas_;
  std::atomic<bool> cancelled_{false};
};

struct GenerationRequest {
  Request request;                  // req_id, prompt ids, sampling, max_tokens, logprobs
  std::vector<std::string> stop;    // stop strings: the output ends before the first one
  bool return_routed_experts = false;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

// Counters for /metrics, read under the service's lock.
struct ServiceStats {
  int running = 0, waiting = 0;
  int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  int64_t passes = 0, preemptions = 0;
};

class EngineService {
 public:
  // The engine runs on its own thread from construction until the destructor (or stop()).
  EngineService(std::unique_ptr<Backend> backend, const LoadedModel& model, EngineOptions options, RoutingSink* sink);
  ~EngineService();
  EngineService(const EngineService&) = delete;
  EngineService& operator=(const EngineService&) = delete;

  // Queues a request; throws Error (a 400 for the client) when the engine would refuse it.
  std::shared_ptr<Channel> submit(GenerationRequest request);
  void stop();
  ServiceStats stats() const;
  const LoadedModel& model() const { return model_; }
  const RoutingShape& shape() const { return shape_; }

  // Called by the engine thread for every request that finishes (for /metrics).
  std::function<void(const GenerationRequest&, const std::string& reason, int prompt_tokens, int completion_tokens,
                     double first_token_seconds)>
      on_finish;

 private:
  struct Live;  // a request in the engine
  class RouteTap;
  void run();
  void deliver(const std::vector<TokenEvent>& events);
  void finish_live(Live& live, const std::string& reason);

  const LoadedModel& model_;
  RoutingShape shape_;
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<RouteTap> tap_;
  std::unique_ptr<SinkFanout> sinks_;
  std::unique_ptr<Engine> engine_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<GenerationRequest, std::shared_ptr<Channel>>> inbox_;
  bool stopping_ = false;
  ServiceStats stats_;
  std::map<std::string, std::unique_ptr<Live>> live_;  // engine thread only
  std::thread thread_;
};

}  // namespace moescope::server
