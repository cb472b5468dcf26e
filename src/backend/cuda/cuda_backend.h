#pragma once
// The CUDA backend: weights in bf16 on one GPU (f16/f32 checkpoints are converted at load), f32
// activations and accumulation, a paged bf16 KV cache. It implements Backend, so the Engine runs it
// unchanged. The top-k kernel writes every MoE layer's routes into one device buffer per pass; with a
// RoutingSink, one async copy per pass brings it to pinned host memory and the sink sees begin_pass,
// on_layer for each MoE layer, and end_pass after the pass. With no sink there is no copy.
#include <cstdint>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace moescope::cuda {

struct CudaBackendOptions {
  int block_size = 16;                  // KV cache block, in tokens (vLLM's --block-size)
  double gpu_memory_utilization = 0.9;  // share of the GPU's memory for weights, KV cache and workspace
  int64_t max_kv_tokens = 0;            // KV cache size in tokens (0: all the utilisation leaves)
  int small_batch_max_tokens = 8;       // passes of up to this many tokens take the small-batch path
                                        // (f32 activations, own GEMV kernels); 0 forces the large path
  bool cuda_graphs = true;              // decode passes as CUDA graphs (false: vLLM's --enforce-eager)
  bool kv_cache_f32 = false;            // keys and values cached in f32 (--kv-cache-dtype float32), else bf16
  bool matmul_precision_high = false;   // --matmul-precision high: the activations of tensor-core products
                                        // as two bf16 terms (hi + lo), each product taken over both
};

class CudaBackend final : public Backend {
 public:
  // Uploads the weights; throws Error with the sizes when they or the KV cache do not fit.
  explicit CudaBackend(std::shared_ptr<const ModelWeights> weights, CudaBackendOptions options = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const ModelConfig& config() const override;
  int create_cache() override;
  void free_cache(int cache_id) override;
  void forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) override;
  void forward_greedy(const Batch& batch, RoutingSink* sink, std::vector<int32_t>& tokens) override;

  KvCapacity kv_capacity() const override;  // the paged KV cache
  size_t weight_bytes() const;      // bytes of weights on the device (bf16, norms and biases f32)
  std::string device_description() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moescope::cuda
