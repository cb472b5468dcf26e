// Micro-benchmarks of the CUDA kernels (Google Benchmark, times from CUDA events). Each case labels
// itself with the device and a checksum of its output, so that a faster but wrong kernel shows. Without
// a GPU every case is skipped with the runtime's message.
#include <benchmark/benchmark.h>
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/blas.h"
#include "backend/cuda/device.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/timing.h"
#include "tensor/dtype.h"

namespace {

using moescope::cuda::DeviceBuffer;

bool skip_without_gpu(benchmark::State& state) {
  std::string why;
  if (moescope::cuda::device_available(&why)) return false;
  state.SkipWithError(("no CUDA device: " + why).c_str());
  return true;
}

// Times every iteration of `run` (kernel launches on the default stream) with CUDA events, as the
// benchmark's manual time; returns the seconds summed over the iterations.
template <typename Run>
double time_with_events(benchmark::State& state, Run&& run) {
  double total_s = 0.0;
  for (auto _ : state) {
    const double s = moescope::cuda::event_ms(nullptr, run) * 1e-3;
    state.SetIterationTime(s);
    total_s += s;
  }
  return total_s;
}

template <typename Host>
DeviceBuffer<typename Host::value_type> upload(const Host& host) {
  DeviceBuffer<typename Host::value_type> d(host.size());
  d.upload(host.data(), host.size());
  return d;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  std::transform(v.begin(), v.end(), out.begin(), moescope::f32_to_bf16);
  return out;
}

// Sum of |x| over a device buffer's first n floats: the checksum a case prints beside its timing.
double sum_abs(const DeviceBuffer<float>& d, size_t n) {
  std::vector<float> host(n);
  d.download(host.data(), n);
  double sum = 0.0;
  for (float x : host) sum += std::fabs(static_cast<double>(x));
  return sum;
}

// Uniform q, k and v in [-1, 1), and the ids of the cache's blocks in shuffled order.
struct AttentionInputs {
  std::vector<float> q, k, v;
  std::vector<int32_t> blocks;
};
AttentionInputs random_attention_inputs(size_t q_elems, size_t cache_elems, int num_blocks, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  AttentionInputs in{std::vector<float>(q_elems), std::vector<float>(cache_elems), std::vector<float>(cache_elems),
                     std::vector<int32_t>(static_cast<size_t>(num_blocks))};
  for (auto* v : {&in.q, &in.k, &in.v})
    for (float& x : *v) x = uniform(rng);
  std::iota(in.blocks.begin(), in.blocks.end(), 0);
  std::shuffle(in.blocks.begin(), in.blocks.end(), rng);
  return in;
}

// Prefill attention of one sequence of `tokens` tokens from position 0 (the whole prompt in one pass):
// tiles of 64 rows, cache blocks of 16 in shuffled order. Args: tokens, heads, kv heads, head_dim, cache
// element (0: bf16, the tensor-core kernel where head_dim allows; 1: f32, the CUDA-core kernel), wgmma
// (1: q . k on wgmma where the GPU has it; 0: all on mma.sync). Reports TFLOP/s of the two products over
// the causal half (4 head_dim flops per query-key pair) and whether wgmma ran.
void BM_AttentionPrefill(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0)), heads = static_cast<int>(state.range(1));
  const int kv_heads = static_cast<int>(state.range(2)), hd = static_cast<int>(state.range(3));
  const bool f32_cache = state.range(4) != 0;
  moescope::cuda::set_wgmma_allowed(state.range(5) != 0);
  const int block_size = 16, num_blocks = (tokens + block_size - 1) / block_size;
  const size_t q_elems = static_cast<size_t>(tokens) * heads * hd;
  const size_t cache_elems = static_cast<size_t>(num_blocks) * block_size * kv_heads * hd;

  const AttentionInputs in = random_attention_inputs(q_elems, cache_elems, num_blocks, 1);
  std::vector<moescope::cuda::PrefillTile> tiles;
  for (int r = 0; r < tokens; r += moescope::cuda::k_prefill_tile_rows)
    tiles.push_back({0, r, std::min(moescope::cuda::k_prefill_tile_rows, tokens - r), r});
  std::vector<int32_t> token_seq(static_cast<size_t>(tokens), 0), token_pos(static_cast<size_t>(tokens));
  std::iota(token_pos.begin(), token_pos.end(), 0);

  auto d_q = upload(in.q);
  auto d_table = upload(in.blocks);
  auto d_tiles = upload(tiles);
  auto d_seq = upload(token_seq);
  auto d_pos = upload(token_pos);
  DeviceBuffer<float> d_out(q_elems), d_k32, d_v32;
  DeviceBuffer<uint16_t> d_k16, d_v16, d_out_bf16(q_elems);
  if (f32_cache) {
    d_k32 = upload(in.k);
    d_v32 = upload(in.v);
  } else {
    d_k16 = upload(to_bf16(in.k));
    d_v16 = upload(to_bf16(in.v));
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
  time_with_events(state, run);

  const double checksum = sum_abs(d_out, q_elems);
  const double pairs = 0.5 * static_cast<double>(tokens) * (tokens + 1);
  state.counters["TFLOP/s"] = benchmark::Counter(4.0 * hd * heads * pairs * 1e-12 * static_cast<double>(state.iterations()),
                                                 benchmark::Counter::kIsRate);
  state.counters["wgmma"] =
      !f32_cache && moescope::cuda::wgmma_allowed() && moescope::cuda::wgmma_available() ? 1.0 : 0.0;
  moescope::cuda::set_wgmma_allowed(true);
  state.SetLabel(moescope::cuda::device_description() + ", sum |out| " + std::to_string(checksum));
}
// Qwen1.5-MoE-A2.7B (16 heads, 16 kv heads, head_dim 128) at 2048 tokens, both caches; a GQA shape
// (Qwen3-30B-A3B: 32 heads, 4 kv heads) at 4096.
BENCHMARK(BM_AttentionPrefill)
    ->ArgNames({"tokens", "heads", "kv_heads", "head_dim", "f32_cache", "wgmma"})
    ->Args({2048, 16, 16, 128, 0, 1})
    ->Args({2048, 16, 16, 128, 0, 0})
    ->Args({2048, 16, 16, 128, 1, 0})
    ->Args({4096, 32, 4, 128, 0, 1})
    ->Args({4096, 32, 4, 128, 0, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// Decode attention: `batch` sequences of `context` cached positions each (the last one the new token's),
// one query row per sequence, bf16 cache in blocks of 16 shuffled over all sequences. Args: batch, context,
// heads, kv heads, head_dim, split (1: room for splitting few rows over their positions, as the backend
// gives it; 0: a block per row and head). Reports the cache's bytes read per second (keys and values of
// every sequence, each kv head once) against the device's bandwidth.
void BM_AttentionDecode(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int batch = static_cast<int>(state.range(0)), context = static_cast<int>(state.range(1));
  const int heads = static_cast<int>(state.range(2)), kv_heads = static_cast<int>(state.range(3));
  const int hd = static_cast<int>(state.range(4));
  const bool split = state.range(5) != 0;
  const int block_size = 16, blocks_per_seq = (context + block_size - 1) / block_size;
  const int num_blocks = batch * blocks_per_seq;
  const size_t q_elems = static_cast<size_t>(batch) * heads * hd;
  const size_t cache_elems = static_cast<size_t>(num_blocks) * block_size * kv_heads * hd;

  // Row s of the block table: blocks_per_seq of the shuffled ids.
  const AttentionInputs in = random_attention_inputs(q_elems, cache_elems, num_blocks, 2);
  std::vector<int32_t> rows(static_cast<size_t>(batch)), token_pos(static_cast<size_t>(batch), context - 1);
  std::iota(rows.begin(), rows.end(), 0);  // decode row r is sequence r (token_seq = rows)

  auto d_q = upload(in.q);
  auto d_table = upload(in.blocks);
  auto d_rows = upload(rows);
  auto d_pos = upload(token_pos);
  auto d_k = upload(to_bf16(in.k));
  auto d_v = upload(to_bf16(in.v));
  DeviceBuffer<float> d_out(q_elems);
  DeviceBuffer<uint16_t> d_out_bf16(q_elems);
  moescope::cuda::AttentionBatch ab;
  ab.block_tables = d_table.data();
  ab.max_blocks = blocks_per_seq;
  ab.block_size = block_size;
  ab.decode_rows = d_rows.data();
  ab.num_decode = batch;
  ab.token_seq = d_rows.data();
  ab.token_pos = d_pos.data();
  DeviceBuffer<float> split_partials(split ? static_cast<size_t>(moescope::cuda::decode_split_floats(hd)) : 0);
  DeviceBuffer<unsigned> split_tickets(split ? static_cast<size_t>(moescope::cuda::decode_split_blocks()) : 0);
  if (split) {
    CUDA_CHECK(cudaMemset(split_tickets.data(), 0, split_tickets.bytes()));
    ab.split_partials = split_partials.data();
    ab.split_tickets = split_tickets.data();
  }

  auto run = [&] {  // as the large path calls it: the f32 output and its bf16 copy for o_proj
    moescope::cuda::attention(d_out.data(), d_out_bf16.data(), d_q.data(), d_k.data(), d_v.data(), ab, heads, kv_heads,
                              hd, nullptr);
  };
  run();
  time_with_events(state, run);

  const double checksum = sum_abs(d_out, q_elems);
  const double bytes = 2.0 * batch * context * kv_heads * hd * sizeof(uint16_t);
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()),
                                              benchmark::Counter::kIsRate);
  state.SetLabel(moescope::cuda::device_description() + ", sum |out| " + std::to_string(checksum));
}
// Qwen1.5-MoE-A2.7B (16 heads, 16 kv heads, head_dim 128): batch 256 after a 128-token prompt (the bench's
// decode), batch 1 at that length and at 4096; a GQA shape (32 heads, 4 kv heads) at batch 64 and 2048.
BENCHMARK(BM_AttentionDecode)
    ->ArgNames({"batch", "context", "heads", "kv_heads", "hd", "split"})
    ->Args({256, 144, 16, 16, 128, 1})
    ->Args({1, 144, 16, 16, 128, 1})
    ->Args({1, 144, 16, 16, 128, 0})
    ->Args({1, 4096, 16, 16, 128, 1})
    ->Args({1, 4096, 16, 16, 128, 0})
    ->Args({8, 4096, 16, 16, 128, 1})
    ->Args({8, 4096, 16, 16, 128, 0})
    ->Args({64, 2048, 32, 4, 128, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// The large path's grouped expert GEMMs (experts_gate_up_grouped + experts_down_grouped, as run_layers
// calls them) at Qwen1.5-MoE-A2.7B's shapes: hidden 2048, 60 experts, moe_intermediate 1408, top-4, with
// random routes (top_k distinct experts per token, uniform). Args: tokens, two activation terms (1:
// --matmul-precision high), wgmma (1: allowed where the GPU has it, for products of one term; 2: the same
// with every expert's last rows in tiles of their own, as MOESCOPE_CUDA_TAIL=0; 0: the mma.sync kernels,
// as MOESCOPE_CUDA_WGMMA=0), shared (1: the shared expert, intermediate 5632, in the same
// launches as a dense group of every token, as the backend runs decode-sized passes; larger ones give it
// to cuBLAS). Time per iteration: CUDA events around the two launches. Counters: GB/s = bytes of the
// experts the step touches (gate/up and down of each expert with a pair, and the shared one) per second,
// of_floor = that against the device's read bandwidth (measured once, the way `moescope bench` does),
// TFLOP/s = 2 * (pairs * inter + shared tokens * 5632) * 3 * hidden per second (the model's products, one
// term), rows/expert = pairs / touched experts, wgmma = whether the wgmma kernels ran.
void BM_CudaExpertsGrouped(benchmark::State& state) {
  namespace cuda = moescope::cuda;
  if (skip_without_gpu(state)) return;
  constexpr int hidden = 2048, experts = 60, inter = 1408, top_k = 4;
  const int tokens = static_cast<int>(state.range(0)), pairs = tokens * top_k;
  const bool split = state.range(1) != 0;
  cuda::set_wgmma_allowed(state.range(2) != 0);
  cuda::set_expert_tails_allowed(state.range(2) != 2);
  // The weights (1 GiB: well past the L2) are shared by every case; values do not change the timing
  // (0x3c3c: about 0.0115, no denormals).
  constexpr int shared_inter = 5632;
  const bool shared = state.range(3) != 0;
  struct Weights {
    cuda::DeviceBuffer<uint16_t> gate_up{static_cast<size_t>(experts) * 2 * inter * hidden};
    cuda::DeviceBuffer<uint16_t> down{static_cast<size_t>(experts) * hidden * inter};
    cuda::DeviceBuffer<uint16_t> shared_gate_up{static_cast<size_t>(2) * shared_inter * hidden};
    cuda::DeviceBuffer<uint16_t> shared_down{static_cast<size_t>(hidden) * shared_inter};
    double read_gb_per_s = 0.0;
    Weights() {
      CUDA_CHECK(cudaMemset(gate_up.data(), 0x3c, gate_up.bytes()));
      CUDA_CHECK(cudaMemset(down.data(), 0x3c, down.bytes()));
      CUDA_CHECK(cudaMemset(shared_gate_up.data(), 0x3c, shared_gate_up.bytes()));
      CUDA_CHECK(cudaMemset(shared_down.data(), 0x3c, shared_down.bytes()));
      read_gb_per_s = cuda::measure_read_bandwidth(size_t{2} << 30, 5).best_gb_per_s;
    }
  };
  static Weights weights;
  cuda::ExpertWeights w;
  w.gate_up = weights.gate_up.data();
  w.down = weights.down.data();
  w.inter = inter;
  if (shared) {
    w.dense_gate_up = weights.shared_gate_up.data();
    w.dense_down = weights.shared_down.data();
    w.dense_inter = shared_inter;
  }

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
  CUDA_CHECK(cudaMemset(xb.data(), 0x3c, xb.bytes()));
  const cuda::Bf16Pair x_pair{xb.data(), split ? xb.data() + static_cast<size_t>(tokens) * hidden : nullptr};
  const cuda::Bf16Pair h_pair{hb.data(), split ? hb.data() + static_cast<size_t>(pairs) * inter : nullptr};
  cuda::DeviceBuffer<uint16_t> dense_hb(shared ? static_cast<size_t>(tokens) * shared_inter * terms : 0);
  const cuda::Bf16Pair dense_pair =
      shared ? cuda::Bf16Pair{dense_hb.data(), split ? dense_hb.data() + static_cast<size_t>(tokens) * shared_inter : nullptr}
             : cuda::Bf16Pair{};
  const int slots = top_k + (shared ? 1 : 0);
  cuda::DeviceBuffer<float> ffn_out(static_cast<size_t>(tokens) * slots * hidden);
  auto run = [&] {
    cuda::experts_gate_up_grouped(h_pair, x_pair, w, groups, tokens, hidden, experts, top_k, nullptr, dense_pair);
    cuda::experts_down_grouped(ffn_out.data(), slots, h_pair, d_weights.data(), w, groups, tokens, hidden, experts,
                               top_k, nullptr, dense_pair);
  };
  run();  // warm-up (and the kernels' one-time attribute calls)
  CUDA_CHECK(cudaDeviceSynchronize());

  const double total_s = time_with_events(state, run);

  const double iterations = static_cast<double>(state.iterations());
  const double bytes = (static_cast<double>(num_touched) * inter + (shared ? shared_inter : 0)) * 3.0 * hidden * sizeof(uint16_t);
  const double flops = 2.0 * (static_cast<double>(pairs) * inter + (shared ? static_cast<double>(tokens) * shared_inter : 0)) * 3.0 * hidden;
  const double gb_per_s = total_s > 0 ? bytes * iterations / total_s * 1e-9 : 0.0;
  state.counters["GB/s"] = gb_per_s;
  state.counters["of_floor"] = weights.read_gb_per_s > 0 ? gb_per_s / weights.read_gb_per_s : 0.0;
  state.counters["TFLOP/s"] = total_s > 0 ? flops * iterations / total_s * 1e-12 : 0.0;
  state.counters["touched"] = static_cast<double>(num_touched);
  state.counters["rows/expert"] = static_cast<double>(pairs) / static_cast<double>(num_touched);
  state.counters["wgmma"] = !split && cuda::wgmma_allowed() && cuda::wgmma_available() ? 1.0 : 0.0;
  cuda::set_wgmma_allowed(true);
  cuda::set_expert_tails_allowed(true);
}
BENCHMARK(BM_CudaExpertsGrouped)
    ->ArgNames({"tokens", "high", "wgmma", "shared"})
    ->Args({16, 0, 1, 0})
    ->Args({16, 0, 0, 0})
    ->Args({64, 0, 1, 0})
    ->Args({64, 0, 0, 0})
    ->Args({64, 0, 1, 1})
    ->Args({64, 0, 0, 1})
    ->Args({256, 0, 1, 0})
    ->Args({256, 0, 0, 0})
    ->Args({256, 0, 1, 1})
    ->Args({256, 0, 0, 1})
    ->Args({512, 0, 1, 0})
    ->Args({512, 0, 0, 0})
    ->Args({1024, 0, 1, 0})
    ->Args({1024, 0, 2, 0})
    ->Args({1024, 0, 0, 0})
    ->Args({1024, 0, 1, 1})
    ->Args({2048, 0, 1, 0})
    ->Args({2048, 0, 2, 0})
    ->Args({2048, 0, 0, 0})
    ->Args({2048, 0, 1, 1})
    ->Args({4096, 0, 1, 0})
    ->Args({4096, 0, 2, 0})
    ->Args({4096, 0, 1, 1})
    ->Args({8192, 0, 1, 0})
    ->Args({8192, 0, 2, 0})
    ->Args({8192, 0, 0, 0})
    ->Args({8192, 0, 1, 1})
    ->Args({64, 1, 1, 0})
    ->Args({2048, 1, 1, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

// cuBLASLt's descriptors of y^T [n, T] = w [k, n]^T . x^T [k, T] (column-major, as Blas::gemm puts it),
// bf16 in, f32 out, and the first algorithms its heuristic offers for it.
class LtProduct {
 public:
  LtProduct(int n, int tokens, int k, size_t workspace_bytes) {
    CUBLAS_CHECK(cublasLtCreate(&lt_));
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t trans = CUBLAS_OP_T, no = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &no, sizeof(no)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_, CUDA_R_16BF, k, n, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_, CUDA_R_16BF, k, tokens, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&c_, CUDA_R_32F, n, tokens, n));
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref_));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                      sizeof(workspace_bytes)));
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt_, desc_, a_, b_, c_, c_, pref_, 8, results_, &found_));
  }
  ~LtProduct() {
    cublasLtMatmulPreferenceDestroy(pref_);
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(c_);
    cublasLtMatmulDescDestroy(desc_);
    cublasLtDestroy(lt_);
  }
  LtProduct(const LtProduct&) = delete;
  LtProduct& operator=(const LtProduct&) = delete;
  int algorithms() const { return found_; }
  void run(int algo, float* y, const uint16_t* w, const uint16_t* x, DeviceBuffer<char>& workspace) {
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt_, desc_, &alpha, w, a_, x, b_, &beta, y, c_, y, c_, &results_[algo].algo,
                                workspace.data(), workspace.size(), nullptr));
  }

 private:
  cublasLtHandle_t lt_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
  cublasLtMatmulPreference_t pref_ = nullptr;
  cublasLtMatmulHeuristicResult_t results_[8] = {};
  int found_ = 0;
};

// The dense products of large passes, as Blas::gemm runs them (algo -1: cublasGemmEx), and
// each of the first 8 algorithms cuBLASLt's heuristic offers for the same product (algo 0..7), to see
// how far the default is from the best cuBLAS has. Args: n (output features), tokens, k, algo, beta (1: y +=,
// as o_proj adds into the residual; cublasGemmEx only). Reports the weights' bytes per second (bf16 [n, k]).
void BM_DenseGemm(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int n = static_cast<int>(state.range(0)), tokens = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2)), algo = static_cast<int>(state.range(3));
  const float beta = static_cast<float>(state.range(4));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(n) * k), x(static_cast<size_t>(tokens) * k);
  for (float& v : w) v = uniform(rng) * 0.05f;
  for (float& v : x) v = uniform(rng);
  auto d_w = upload(to_bf16(w));
  auto d_x = upload(to_bf16(x));
  DeviceBuffer<float> d_y(static_cast<size_t>(tokens) * n);
  DeviceBuffer<char> workspace(size_t{32} << 20);
  moescope::cuda::Blas blas;
  blas.set_stream(nullptr);
  LtProduct lt(n, tokens, k, workspace.size());
  if (algo >= lt.algorithms()) {
    state.SkipWithError(("the heuristic offers " + std::to_string(lt.algorithms()) + " algorithms").c_str());
    return;
  }
  auto run = [&] {
    if (algo < 0) blas.gemm(d_y.data(), n, d_x.data(), d_w.data(), tokens, n, k, beta);
    else lt.run(algo, d_y.data(), d_w.data(), d_x.data(), workspace);
  };
  run();
  CUDA_CHECK(cudaDeviceSynchronize());
  time_with_events(state, run);
  const double checksum = sum_abs(d_y, static_cast<size_t>(tokens) * n);
  state.counters["GB/s"] = benchmark::Counter(2.0 * n * k * 1e-9 * static_cast<double>(state.iterations()),
                                              benchmark::Counter::kIsRate);
  state.counters["TFLOP/s"] = benchmark::Counter(2.0 * n * k * tokens * 1e-12 * static_cast<double>(state.iterations()),
                                                 benchmark::Counter::kIsRate);
  state.SetLabel("sum |y| " + std::to_string(checksum));
}
// Qwen1.5-MoE-A2.7B's q/k/v (6144 x 2048) and o_proj (2048 x 2048) at 64 and 256 tokens.
BENCHMARK(BM_DenseGemm)
    ->ArgNames({"n", "tokens", "k", "algo", "beta"})
    ->ArgsProduct({{6144, 2048}, {64, 256}, {2048}, {-1, 0, 1, 2, 3, 4, 5, 6, 7}, {0}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
// The dense products of a 2048-token prefill: q/k/v, o_proj, the shared expert's gate/up (2 x 5632 rows)
// and down (k 5632).
BENCHMARK(BM_DenseGemm)
    ->ArgNames({"n", "tokens", "k", "algo", "beta"})
    ->ArgsProduct({{6144, 2048, 11264}, {2048}, {2048}, {-1, 0, 1, 2, 3, 4, 5, 6, 7}, {0}})
    ->ArgsProduct({{2048}, {2048}, {5632}, {-1, 0, 1, 2, 3, 4, 5, 6, 7}, {0}})
    ->Args({2048, 2048, 2048, -1, 1})
    ->Args({2048, 256, 2048, -1, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// The router of a large pass (router_topk: logits, softmax, top-k, the shared expert's gate) at
// Qwen1.5-MoE-A2.7B's shapes (hidden 2048, 60 experts + the shared gate row, top-4), with its activation
// rows staged in shared memory (staged 1, from 8 tokens a block) or not (staged 0). Reports GB/s of the
// activations read (the weights come from L2) and labels the sum of the routing weights, which is the
// same for both.
void BM_Router(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int tokens = static_cast<int>(state.range(0)), hidden = 2048, experts = 60, top_k = 4;
  const bool staged = state.range(1) != 0;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(experts + 1) * hidden), x(static_cast<size_t>(tokens) * hidden);
  for (float& v : w) v = uniform(rng) * 0.05f;
  for (float& v : x) v = uniform(rng);
  auto d_w = upload(to_bf16(w));
  auto d_x = upload(x);
  DeviceBuffer<int32_t> ids(static_cast<size_t>(tokens) * top_k);
  DeviceBuffer<float> weights(static_cast<size_t>(tokens) * top_k), gate(static_cast<size_t>(tokens));
  const bool before = moescope::cuda::router_staged_allowed();
  moescope::cuda::set_router_staged_allowed(staged);
  auto run = [&] {
    moescope::cuda::router_topk(ids.data(), weights.data(), gate.data(), d_x.data(), d_w.data(), tokens, hidden, experts,
                                top_k, false, nullptr);
  };
  run();
  CUDA_CHECK(cudaDeviceSynchronize());
  time_with_events(state, run);
  moescope::cuda::set_router_staged_allowed(before);
  const double checksum = sum_abs(weights, static_cast<size_t>(tokens) * top_k);
  state.counters["GB/s"] = benchmark::Counter(4.0 * hidden * tokens * 1e-9 * static_cast<double>(state.iterations()),
                                              benchmark::Counter::kIsRate);
  state.SetLabel("sum of weights " + std::to_string(checksum) + ", " + moescope::cuda::device_description());
}
BENCHMARK(BM_Router)
    ->ArgNames({"tokens", "staged"})
    ->ArgsProduct({{2048, 8192}, {1, 0}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// What a grid-wide barrier of a persistent kernel costs beside the boundary between two kernels of a decode
// pass (docs/CUDA.md, "What remains": the batch-1 step's latency-bound chain). pdl: the kernels launched
// by programmatic dependent launch (sm_90) or plainly. One iteration: 200 barriers or kernels, medians of
// 20 timings each.
void BM_SyncCosts(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const bool pdl = state.range(0) != 0;
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (pdl && major < 9) {
    state.SkipWithError("programmatic dependent launch needs sm_90");
    return;
  }
  const bool before = moescope::cuda::programmatic_launch();
  moescope::cuda::set_programmatic_launch(pdl);
  moescope::cuda::SyncCosts costs;
  for (auto _ : state) costs = moescope::cuda::measure_sync_costs(200, 20);
  moescope::cuda::set_programmatic_launch(before);
  if (!costs.barriers_checked || !costs.links_checked) {
    state.SkipWithError("a barrier or a kernel of the chain did not run");
    return;
  }
  state.counters["barrier_us"] = costs.barrier_us;
  state.counters["kernel_boundary_us"] = costs.boundary_us;
  state.SetLabel(moescope::cuda::device_description() + ", " + std::to_string(costs.blocks) + " blocks");
}
BENCHMARK(BM_SyncCosts)->ArgName("pdl")->Arg(1)->Arg(0)->Iterations(1)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
