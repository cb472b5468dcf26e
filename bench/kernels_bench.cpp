// Micro-benchmarks of the CPU kernels (Google Benchmark). Each reports the weight bytes it streams per
// second, to hold beside the machine's read bandwidth (`moescope bench` measures it). With the CUDA
// backend built, also the grouped expert GEMMs of the large path on the GPU (BM_CudaExpertsGrouped).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#if MOESCOPE_KERNELS_BENCH_CUDA
#include "backend/cuda/device.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/kernels.h"
#endif

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

#if MOESCOPE_KERNELS_BENCH_CUDA
// The large path's grouped expert GEMMs (experts_gate_up_grouped + experts_down_grouped, as run_layers
// calls them) at Qwen1.5-MoE-A2.7B's shapes: hidden 2048, 60 experts, moe_intermediate 1408, top-4, with
// random routes (top_k distinct experts per token, uniform). Args: tokens, two activation terms (1:
// --matmul-precision high). Time per iteration: CUDA events around the two launches. Counters:
// GB/s = bytes of the experts the step touches (gate/up and down of each expert with a pair) per second,
// of_floor = that against the device's read bandwidth (measured once, the way `moescope bench` does),
// TFLOP/s = 2 * pairs * 3 * inter * hidden per second (the model's products, one term), rows/expert =
// pairs / touched experts.
void BM_CudaExpertsGrouped(benchmark::State& state) {
  namespace cuda = moescope::cuda;
  std::string why;
  if (!cuda::device_available(&why)) {
    state.SkipWithError(("no CUDA device: " + why).c_str());
    return;
  }
  constexpr int hidden = 2048, experts = 60, inter = 1408, top_k = 4;
  const int tokens = static_cast<int>(state.range(0)), pairs = tokens * top_k;
  const bool split = state.range(1) != 0;
  // The weights (1 GiB: well past the L2) are shared by every case; values do not change the timing
  // (0x3c3c: about 0.0115, no denormals).
  struct Weights {
    cuda::DeviceBuffer<uint16_t> gate_up{static_cast<size_t>(experts) * 2 * inter * hidden};
    cuda::DeviceBuffer<uint16_t> down{static_cast<size_t>(experts) * hidden * inter};
    double read_gb_per_s = 0.0;
    Weights() {
      CUDA_CHECK(cudaMemset(gate_up.data(), 0x3c, gate_up.bytes()));
      CUDA_CHECK(cudaMemset(down.data(), 0x3c, down.bytes()));
      read_gb_per_s = cuda::measure_read_bandwidth(size_t{2} << 30, 5).best_gb_per_s;
    }
  };
  static Weights weights;
  cuda::ExpertWeights w;
  w.gate_up = weights.gate_up.data();
  w.down = weights.down.data();
  w.inter = inter;

  std::mt19937 rng(static_cast<unsigned>(tokens));
  std::vector<int32_t> ids(static_cast<size_t>(pairs));
  std::vector<int32_t> order(experts);
  std::iota(order.begin(), order.end(), 0);
  std::vector<bool> touched(experts, false);
  for (int t = 0; t < tokens; ++t) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int j = 0; j < top_k; ++j) {
      ids[static_cast<size_t>(t) * top_k + j] = order[j];
      touched[order[j]] = true;
    }
  }
  const auto num_touched = static_cast<int64_t>(std::count(touched.begin(), touched.end(), true));

  cuda::DeviceBuffer<int32_t> d_ids(ids.size());
  d_ids.upload(ids.data(), ids.size());
  cuda::DeviceBuffer<float> d_weights(ids.size());
  CUDA_CHECK(cudaMemset(d_weights.data(), 0, d_weights.bytes()));
  cuda::DeviceBuffer<int32_t> groups_mem(static_cast<size_t>(cuda::expert_groups_ints(pairs, experts)));
  const cuda::ExpertGroups groups = cuda::carve_expert_groups(groups_mem.data(), pairs, experts);
  cuda::align_by_expert(groups, d_ids.data(), pairs, experts, nullptr);
  const int terms = split ? 2 : 1;
  cuda::DeviceBuffer<uint16_t> xb(static_cast<size_t>(tokens) * hidden * terms);
  cuda::DeviceBuffer<uint16_t> hb(static_cast<size_t>(pairs) * inter * terms);
  cuda::DeviceBuffer<float> ffn_out(static_cast<size_t>(pairs) * hidden);
  CUDA_CHECK(cudaMemset(xb.data(), 0x3c, xb.bytes()));
  const cuda::Bf16Pair x_pair{xb.data(), split ? xb.data() + static_cast<size_t>(tokens) * hidden : nullptr};
  const cuda::Bf16Pair h_pair{hb.data(), split ? hb.data() + static_cast<size_t>(pairs) * inter : nullptr};
  auto run = [&] {
    cuda::experts_gate_up_grouped(h_pair, x_pair, w, groups, tokens, hidden, experts, top_k, nullptr);
    cuda::experts_down_grouped(ffn_out.data(), top_k, h_pair, d_weights.data(), w, groups, tokens, hidden, experts,
                               top_k, nullptr);
  };
  run();  // warm-up (and the kernels' one-time attribute calls)
  CUDA_CHECK(cudaDeviceSynchronize());

  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  double total_s = 0.0;
  for (auto _ : state) {
    CUDA_CHECK(cudaEventRecord(start, nullptr));
    run();
    CUDA_CHECK(cudaEventRecord(stop, nullptr));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms * 1e-3);
    total_s += ms * 1e-3;
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));

  const double iterations = static_cast<double>(state.iterations());
  const double bytes = static_cast<double>(num_touched) * 3.0 * inter * hidden * sizeof(uint16_t);
  const double flops = 2.0 * pairs * 3.0 * inter * hidden;
  const double gb_per_s = total_s > 0 ? bytes * iterations / total_s * 1e-9 : 0.0;
  state.counters["GB/s"] = gb_per_s;
  state.counters["of_floor"] = weights.read_gb_per_s > 0 ? gb_per_s / weights.read_gb_per_s : 0.0;
  state.counters["TFLOP/s"] = total_s > 0 ? flops * iterations / total_s * 1e-12 : 0.0;
  state.counters["touched"] = static_cast<double>(num_touched);
  state.counters["rows/expert"] = static_cast<double>(pairs) / static_cast<double>(num_touched);
}
BENCHMARK(BM_CudaExpertsGrouped)
    ->ArgNames({"tokens", "high"})
    ->Args({16, 0})
    ->Args({64, 0})
    ->Args({256, 0})
    ->Args({512, 0})
    ->Args({1024, 0})
    ->Args({2048, 0})
    ->Args({64, 1})
    ->Args({2048, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
#endif

}  // namespace

BENCHMARK_MAIN();
