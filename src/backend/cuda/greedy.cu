// Greedy sampling on the device: each row's largest logit, so that a greedy pass copies one id per
// sequence to the host instead of its whole row of logits.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_greedy_threads = 256;
constexpr int k_greedy_chunk = 8192;  // logits per block

// A logit and its index as one key whose unsigned order is the logit's, then the lower index first:
// the float's bits mapped to unsigned order above (-0 as +0, which compare equal; NaN above everything,
// as torch.argmax takes it), the index's complement below.
__device__ __forceinline__ unsigned long long greedy_key(float v, int i) {
  const uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
  const uint32_t ordered = isnan(v) ? 0xffffffffu : (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
  return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}

__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(k_full_mask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// grid (ceil(vocab / chunk), rows): each block takes the best key of its chunk into keys[row] (zeroed
// before). logits: [rows, vocab] f32.
__global__ void __launch_bounds__(k_greedy_threads) greedy_kernel(unsigned long long* keys, const float* logits, int vocab) {
  __shared__ unsigned long long scratch[k_greedy_threads / 32];
  wait_for_previous_kernel();
  const float* row = logits + static_cast<int64_t>(blockIdx.y) * vocab;
  const int begin = blockIdx.x * k_greedy_chunk, end = min(vocab, begin + k_greedy_chunk);
  unsigned long long best = 0;
#pragma unroll 8
  for (int i = begin + static_cast<int>(threadIdx.x); i < end; i += k_greedy_threads) {
    const unsigned long long key = greedy_key(__ldcg(row + i), i);
    best = key > best ? key : best;
  }
  best = warp_max_key(best);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = warp_max_key(lane < k_greedy_threads / 32 ? scratch[lane] : 0);
    if (lane == 0) atomicMax(keys + blockIdx.y, best);
  }
}

}  // namespace

void greedy_keys(unsigned long long* keys, const float* logits, int rows, int vocab, cudaStream_t stream) {
  if (rows == 0) return;
  if (vocab <= 0) argument_error("greedy_keys", "vocab must be positive");
  CUDA_CHECK(cudaMemsetAsync(keys, 0, static_cast<size_t>(rows) * sizeof(unsigned long long), stream));
  launch_kernel(greedy_kernel, dim3(ceil_div(vocab, k_greedy_chunk), rows), k_greedy_threads, 0, stream, keys, logits,
                vocab);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
