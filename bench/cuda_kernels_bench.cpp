// Micro-benchmarks of the CUDA kernels (Google Benchmark, times from CUDA events). Each case labels
// itself with the device and a checksum of its output, so that a faster but wrong kernel shows. Without
// a GPU every case is skipped with the runtime's message.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/cuda/device.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/kernels.h"
#include "tensor/dtype.h"

namespace {

using moescope::cuda::DeviceBuffer;

bool skip_without_gpu(benchmark::State& state) {
  std::string why;
  if (moescope::cuda::device_available(&why)) return false;
  state.SkipWithError(("no CUDA device: " + why).c_str());
  return true;
}

// Prefill attention of one sequence of `tokens` tokens from position 0 (the whole prompt in one pass):
// tiles of 64 rows, cache blocks of 16 in shuffled order. Args: tokens, heads, kv heads, head_dim, cache
// element (0: bf16, the tensor-core kernel where head_dim allows; 1: f32, the CUDA-core kernel).
// Reports TFLOP/s of the two products over the causal half (4 head_dim flops per query-key pair).
void BM_AttentionPrefill(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0)), heads = static_cast<int>(state.range(1));
  const int kv_heads = static_cast<int>(state.range(2)), hd = static_cast<int>(state.range(3));
  const bool f32_cache = state.range(4) != 0;
  const int block_size = 16, num_blocks = (tokens + block_size - 1) / block_size;
  const size_t q_elems = static_cast<size_t>(tokens) * heads * hd;
  const size_t cache_elems = static_cast<size_t>(num_blocks) * block_size * kv_heads * hd;

  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> q(q_elems), k(cache_elems), v(cache_elems);
  for (float& x : q) x = uniform(rng);
  for (float& x : k) x = uniform(rng);
  for (float& x : v) x = uniform(rng);
  std::vector<int32_t> table(static_cast<size_t>(num_blocks));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<moescope::cuda::PrefillTile> tiles;
  for (int r = 0; r < tokens; r += moescope::cuda::k_prefill_tile_rows)
    tiles.push_back({0, r, std::min(moescope::cuda::k_prefill_tile_rows, tokens - r), r});
  std::vector<int32_t> token_seq(static_cast<size_t>(tokens), 0), token_pos(static_cast<size_t>(tokens));
  std::iota(token_pos.begin(), token_pos.end(), 0);

  auto upload = [](const auto& host) {
    DeviceBuffer<typename std::decay_t<decltype(host)>::value_type> d(host.size());
    d.upload(host.data(), host.size());
    return d;
  };
  auto d_q = upload(q);
  auto d_table = upload(table);
  auto d_tiles = upload(tiles);
  auto d_seq = upload(token_seq);
  auto d_pos = upload(token_pos);
  DeviceBuffer<float> d_out(q_elems), d_k32, d_v32;
  DeviceBuffer<uint16_t> d_k16, d_v16, d_out_bf16(q_elems);
  if (f32_cache) {
    d_k32 = upload(k);
    d_v32 = upload(v);
  } else {
    std::vector<uint16_t> k16(cache_elems), v16(cache_elems);
    std::transform(k.begin(), k.end(), k16.begin(), moescope::f32_to_bf16);
    std::transform(v.begin(), v.end(), v16.begin(), moescope::f32_to_bf16);
    d_k16 = upload(k16);
    d_v16 = upload(v16);
  }
  moescope::cuda::AttentionBatch ab;
  ab.block_tables = d_table.data();
  ab.max_blocks = num_blocks;
  ab.block_size = block_size;
  ab.prefill_tiles = d_tiles.data();
  ab.num_prefill_tiles = static_cast<int>(tiles.size());
  ab.token_seq = d_seq.data();
  ab.token_pos = d_pos.data();

  // As the large path calls it: the f32 output and its bf16 copy for o_proj.
  auto run = [&] {
    if (f32_cache)
      moescope::cuda::attention(d_out.data(), d_out_bf16.data(), d_q.data(), d_k32.data(), d_v32.data(), ab, heads,
                                kv_heads, hd, nullptr);
    else
      moescope::cuda::attention(d_out.data(), d_out_bf16.data(), d_q.data(), d_k16.data(), d_v16.data(), ab, heads,
                                kv_heads, hd, nullptr);
  };
  run();  // warm-up (and the opt-in to large shared memory)
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (auto _ : state) {
    CUDA_CHECK(cudaEventRecord(start));
    run();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms / 1e3);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));

  std::vector<float> out(q_elems);
  d_out.download(out.data(), out.size());
  double checksum = 0.0;
  for (float x : out) checksum += std::fabs(static_cast<double>(x));
  const double pairs = 0.5 * static_cast<double>(tokens) * (tokens + 1);
  state.counters["TFLOP/s"] = benchmark::Counter(4.0 * hd * heads * pairs * 1e-12 * static_cast<double>(state.iterations()),
                                                 benchmark::Counter::kIsRate);
  state.SetLabel(moescope::cuda::device_description() + ", sum |out| " + std::to_string(checksum));
}
// Qwen1.5-MoE-A2.7B (16 heads, 16 kv heads, head_dim 128) at 2048 tokens, both caches; a GQA shape
// (Qwen3-30B-A3B: 32 heads, 4 kv heads) at 4096.
BENCHMARK(BM_AttentionPrefill)
    ->Args({2048, 16, 16, 128, 0})
    ->Args({2048, 16, 16, 128, 1})
    ->Args({4096, 32, 4, 128, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
