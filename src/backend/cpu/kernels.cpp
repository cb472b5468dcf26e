#include "backend/cpu/kernels.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace moescope::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Eight bf16/f16/f32 values widened to f32.
inline __m256 load8(const uint16_t* p, DType dtype) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (dtype == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <DType D>
float dot_impl(const float* x, const void* row, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  if constexpr (D == DType::F32) {
    const float* w = static_cast<const float*>(row);
    for (; i + 32 <= k; i += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(w + i + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(w + i + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(w + i + 24), a3);
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; ++i) s += x[i] * w[i];
    return s;
  } else {
    const uint16_t* w = static_cast<const uint16_t*>(row);
    for (; i + 32 <= k; i += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w + i, D), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(w + i + 8, D), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load8(w + i + 16, D), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load8(w + i + 24, D), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w + i, D), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; ++i) s += x[i] * (D == DType::BF16 ? bf16_to_f32(w[i]) : f16_to_f32(w[i]));
    return s;
  }
}

float dot_any(const float* x, const void* row, int64_t k, DType dtype) {
  switch (dtype) {
    case DType::F32: return dot_impl<DType::F32>(x, row, k);
    case DType::BF16: return dot_impl<DType::BF16>(x, row, k);
    case DType::F16: return dot_impl<DType::F16>(x, row, k);
  }
  return 0.0f;
}

// Rows are split into chunks that each thread takes whole, so a weight row is read by one thread once.
void matmul_impl(float* y, const float* x, int num_tokens, const TensorView& w, int64_t row_begin, int64_t row_end,
                 const TensorView& bias) {
  const int64_t k = w.cols(), n_out = row_end - row_begin;
  const size_t row_bytes = static_cast<size_t>(k) * dtype_size(w.dtype);
  const char* base = static_cast<const char*>(w.data);
  const bool many = num_tokens > 1;
  const int64_t work = n_out * k * num_tokens;
  // Small products are not worth waking the thread team for.
  const int threads = work < (1 << 15) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> widened;  // one weight row in f32, reused by every token (prefill)
    if (many && w.dtype != DType::F32) widened.resize(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t n = row_begin; n < row_end; ++n) {
      const void* row = base + static_cast<size_t>(n) * row_bytes;
      const float b = bias.empty() ? 0.0f : element(bias, n);
      if (!many) {
        y[n - row_begin] = dot_any(x, row, k, w.dtype) + b;
        continue;
      }
      const float* row_f32 = static_cast<const float*>(row);
      if (w.dtype != DType::F32) {
        to_f32(w.dtype, row, widened.data(), static_cast<size_t>(k));
        row_f32 = widened.data();
      }
      for (int t = 0; t < num_tokens; ++t)
        y[static_cast<int64_t>(t) * n_out + (n - row_begin)] = dot_impl<DType::F32>(x + static_cast<int64_t>(t) * k, row_f32, k) + b;
    }
  }
}

}  // namespace

float element(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::F32: return static_cast<const float*>(t.data)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
  }
  return 0.0f;
}

float dot_row(const float* x, const TensorView& w, int64_t r) { return dot_any(x, w.row(r), w.cols(), w.dtype); }

void matmul(float* y, const float* x, int num_tokens, const TensorView& w, const TensorView& bias) {
  matmul_impl(y, x, num_tokens, w, 0, w.rows(), bias);
}

void matmul_rows(float* y, const float* x, int num_tokens, const TensorView& w, int64_t row_begin, int64_t row_end) {
  matmul_impl(y, x, num_tokens, w, row_begin, row_end, {});
}

void rms_norm(float* out, const float* x, int num_tokens, int n, const TensorView& weight, float eps) {
  for (int t = 0; t < num_tokens; ++t) {
    const float* xt = x + static_cast<int64_t>(t) * n;
    float* ot = out + static_cast<int64_t>(t) * n;
    float sum_sq = 0.0f;
    for (int i = 0; i < n; ++i) sum_sq += xt[i] * xt[i];
    // HF: hidden * torch.rsqrt(variance + eps), then weight * hidden.
    const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
    for (int i = 0; i < n; ++i) ot[i] = element(weight, i) * (xt[i] * inv);
  }
}

void swiglu(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void softmax(float* x, int n) {
  const float max = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - max));
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

}  // namespace moescope::cpu
