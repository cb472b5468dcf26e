#include "backend/factory.h"

#include <fmt/format.h>

#include <fstream>

#include "backend/cpu/bandwidth.h"
#include "backend/cpu/cpu_backend.h"
#include "util/error.h"

#ifdef MOESCOPE_HAS_CUDA
#include "backend/cuda/blas.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#include "backend/cuda/kernels.h"
#endif

namespace moescope {
namespace {

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

}  // namespace

bool cuda_built() {
#ifdef MOESCOPE_HAS_CUDA
  return true;
#else
  return false;
#endif
}

std::string resolve_device(const std::string& device) {
  if (device == "cpu") return "cpu";
  if (device != "cuda" && device != "auto") fail("--device {}: expected cpu, cuda or auto", device);
#ifdef MOESCOPE_HAS_CUDA
  std::string why;
  if (cuda::device_available(&why)) return "cuda";
  if (device == "cuda") fail("--device cuda: no CUDA device available ({}); use --device cpu", why);
  return "cpu";
#else
  if (device == "cuda")
    fail("--device cuda: this build has no CUDA backend (configure with -DMOESCOPE_CUDA=ON where nvcc is installed); "
         "use --device cpu");
  return "cpu";
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, std::shared_ptr<const ModelWeights> weights,
                                      const BackendOptions& options) {
  const std::string resolved = resolve_device(device);
  if (resolved == "cpu") return std::make_unique<cpu::CpuBackend>(std::move(weights));
#ifdef MOESCOPE_HAS_CUDA
  cuda::CudaBackendOptions o;
  o.block_size = options.block_size;
  o.gpu_memory_utilization = options.gpu_memory_utilization;
  o.max_kv_tokens = options.max_kv_tokens;
  o.cuda_graphs = !options.enforce_eager;
  if (options.kv_cache_dtype != "auto" && options.kv_cache_dtype != "bfloat16" && options.kv_cache_dtype != "float32")
    fail("--kv-cache-dtype {}: expected auto, bfloat16 or float32", options.kv_cache_dtype);
  if (options.matmul_precision != "medium" && options.matmul_precision != "high")
    fail("--matmul-precision {}: expected medium or high", options.matmul_precision);
  o.matmul_precision_high = options.matmul_precision == "high";
  o.kv_cache_f32 = options.kv_cache_dtype == "float32" || (options.kv_cache_dtype == "auto" && o.matmul_precision_high);
  return std::make_unique<cuda::CudaBackend>(std::move(weights), o);
#else
  (void)options;
  fail("--device {}: this build has no CUDA backend", device);
#endif
}

std::string describe_device(const std::string& device) {
#ifdef MOESCOPE_HAS_CUDA
  if (resolve_device(device) == "cuda") return cuda::device_description();
#endif
  (void)device;
  return cpu_model_name();
}

DeviceBandwidth measure_device_bandwidth(const std::string& device) {
#ifdef MOESCOPE_HAS_CUDA
  if (resolve_device(device) == "cuda") {
    const cuda::BandwidthSample s = cuda::measure_read_bandwidth();
    const cuda::BandwidthSample copy = cuda::measure_copy_bandwidth();
    return {s.best_gb_per_s, s.median_gb_per_s, s.min_gb_per_s, s.bytes, s.repeats,
            "streaming read kernel (16-byte loads, every SM), timed with CUDA events", copy.best_gb_per_s};
  }
#endif
  (void)device;
  const cpu::BandwidthSample s = cpu::measure_read_bandwidth();
  return {s.best_gb_per_s, s.median_gb_per_s, s.min_gb_per_s, s.bytes, s.repeats, "streaming read, every OpenMP thread", 0.0};
}

DeviceCompute measure_device_compute(const std::string& device) {
#ifdef MOESCOPE_HAS_CUDA
  if (resolve_device(device) == "cuda") {
    const cuda::GemmSample s = cuda::measure_gemm_tflops();
    return {s.best_tflops, s.median_tflops,
            fmt::format("cuBLAS bf16 GEMM {0}x{0}x{0}, f32 output, {1} runs timed with CUDA events", s.n, s.repeats)};
  }
#endif
  (void)device;
  return {};
}

}  // namespace moescope
