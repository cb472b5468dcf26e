#pragma once
// CPU kernels: f32 compute over weights kept in their file dtype (bf16/f16/f32), widened in the
// inner loops with AVX2/F16C. Every kernel is small and tested against a plain scalar loop.
#include <cstdint>
#include <span>

#include "tensor/tensor.h"

namespace moescope::cpu {

// One product of a batch of products: y[t, n - row_begin] = x[t] . w[n] + bias[n] for rows
// [row_begin, row_end).  x: [num_tokens, K] f32, w: [N, K], y: [num_tokens, row_end - row_begin].
struct MatmulJob {
  float* y;
  const float* x;
  int num_tokens;
  const TensorView* w;
  int64_t row_begin, row_end;
  const TensorView* bias;  // [N] or nullptr
};

// Runs independent products in one parallel region (e.g. q, k and v; every chosen expert's gate and up).
void matmul_jobs(std::span<const MatmulJob> jobs);

// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n]   x: [T, K] f32, w: [N, K], y: [T, N], bias: [N] or empty.
// Parallel over n (OpenMP); each weight row is read once for all T tokens.
void matmul(float* y, const float* x, int num_tokens, const TensorView& w, const TensorView& bias = {});

// Rows [row_begin, row_end) of w only: y[t, n - row_begin]. Lets a caller pick expert slices.
void matmul_rows(float* y, const float* x, int num_tokens, const TensorView& w, int64_t row_begin, int64_t row_end);

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight    x, out: [T, n]; weight: [n]
void rms_norm(float* out, const float* x, int num_tokens, int n, const TensorView& weight, float eps);

// out[i] = silu(gate[i]) * up[i]
void swiglu(float* out, const float* gate, const float* up, int64_t n);

// In-place softmax over n values.
void softmax(float* x, int n);

// dot(x, row r of w) for a single row; the building block of matmul, exposed for tests.
float dot_row(const float* x, const TensorView& w, int64_t r);

// Widens one element of a tensor (for tests and small vectors such as norms and biases).
float element(const TensorView& t, int64_t i);

}  // namespace moescope::cpu
