#include "backend/cpu/kernels.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace moescope::cpu {
namespace {

constexpr int64_t k_unit_rows = 8;  // rows of one work unit (the decode tile's height)

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

// Eight weights of a row widened to f32 (bf16 and f16 widen exactly).
template <DType D>
inline __m256 load_w8(const void* row, int64_t i) {
  if constexpr (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(row) + i);
  else return load8(static_cast<const uint16_t*>(row) + i, D);
}

template <DType D>
inline float load_w1(const void* row, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(row)[i];
  else if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
}

// The one dot-product kernel: an R-row by T-token tile, one 8-lane accumulator per (row, token),
// stepped over k in eights, then a fixed horizontal sum and the scalar tail in order. Every matmul
// goes through it, so a token's result does not depend on how many rows or tokens share its tile:
// a sequence gets bit-identical logits and routes whatever batch it runs in.
// x: [T, k] with row stride x_stride; rows: R rows of w, row_bytes apart; y[t * y_stride + r].
template <DType D, int R, int T>
void dot_tile(const float* x, int64_t x_stride, const char* rows, size_t row_bytes, int64_t k, float* y, int64_t y_stride) {
  __m256 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t i = 0;
  constexpr int64_t elt = D == DType::F32 ? 4 : 2;
  for (; i + 8 <= k; i += 8) {
    // Once per cache line of each row, ask for the same line of the next tile's rows: rows of 1-4 KB end
    // before the hardware prefetcher has locked on to their streams (single-thread decode of 512-wide
    // rows went from 11.6 to 19.9 GB/s in kernels_bench). Prefetches past the weights never fault.
    if (i % (64 / elt) == 0)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch(rows + (r + R) * static_cast<int64_t>(row_bytes) + i * elt, _MM_HINT_T0);
    __m256 xs[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) xs[t] = _mm256_loadu_ps(x + t * x_stride + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 w = load_w8<D>(rows + r * row_bytes, i);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(xs[t], w, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t j = i; j < k; ++j) s = std::fma(x[t * x_stride + j], load_w1<D>(rows + r * row_bytes, j), s);
      y[t * y_stride + r] = s;
    }
}

// Rows [n, n_end) of one job, n_end - n <= 8, read straight from the mapping in their file dtype.
// A decode (one token) takes the rows eight at a time; a pass of several tokens takes four rows by
// three tokens at a time, so each weight row is loaded once per three tokens.
template <DType D>
void run_rows_typed(const MatmulJob& job, int64_t n, int64_t n_end) {
  const TensorView& w = *job.w;
  const int64_t k = w.cols(), n_out = job.row_end - job.row_begin;
  const size_t row_bytes = static_cast<size_t>(k) * dtype_size(w.dtype);
  const char* rows = static_cast<const char*>(w.data) + static_cast<size_t>(n) * row_bytes;
  const int num_rows = static_cast<int>(n_end - n), num_tokens = job.num_tokens;
  float* y = job.y + (n - job.row_begin);
  int r = 0;
  if (num_tokens == 1 && num_rows == 8) {
    dot_tile<D, 8, 1>(job.x, k, rows, row_bytes, k, y, n_out);
    r = 8;
  }
  for (; r + 4 <= num_rows; r += 4) {
    int t = 0;
    for (; t + 3 <= num_tokens; t += 3) dot_tile<D, 4, 3>(job.x + t * k, k, rows + r * row_bytes, row_bytes, k, y + t * n_out + r, n_out);
    for (; t < num_tokens; ++t) dot_tile<D, 4, 1>(job.x + t * k, k, rows + r * row_bytes, row_bytes, k, y + t * n_out + r, n_out);
  }
  for (; r < num_rows; ++r)
    for (int t = 0; t < num_tokens; ++t) dot_tile<D, 1, 1>(job.x + t * k, k, rows + r * row_bytes, row_bytes, k, y + t * n_out + r, n_out);
  if (job.bias != nullptr && !job.bias->empty())
    for (int t = 0; t < num_tokens; ++t)
      for (int i = 0; i < num_rows; ++i) y[t * n_out + i] += element(*job.bias, n + i);
}

void run_rows(const MatmulJob& job, int64_t n, int64_t n_end) {
  switch (job.w->dtype) {
    case DType::F32: return run_rows_typed<DType::F32>(job, n, n_end);
    case DType::BF16: return run_rows_typed<DType::BF16>(job, n, n_end);
    case DType::F16: return run_rows_typed<DType::F16>(job, n, n_end);
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

float dot_row(const float* x, const TensorView& w, int64_t r) {
  float y = 0.0f;
  const MatmulJob job{&y, x, 1, &w, r, r + 1, nullptr};
  run_rows(job, r, r + 1);
  return y;
}

void matmul_jobs(std::span<const MatmulJob> jobs) {
  // Work units of eight rows over all jobs, one fork and join for all of them. Each thread takes a
  // contiguous run of units of equal cost (rows x cols x tokens), not of equal count: the jobs of one
  // call can differ in width (an expert's down projection beside the wider shared expert's).
  struct Unit {
    int job;
    int64_t first_row;
    int64_t cost_end;  // cost of this unit and all before it
  };
  std::vector<Unit> units;
  int64_t cost = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t row_cost = jobs[j].w->cols() * jobs[j].num_tokens;
    for (int64_t n = jobs[j].row_begin; n < jobs[j].row_end; n += k_unit_rows) {
      cost += std::min(k_unit_rows, jobs[j].row_end - n) * row_cost;
      units.push_back({static_cast<int>(j), n, cost});
    }
  }
  // Small products are not worth waking the thread team for.
  const int threads = cost < (1 << 15) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    // Thread `me` runs the units whose cost ends in (cost * me / team, cost * (me + 1) / team].
    auto first_unit_after = [&](int64_t c) {
      return std::upper_bound(units.begin(), units.end(), c, [](int64_t v, const Unit& u) { return v < u.cost_end; }) - units.begin();
    };
    const auto begin = me == 0 ? 0 : first_unit_after(cost * me / team);
    const auto end = first_unit_after(cost * (me + 1) / team);
    for (auto u = begin; u < end; ++u) {
      const MatmulJob& job = jobs[units[u].job];
      run_rows(job, units[u].first_row, std::min(units[u].first_row + k_unit_rows, job.row_end));
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
