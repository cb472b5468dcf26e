// Micro-benchmarks of the CPU kernels (Google Benchmark). Each reports the weight bytes it streams per
// second, to hold beside the machine's read bandwidth (`moescope bench` measures it). The CUDA kernels
// have theirs in cuda_kernels_bench.cpp.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"

namespace {

using moescope::DType;
using moescope::TensorView;

// Enough [rows, cols] bf16 matrices to overflow the last-level cache, so every pass streams from DRAM.
struct Matrices {
  std::vector<uint16_t> storage;
  std::vector<TensorView> views;
  Matrices(int64_t rows, int64_t cols, size_t total_bytes) {
    const size_t per = static_cast<size_t>(rows * cols);
    const size_t count = std::max<size_t>(1, total_bytes / (per * sizeof(uint16_t)));
    storage.resize(per * count);
    for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<uint16_t>(0x3c00 + (i * 2654435761u >> 20) % 256);
    for (size_t m = 0; m < count; ++m) views.push_back({storage.data() + m * per, DType::BF16, {rows, cols}, "w"});
  }
};

// One token through a bf16 matrix: the decode case, bound by memory bandwidth.
void BM_MatmulDecodeBf16(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  Matrices m(rows, cols, size_t{512} << 20);
  std::vector<float> x(static_cast<size_t>(cols), 0.01f), y(static_cast<size_t>(rows));
  size_t next = 0;
  for (auto _ : state) {
    moescope::cpu::matmul(y.data(), x.data(), 1, m.views[next]);
    next = (next + 1) % m.views.size();
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * rows * cols * 2);
}
BENCHMARK(BM_MatmulDecodeBf16)->Args({512, 512})->Args({1024, 512})->Args({1408, 2048})->Args({2048, 1408})->UseRealTime();

// Sixteen tokens through a bf16 matrix: the prefill and batched-decode case.
void BM_MatmulBatchBf16(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), tokens = state.range(2);
  Matrices m(rows, cols, size_t{512} << 20);
  std::vector<float> x(static_cast<size_t>(cols * tokens), 0.01f), y(static_cast<size_t>(rows * tokens));
  size_t next = 0;
  for (auto _ : state) {
    moescope::cpu::matmul(y.data(), x.data(), static_cast<int>(tokens), m.views[next]);
    next = (next + 1) % m.views.size();
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * rows * cols * 2);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.iterations() * tokens), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MatmulBatchBf16)->Args({1024, 512, 4})->Args({1024, 512, 16})->Args({1024, 512, 128})->UseRealTime();


}  // namespace

BENCHMARK_MAIN();
