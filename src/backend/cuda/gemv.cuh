#pragma once
// The small-batch building block: one warp dots ROWS bf16 weight rows with up to MAXT f32 token
// vectors, reading each weight row once, 16 bytes per lane per load, 8 loads in flight per lane.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {

// acc[t][r] = w[r] . x[t] over k elements, summed over the warp (every lane gets the sums).
// w[r]: a row of k bf16 (16-byte aligned, k % 8 == 0); x[t]: k f32 (32-byte aligned); n <= MAXT tokens.
// WAIT: the calling kernel has not yet waited for the previous one (wait_for_previous_kernel): the first
// weight loads are issued, then the warp waits, so that they stream while the previous kernel finishes.
// CLAMPED: x[t] for t >= n points at a real token (the caller clamps), so every step dots all MAXT tokens
// with no branch: each weight vector is unpacked once for all of them and their loads issue together
// (the sums of t < n are the same as with the branch; those of t >= n are left for the caller to drop).
// X_SHARED: x[t] points into shared memory (plain loads, not L1-cached global ones). before(): called
// once by every lane after the first weight loads are issued (after the wait when WAIT), before x is read.
// x_map(a, b, v): called on the two float4 of x[t] at vector v (elements 8 v .. 8 v + 7) before they
// are dotted (gemv_normed: the RMSNorm applied on the fly); the default leaves them.
struct NoHook {
  __device__ void operator()() const {}
};
struct NoMap {
  __device__ void operator()(float4&, float4&, int) const {}
};
template <int ROWS, int MAXT, bool WAIT = false, bool CLAMPED = false, bool X_SHARED = false, class Before = NoHook,
          class XMap = NoMap>
__device__ __forceinline__ void warp_dot_rows(float (&acc)[MAXT][ROWS], const bf16* const (&w)[ROWS],
                                              const float* const (&x)[MAXT], int n, int k, Before before = {},
                                              XMap x_map = {}) {
  constexpr int U = 8 / ROWS;  // vectors per row per lane per step: 8 loads of 16 bytes in flight
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[t][r] = 0.0f;
  const int num_vec = k >> 3;
  for (int base = 0; base < num_vec; base += 32 * U) {
    uint4 wv[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = base + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) wv[u][r] = v < num_vec ? load_stream(w[r] + v * 8) : make_uint4(0, 0, 0, 0);
    }
    if (base == 0) {
      if (WAIT) wait_for_previous_kernel();  // the weights above need nothing from it
      before();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = base + u * 32 + lane;
      if (v < num_vec) {
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
          if (CLAMPED || t < n) {
            const float4* xv = reinterpret_cast<const float4*>(x[t] + v * 8);
            // Activations: L1-cached (every warp of an SM reads the same x), never the read-only path.
            float4 a = X_SHARED ? xv[0] : __ldca(xv), b = X_SHARED ? xv[1] : __ldca(xv + 1);
            x_map(a, b, v);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[t][r] = dot8(wv[u][r], a, b, acc[t][r]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (CLAMPED || t < n) acc[t][r] = warp_sum(acc[t][r]);
}

// acc[j] = w[j] . x[j] over k elements for j < n (n <= J), summed over the warp (every lane gets the sums):
// J rows with vectors of their own, their loads in flight together (16 a lane). Each sum is warp_dot_rows's
// for that row and vector to the bit: every lane adds its vectors lane + 32 m in increasing m, then
// warp_sum. Rows j >= n are neither loaded nor summed (acc[j] = 0).
template <int J>
__device__ __forceinline__ void warp_dot_pairs(float (&acc)[J], const bf16* const (&w)[J], const float* const (&x)[J],
                                               int n, int k) {
  constexpr int U = J >= 16 ? 1 : 16 / J;  // vectors per row per lane per step
  const int lane = threadIdx.x & 31, num_vec = k >> 3;
#pragma unroll
  for (int j = 0; j < J; ++j) acc[j] = 0.0f;
  for (int base = 0; base < num_vec; base += 32 * U) {
    uint4 wv[J][U];
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = base + u * 32 + lane;
        wv[j][u] = j < n && v < num_vec ? load_stream(w[j] + v * 8) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = base + u * 32 + lane;
        if (j < n && v < num_vec) {
          const float4* xv = reinterpret_cast<const float4*>(x[j] + v * 8);
          acc[j] = dot8(wv[j][u], __ldca(xv), __ldca(xv + 1), acc[j]);
        }
      }
  }
#pragma unroll
  for (int j = 0; j < J; ++j)
    if (j < n) acc[j] = warp_sum(acc[j]);
}

// Weight rows a warp takes at once in the small path: with 4 or more tokens, 4 rows share each load of
// the activations (each 16 bytes of weights meet MAXT x 32 bytes of activations from L1, which at 8
// tokens would otherwise bound the kernel by L1, not memory); fewer tokens keep one row (gate and up:
// one column), so that more warps stream.
constexpr int small_rows_per_warp(int max_tokens) { return max_tokens >= 4 ? 4 : 1; }

// Calls f.template operator()<MAXT>() with the smallest MAXT in {1, 2, 4, 8} that holds n tokens, so a
// single-token decode keeps few registers.
template <typename F>
void dispatch_max_tokens(int n, F&& f) {
  if (n <= 1) f.template operator()<1>();
  else if (n <= 2) f.template operator()<2>();
  else if (n <= 4) f.template operator()<4>();
  else f.template operator()<8>();
}

}  // namespace moescope::cuda
