#pragma once
// The engine loop: requests wait, join the running batch between passes (a prompt's prefill may share
// a pass with other sequences' decodes), are sampled after each pass and leave when finished.
// One thread owns an Engine; the server will feed it through a queue.
#include <deque>
#include <functional>
#include <memory>
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
};

struct RequestOutput {
  std::string req_id;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> output_ids;
  std::string finish_reason;  // "length" or "stop"
  size_t order = 0;           // arrival order of the request
};

struct EngineOptions {
  int max_num_seqs = 256;              // sequences in one pass at most
  std::vector<int32_t> eos_token_ids;  // a sampled id from this list ends a sequence (not kept)
};

// Wall time of the engine's passes, split by kind, for throughput figures.
struct EngineTiming {
  double prefill_seconds = 0.0, decode_seconds = 0.0;
  int64_t prefill_tokens = 0, decode_tokens = 0, passes = 0;
};

class Engine {
 public:
  Engine(Backend& backend, EngineOptions options, RoutingSink* sink = nullptr);
  void add_request(Request request);
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  // Runs one forward pass; returns the requests that finished in it.
  std::vector<RequestOutput> step();
  // Runs until every queued request has finished; outputs in the order the requests were added.
  // after_step (optional) sees the requests each pass finished and returns false to stop early
  // (the unfinished requests are then left out).
  using StepCallback = std::function<bool(const std::vector<RequestOutput>& finished)>;
  std::vector<RequestOutput> run_to_completion(const StepCallback& after_step = {});
  const EngineTiming& timing() const { return timing_; }

 private:
  struct Sequence {
    Request request;
    std::vector<int32_t> tokens;  // prompt then output
    int32_t num_computed = 0;     // tokens already in the KV cache
    int cache_id = -1;
    Sampler sampler;
    size_t order = 0;             // arrival order
  };
  bool is_eos(const Sequence& seq, int32_t token) const;
  bool at_length_limit(const Sequence& seq) const;

  Backend& backend_;
  EngineOptions options_;
  RoutingSink* sink_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  int64_t next_pass_id_ = 0;
  size_t next_order_ = 0;
  EngineTiming timing_;
};

}  // namespace moescope
