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

// One token: y[n] = w[n] . RMSNorm(x), each warp norming x itself, as router_small does: the warp dots
// its row with norm_weight * x while summing x's squares from the same loads (sum_squares8 over vectors
// lane + 32 m), then scales the sum by the inverse RMS (warp_inv_rms). No pass over x before the products,
// so the norm adds no round trip to the chain.
__global__ void __launch_bounds__(k_warps_per_block * 32)
    gemv_normed_kernel(float* y, const float* x, const float* norm_weight, float eps, const bf16* w, int n, int k) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * k_warps_per_block + warp;  // one row a warp
  if (row >= n) return;
  const bf16* rows[1] = {w + static_cast<int64_t>(row) * k};
  const float* xs[1] = {x};
  const float4* w4 = reinterpret_cast<const float4*>(norm_weight);
  float sum_sq = 0.0f;
  auto weigh = [&](float4& a, float4& b, int v) {
    sum_sq = sum_squares8(a, b, sum_sq);
    const float4 wa = __ldg(w4 + 2 * v), wb = __ldg(w4 + 2 * v + 1);
    a = make_float4(wa.x * a.x, wa.y * a.y, wa.z * a.z, wa.w * a.w);
    b = make_float4(wb.x * b.x, wb.y * b.y, wb.z * b.z, wb.w * b.w);
  };
  float acc[1][1];
  warp_dot_rows<1, 1, true>(acc, rows, xs, 1, k, NoHook{}, weigh);  // waits for the previous kernel inside
  const float inv = warp_inv_rms(sum_sq, k, eps);
  if (lane == 0) y[row] = acc[0][0] * inv;
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

void gemv_normed(float* y, const float* x, const float* norm_weight, float eps, const bf16* w, int n, int k,
                 cudaStream_t stream) {
  if (n == 0) return;
  if (k % 8 != 0) argument_error("gemv_normed", "k must be a multiple of 8");
  launch_kernel(gemv_normed_kernel, ceil_div(n, k_warps_per_block), k_warps_per_block * 32, 0, stream, y, x,
                norm_weight, eps, w, n, k);
  CUDA_CHECK_LAUNCH();
}

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
