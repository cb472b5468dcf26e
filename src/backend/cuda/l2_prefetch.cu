// Weights into L2 ahead of the kernel that reads them, while the kernels in between read almost nothing
// from memory (docs/CUDA.md "Speed": a decode step's latency-bound stretch between the q/k/v projection
// and the experts). The copy engine's bulk prefetch (sm_90) is a hint: it moves no data anywhere but
// into L2, returns at once, and changes no result.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_threads = 128;
constexpr uint32_t k_chunk = 16 * 1024;  // bytes per bulk prefetch, each thread one or more

__global__ void __launch_bounds__(k_threads) l2_prefetch_kernel(L2Spans spans, bool evict_last) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t policy;
  if (evict_last) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  else asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  // Chunk i to block i % grid: every SM's copy engine takes a share, however few the chunks.
  const size_t first = (static_cast<size_t>(threadIdx.x) * gridDim.x + blockIdx.x) * k_chunk;
  const size_t stride = static_cast<size_t>(gridDim.x) * k_threads * k_chunk;
#pragma unroll
  for (int s = 0; s < L2Spans::k_max; ++s) {
    const char* base = static_cast<const char*>(spans.ptr[s]);
    const size_t bytes = spans.bytes[s];
    for (size_t at = first; at < bytes; at += stride) {
      const uint32_t n = static_cast<uint32_t>(bytes - at < k_chunk ? bytes - at : k_chunk);
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(base + at), "r"(n), "l"(policy)
                   : "memory");
    }
  }
#else
  (void)spans;
  (void)evict_last;
#endif
  wait_for_previous_kernel();  // the prefetches need nothing from the previous kernel
}

}  // namespace

void l2_prefetch(const L2Spans& spans, bool evict_last, cudaStream_t stream) {
  size_t total = 0;
  for (int s = 0; s < L2Spans::k_max; ++s) {
    const bool aligned = reinterpret_cast<uintptr_t>(spans.ptr[s]) % 16 == 0 && spans.bytes[s] % 16 == 0;
    if (spans.bytes[s] > 0 && (spans.ptr[s] == nullptr || !aligned))
      argument_error("l2_prefetch", "spans must be 16-byte aligned, in multiples of 16 bytes");
    total += spans.bytes[s];
  }
  if (total == 0) return;
  launch_kernel(l2_prefetch_kernel, multiprocessors(), k_threads, 0, stream, spans, evict_last);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
