// Skinny matrix products for passes of a few tokens: bound by reading the weights once.
#include "backend/cuda/gemv.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_warps_per_block = 4;

// Each warp: ROWS consecutive rows of w for all tokens.
// y: [T, ldy] f32; x: [T, K] f32; w: [N, K] bf16.
template <int ROWS, int MAXT>
__global__ void __launch_bounds__(k_warps_per_block * 32)
    gemv_kernel(float* y, int ldy, const float* x, const bf16* w, int num_tokens, int n, int k, bool accumulate) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * k_warps_per_block + warp) * ROWS;
  if (row0 >= n) return;
  const bf16* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = w + static_cast<int64_t>(min(row0 + r, n - 1)) * k;  // past the end: re-read, dropped
  const float* xs[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) xs[t] = x + static_cast<int64_t>(min(t, num_tokens - 1)) * k;
  float acc[MAXT][ROWS];
  warp_dot_rows<ROWS, MAXT, true>(acc, rows, xs, num_tokens, k);  // waits for the previous kernel inside
  if (lane != 0) return;
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (t < num_tokens && row0 + r < n) {
        float* out = y + static_cast<int64_t>(t) * ldy + row0 + r;
        *out = accumulate ? *out + acc[t][r] : acc[t][r];
      }
}

template <int ROWS>
void launch_gemv(float* y, int ldy, const float* x, const bf16* w, int num_tokens, int n, int k, bool accumulate,
                 cudaStream_t stream) {
  const int blocks = ceil_div(n, k_warps_per_block * ROWS);
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    launch_kernel(gemv_kernel<ROWS, MAXT>, blocks, k_warps_per_block * 32, 0, stream, y, ldy, x, w, num_tokens, n, k,
                  accumulate);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void gemv(float* y, int ldy, const float* x, const bf16* w, int num_tokens, int n, int k, bool accumulate,
          cudaStream_t stream) {
  if (num_tokens == 0 || n == 0) return;
  if (num_tokens > k_small_batch_max_tokens) argument_error("gemv", "more tokens than the small-batch path takes");
  if (k % 8 != 0) argument_error("gemv", "k must be a multiple of 8");
  // Enough warps to keep every SM streaming: one row per warp for small matrices (o_proj, q/k/v), four
  // for large ones (the LM head), where fewer, longer warps cost less, and with 4 or more tokens (rows
  // share each activation load: small_rows_per_warp in gemv.cuh).
  if (n >= 32768 || num_tokens >= 4) launch_gemv<4>(y, ldy, x, w, num_tokens, n, k, accumulate, stream);
  else if (n >= 8192) launch_gemv<2>(y, ldy, x, w, num_tokens, n, k, accumulate, stream);
  else launch_gemv<1>(y, ldy, x, w, num_tokens, n, k, accumulate, stream);
}

}  // namespace moescope::cuda
