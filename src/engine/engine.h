#pragma once
// The engine loop: requests wait, join the running batch between passes (a prompt's prefill may share
// a pass with other sequences' decodes), are sampled after each pass and leave when finished.
// The KV cache is budgeted in blocks (vLLM's paged accounting): a request is admitted when its tokens
// fit in the free blocks; when a growing decode finds none, the most recently admitted sequence is
// preempted (its cache freed, it waits at the head of the queue and is recomputed later; the kernels are
// batch-invariant, so it continues exactly as it would have).
// One thread owns an Engine; the server feeds it through a queue (server/engine_service.h).
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "engine/sampler.h"

namespace moescope {

struct Request {
  std::string req_id;
  std::vector<int32_t> prompt_ids;
  SamplingParams sampling;
  int max_tokens = 16;
  bool ignore_eos = false;
  int logprobs = -1;  // -1: none; k >= 0: the sampled token's logprob and the k most likely alternatives
};

struct RequestOutput {
  std::string req_id;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> output_ids;
  std::string finish_reason;  // "length", "stop" or "abort"
  size_t order = 0;           // arrival order of the request
};

// A token sampled in the last step, for streaming.
struct TokenEvent {
  std::string req_id;
  int32_t token = -1;                                // -1 when the step ended the request without a new token (eos)
  float logprob = 0.0f;                              // of token, from the raw logits (logprobs >= 0)
  std::vector<std::pair<int32_t, float>> top;        // the `logprobs` most likely ids and their logprobs
  std::string finish_reason;                         // empty while running
};

struct EngineOptions {
  int max_num_seqs = 256;              // sequences in one pass at most
  std::vector<int32_t> eos_token_ids;  // a sampled id from this list ends a sequence (not kept)
  int64_t kv_cache_tokens = 0;         // KV budget in tokens (0: what the backend holds, unbounded on the CPU)
  int block_size = 16;                 // KV cache block in tokens (a backend with a fixed cache sets its own)
};

// Wall time of the engine's passes, split by kind, for throughput figures.
struct EngineTiming {
  double prefill_seconds = 0.0, decode_seconds = 0.0;
  int64_t prefill_tokens = 0, decode_tokens = 0, passes = 0, preemptions = 0;
};

class Engine {
 public:
  Engine(Backend& backend, EngineOptions options, RoutingSink* sink = nullptr);
  // Queues a request; throws Error for an empty prompt, an id out of range, max_tokens < 1, or a prompt
  // that can never fit in the KV budget.
  void add_request(Request request);
  // The checks of add_request alone; thread-safe (reads only what construction fixed).
  void check_request(const Request& request) const;
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  // Ends a waiting or running request now (client gone, stop string); returns its output with the
  // given reason, or nothing if no such request.
  std::optional<RequestOutput> finish(const std::string& req_id, const std::string& reason);
  // Runs one forward pass; returns the requests that finished in it. step_tokens() then holds one event
  // per sequence that sampled in the pass.
  std::vector<RequestOutput> step();
  const std::vector<TokenEvent>& step_tokens() const { return events_; }
  // Runs until every queued request has finished; outputs in the order the requests were added.
  // after_step (optional) sees the requests each pass finished and returns false to stop early
  // (the unfinished requests are then left out).
  using StepCallback = std::function<bool(const std::vector<RequestOutput>& finished)>;
  std::vector<RequestOutput> run_to_completion(const StepCallback& after_step = {});
  const EngineTiming& timing() const { return timing_; }
  // The KV budget in blocks (0: unbounded) and the blocks in use.
  int64_t kv_blocks_total() const { return total_blocks_; }
  int block_size() const { return options_.block_size; }
  int64_t kv_blocks_used() const { return used_blocks_; }

 private:
  struct Sequence {
    Request request;
    std::vector<int32_t> tokens;  // prompt then output
    int32_t num_computed = 0;     // tokens already in the KV cache
    int cache_id = -1;            // -1 while waiting
    int64_t blocks = 0;           // KV blocks held
    Sampler sampler;
    size_t order = 0;             // arrival order
  };
  bool is_eos(const Sequence& seq, int32_t token) const;
  bool at_length_limit(const Sequence& seq) const;
  int64_t blocks_for(size_t tokens) const;
  void admit();
  void preempt_for_decodes();
  void release(Sequence& seq);
  RequestOutput output_of(const Sequence& seq, const std::string& reason) const;

  Backend& backend_;
  EngineOptions options_;
  RoutingSink* sink_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  int64_t total_blocks_ = 0, used_blocks_ = 0;
  int64_t next_pass_id_ = 0;
  size_t next_order_ = 0;
  EngineTiming timing_;
  std::vector<TokenEvent> events_;
};

}  // namespace moescope
