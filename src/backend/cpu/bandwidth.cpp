#include "backend/cpu/bandwidth.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <vector>

namespace moescope::cpu {

BandwidthSample measure_read_bandwidth(size_t bytes, int repeats) {
  const size_t n = bytes / sizeof(float) / 32 * 32;
  std::unique_ptr<float, decltype(&std::free)> buffer(static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))), &std::free);
  float* data = buffer.get();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<float>(i & 1023) * 1e-3f;  // first touch by the reading thread

  std::vector<double> rates;
  volatile float sink = 0.0f;  // keeps the reads from being optimised away
  for (int r = 0; r < repeats + 1; ++r) {
    const auto started = std::chrono::steady_clock::now();
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(data + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(data + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(data + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(data + i + 24));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (float v : lanes) total += v;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    sink = sink + total;
    if (r > 0) rates.push_back(static_cast<double>(n * sizeof(float)) / seconds / 1e9);  // first pass warms up
  }
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2], rates.front(), n * sizeof(float), repeats};
}

}  // namespace moescope::cpu
