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

// Four rows at once for a single token: x is loaded once for all four, and the eight accumulator
// chains (two per row) keep both FMA pipes busy. rows: the first of four rows, row_bytes apart.
template <DType D>
inline __m256 load_w8(const char* row, int64_t i) {
  if constexpr (D == DType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
  else return load8(reinterpret_cast<const uint16_t*>(row) + i, D);
}

template <DType D>
float scalar_w(const char* row, int64_t i) {
  if constexpr (D == DType::F32) return reinterpret_cast<const float*>(row)[i];
  else if constexpr (D == DType::BF16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
  else return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
}

template <DType D>
void dot4_impl(const float* x, const char* rows, size_t row_bytes, int64_t k, float* out) {
  const char *r0 = rows, *r1 = rows + row_bytes, *r2 = rows + 2 * row_bytes, *r3 = rows + 3 * row_bytes;
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(x0, load_w8<D>(r0, i), a0);
    b0 = _mm256_fmadd_ps(x1, load_w8<D>(r0, i + 8), b0);
    a1 = _mm256_fmadd_ps(x0, load_w8<D>(r1, i), a1);
    b1 = _mm256_fmadd_ps(x1, load_w8<D>(r1, i + 8), b1);
    a2 = _mm256_fmadd_ps(x0, load_w8<D>(r2, i), a2);
    b2 = _mm256_fmadd_ps(x1, load_w8<D>(r2, i + 8), b2);
    a3 = _mm256_fmadd_ps(x0, load_w8<D>(r3, i), a3);
    b3 = _mm256_fmadd_ps(x1, load_w8<D>(r3, i + 8), b3);
  }
  out[0] = hsum(_mm256_add_ps(a0, b0));
  out[1] = hsum(_mm256_add_ps(a1, b1));
  out[2] = hsum(_mm256_add_ps(a2, b2));
  out[3] = hsum(_mm256_add_ps(a3, b3));
  for (; i < k; ++i) {
    out[0] += x[i] * scalar_w<D>(r0, i);
    out[1] += x[i] * scalar_w<D>(r1, i);
    out[2] += x[i] * scalar_w<D>(r2, i);
    out[3] += x[i] * scalar_w<D>(r3, i);
  }
}

void dot4_any(const float* x, const char* rows, size_t row_bytes, int64_t k, DType dtype, float* out) {
  switch (dtype) {
    case DType::F32: return dot4_impl<DType::F32>(x, rows, row_bytes, k, out);
    case DType::BF16: return dot4_impl<DType::BF16>(x, rows, row_bytes, k, out);
    case DType::F16: return dot4_impl<DType::F16>(x, rows, row_bytes, k, out);
  }
}

// Rows [n, n_end) of one job: a decode (one token) streams each row once through dot_any; a pass of
// several tokens widens each row to f32 once and reuses it for every token.
void run_rows(const MatmulJob& job, int64_t n, int64_t n_end, std::vector<float>& widened) {
  const TensorView& w = *job.w;
  const int64_t k = w.cols(), n_out = job.row_end - job.row_begin;
  const size_t row_bytes = static_cast<size_t>(k) * dtype_size(w.dtype);
  const char* base = static_cast<const char*>(w.data);
  auto bias = [&](int64_t r) { return job.bias == nullptr || job.bias->empty() ? 0.0f : element(*job.bias, r); };
  if (job.num_tokens == 1) {  // decode: each row streamed once, four rows at a time
    int64_t r = n;
    for (; r + 4 <= n_end; r += 4) {
      float* y = job.y + (r - job.row_begin);
      dot4_any(job.x, base + static_cast<size_t>(r) * row_bytes, row_bytes, k, w.dtype, y);
      for (int i = 0; i < 4; ++i) y[i] += bias(r + i);
    }
    for (; r < n_end; ++r)
      job.y[r - job.row_begin] = dot_any(job.x, base + static_cast<size_t>(r) * row_bytes, k, w.dtype) + bias(r);
    return;
  }
  for (int64_t r = n; r < n_end; ++r) {
    const void* row = base + static_cast<size_t>(r) * row_bytes;
    const float* row_f32 = static_cast<const float*>(row);
    if (w.dtype != DType::F32) {
      widened.resize(static_cast<size_t>(k));
      to_f32(w.dtype, row, widened.data(), static_cast<size_t>(k));
      row_f32 = widened.data();
    }
    const float b = bias(r);
    for (int t = 0; t < job.num_tokens; ++t)
      job.y[static_cast<int64_t>(t) * n_out + (r - job.row_begin)] =
          dot_impl<DType::F32>(job.x + static_cast<int64_t>(t) * k, row_f32, k) + b;
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

void matmul_jobs(std::span<const MatmulJob> jobs) {
  // Work units of four rows over all jobs, split statically: one fork and join for all the jobs, and
  // each weight row read by one thread once.
  std::vector<std::pair<int, int64_t>> units;  // (job, first row)
  int64_t work = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    for (int64_t n = jobs[j].row_begin; n < jobs[j].row_end; n += 4) units.emplace_back(static_cast<int>(j), n);
    work += (jobs[j].row_end - jobs[j].row_begin) * jobs[j].w->cols() * jobs[j].num_tokens;
  }
  // Small products are not worth waking the thread team for.
  const int threads = work < (1 << 15) ? 1 : omp_get_max_threads();
  const int64_t num_units = static_cast<int64_t>(units.size());
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> widened;  // one weight row in f32, reused by every token of a job
#pragma omp for schedule(static)
    for (int64_t u = 0; u < num_units; ++u) {
      const MatmulJob& job = jobs[units[u].first];
      const int64_t n = units[u].second;
      run_rows(job, n, std::min(n + 4, job.row_end), widened);
    }
  }
}

void matmul(float* y, const float* x, int num_tokens, const TensorView& w, const TensorView& bias) {
  const MatmulJob job{y, x, num_tokens, &w, 0, w.rows(), &bias};
  matmul_jobs({&job, 1});
}

void matmul_rows(float* y, const float* x, int num_tokens, const TensorView& w, int64_t row_begin, int64_t row_end) {
  const MatmulJob job{y, x, num_tokens, &w, row_begin, row_end, nullptr};
  matmul_jobs({&job, 1});
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
