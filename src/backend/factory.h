#pragma once
// Choosing the backend, the same way for every command: --device cpu | cuda | auto.
#include <memory>
#include <string>

#include "backend/backend.h"

namespace moescope {

struct BackendOptions {
  int block_size = 16;                  // CUDA: KV cache block in tokens
  double gpu_memory_utilization = 0.9;  // CUDA: share of the GPU's memory the backend may take
  int64_t max_kv_tokens = 0;            // CUDA: KV cache size in tokens (0: what the utilisation leaves)
  bool enforce_eager = false;           // CUDA: no CUDA graphs for decode passes
  std::string kv_cache_dtype = "auto";  // CUDA: auto (float32 with matmul_precision high, else bfloat16) |
                                        // bfloat16 | float32
  std::string matmul_precision = "medium";  // CUDA, PyTorch's names: medium (bf16 activations in the tensor-core
                                            // products of large passes) | high (two bf16 terms, hi + lo)
};

// True when this build has the CUDA backend.
bool cuda_built();

// "cpu" or "cuda" for a --device value: auto is cuda when the build has CUDA and a GPU is present.
// Asking for cuda without one of them throws an Error that says which is missing.
std::string resolve_device(const std::string& device);

// The backend for a resolved device ("cpu" or "cuda").
std::unique_ptr<Backend> make_backend(const std::string& device, std::shared_ptr<const ModelWeights> weights,
                                      const BackendOptions& options = {});

// One line naming the device: the CPU model, or the GPU with its memory.
std::string describe_device(const std::string& device);

// Memory read bandwidth of the device in GB/s (best, median, min over the repeats), measured now.
struct DeviceBandwidth {
  double best_gb_per_s = 0.0, median_gb_per_s = 0.0, min_gb_per_s = 0.0;
  size_t bytes = 0;
  int repeats = 0;
  std::string method;  // how it was measured, for the report
  double copy_best_gb_per_s = 0.0;  // GPU: a device-to-device copy kernel, bytes read + written (0 on the CPU)
};
DeviceBandwidth measure_device_bandwidth(const std::string& device);

// The GPU's bf16 tensor-core rate reached by cuBLAS on a large square product, in TFLOP/s (best,
// median); zeros on the CPU, where no such ceiling is measured.
struct DeviceCompute {
  double best_tflops = 0.0, median_tflops = 0.0;
  std::string method;
};
DeviceCompute measure_device_compute(const std::string& device);

}  // namespace moescope
