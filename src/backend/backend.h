#pragma once
// The device boundary: a Backend runs a forward pass for a Batch and keeps the KV cache. The engine
// decides what runs (scheduling, sampling); the backend is the only code that knows the device.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/weights.h"
#include "routing/routing_sink.h"

namespace moescope {

// One sequence's share of a pass: new tokens at positions start_pos, start_pos + 1, ...
// A prefill has many tokens; a decode has one. Both kinds may share a pass.
struct BatchSequence {
  int cache_id = -1;                // the backend's KV cache for this sequence (create_cache())
  int32_t start_pos = 0;            // positions [0, start_pos) are already in the cache
  std::span<const int32_t> tokens;  // [n_new] token ids
  std::string req_id;               // request id, for routing records
};

struct Batch {
  int64_t forward_pass_id = 0;
  std::vector<BatchSequence> sequences;
  int num_tokens() const;
};

// The routing sink's view of a batch (per-token sequence index and position, mode, lengths).
PassInfo make_pass_info(const Batch& batch);

// The KV cache a backend holds: blocks of block_size tokens, a sequence of n tokens taking ceil(n /
// block_size) of them. blocks == 0: the cache grows on demand (the CPU backend, in host memory).
// element_bytes: one cached key or value element (2: bf16, 4: f32; 0: not said).
struct KvCapacity {
  int64_t blocks = 0;
  int block_size = 0;
  int element_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const ModelConfig& config() const = 0;
  virtual int create_cache() = 0;
  virtual void free_cache(int cache_id) = 0;
  // Runs every layer for the batch. logits: [num_sequences, vocab_size], the last new token of each
  // sequence. When sink is set and wants the pass, it sees begin_pass, every MoE layer's routes in
  // layer order, and end_pass.
  virtual void forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) = 0;
  // forward() for a caller that samples greedily and needs nothing else from the logits: tokens:
  // [num_sequences], each sequence's largest logit's index, the first on ties (as torch.argmax). A backend
  // on a device picks them there and copies only the ids; this default scans forward()'s logits.
  virtual void forward_greedy(const Batch& batch, RoutingSink* sink, std::vector<int32_t>& tokens);
  // The engine budgets its admissions and preemptions within this, so a pass never finds the cache full.
  virtual KvCapacity kv_capacity() const { return {}; }
};

}  // namespace moescope
