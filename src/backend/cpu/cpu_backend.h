#pragma once
// The CPU backend: the reference every faster path is tested against. f32 activations, weights read in
// place from the mapped checkpoint, a per-sequence contiguous KV cache in f32.
#include <memory>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace moescope::cpu {

// One sequence's cache: for each layer, keys and values of every position so far.
struct SequenceCache {
  std::vector<std::vector<float>> k;  // [num_layers][positions * kv_size]
  std::vector<std::vector<float>> v;  // [num_layers][positions * kv_size]
  int32_t length = 0;                 // positions filled
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(std::shared_ptr<const ModelWeights> weights);
  const ModelConfig& config() const override { return weights_->config; }
  int create_cache() override;
  KvCapacity kv_capacity() const override { return {0, 0, 4}; }  // grows on demand, f32
  void free_cache(int cache_id) override;
  void forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) override;

 private:
  std::shared_ptr<const ModelWeights> weights_;
  std::unordered_map<int, SequenceCache> caches_;
  int next_cache_id_ = 0;
  std::vector<float> rope_inv_freq_;  // [head_dim / 2]
};

}  // namespace moescope::cpu
