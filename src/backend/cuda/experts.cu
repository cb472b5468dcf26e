// The experts of a MoE block (and the dense MLP, which is one group that every token goes through).
// Small passes: warps over the rows of each active expert, each row read once for all of its tokens.
// Large passes: grouped GEMMs on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate) over
// the expert-sorted pairs, SwiGLU fused into gate/up, routing weight and un-permute into down.
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"

namespace moescope::cuda {
namespace {

// ---- small passes -----------------------------------------------------------------------------------

constexpr int k_small_warps = 4;  // warps per block, one output column (gate/up) or row (down) each

// The group a block works on. Routed groups come first (one per possible active expert: blocks of a
// group beyond num_active exit); the dense group (shared expert / dense MLP) last.
struct Group {
  const bf16* gate_up;  // [2 * inter, hidden]
  const bf16* down;     // [hidden, inter]
  int inter;
  int count;            // tokens in the group
  const int32_t* pairs; // [count] routed pairs, or null for the dense group (tokens 0..count-1)
};

// Splits blockIdx.x into (group, block within the group). Returns false when the block has no work.
__device__ __forceinline__ bool find_group(Group& g, int& block_in_group, const ExpertWeights& w,
                                           const ExpertGroups& groups, int routed_groups, int blocks_per_routed,
                                           int num_tokens, int hidden) {
  const int b = blockIdx.x;
  if (b < routed_groups * blocks_per_routed) {
    const int a = b / blocks_per_routed;
    if (a >= *groups.num_active) return false;
    const int e = groups.active_experts[a];
    const int first = groups.expert_offsets[e];
    g.gate_up = w.gate_up + static_cast<int64_t>(e) * 2 * w.inter * hidden;
    g.down = w.down + static_cast<int64_t>(e) * hidden * w.inter;
    g.inter = w.inter;
    g.count = groups.expert_offsets[e + 1] - first;
    g.pairs = groups.sorted_pairs + first;
    block_in_group = b % blocks_per_routed;
    return true;
  }
  g = {w.dense_gate_up, w.dense_down, w.dense_inter, num_tokens, nullptr};
  block_in_group = b - routed_groups * blocks_per_routed;
  return true;
}

// h: [P + T, ld_h] f32 (row p: routed pair p; row P + t: token t of the dense group); x: [T, hidden].
template <int MAXT>
__global__ void __launch_bounds__(k_small_warps * 32)
    gate_up_small_kernel(float* h, int ld_h, const float* x, ExpertWeights w, ExpertGroups groups, int num_tokens,
                         int hidden, int top_k, int routed_groups, int blocks_per_routed) {
  Group g;
  int block;
  if (!find_group(g, block, w, groups, routed_groups, blocks_per_routed, num_tokens, hidden)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col = block * k_small_warps + warp;
  if (col >= g.inter) return;
  const bf16* rows[2] = {g.gate_up + static_cast<int64_t>(col) * hidden,
                         g.gate_up + static_cast<int64_t>(g.inter + col) * hidden};
  const int num_pairs = num_tokens * top_k;
  const float* xs[MAXT];
  int out_row[MAXT];
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    const int ii = min(i, g.count - 1);
    const int token = g.pairs != nullptr ? g.pairs[ii] / top_k : ii;
    xs[i] = x + static_cast<int64_t>(token) * hidden;
    out_row[i] = g.pairs != nullptr ? g.pairs[ii] : num_pairs + ii;
  }
  float acc[MAXT][2];
  warp_dot_rows<2, MAXT>(acc, rows, xs, g.count, hidden);
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < MAXT; ++i)
    if (i < g.count) h[static_cast<int64_t>(out_row[i]) * ld_h + col] = silu(acc[i][0]) * acc[i][1];
}

// ffn_out: [T, num_slots, hidden]; h: as above; topk_weights: [T * top_k].
template <int MAXT>
__global__ void __launch_bounds__(k_small_warps * 32)
    down_small_kernel(float* ffn_out, int num_slots, const float* h, int ld_h, const float* topk_weights,
                      ExpertWeights w, ExpertGroups groups, int num_tokens, int hidden, int top_k, int routed_groups,
                      int blocks_per_routed) {
  Group g;
  int block;
  if (!find_group(g, block, w, groups, routed_groups, blocks_per_routed, num_tokens, hidden)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = block * k_small_warps + warp;
  if (n >= hidden) return;
  const bf16* rows[1] = {g.down + static_cast<int64_t>(n) * g.inter};
  const int num_pairs = num_tokens * top_k;
  const float* hs[MAXT];
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    const int ii = min(i, g.count - 1);
    hs[i] = h + static_cast<int64_t>(g.pairs != nullptr ? g.pairs[ii] : num_pairs + ii) * ld_h;
  }
  float acc[MAXT][1];
  warp_dot_rows<1, MAXT>(acc, rows, hs, g.count, g.inter);
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    if (i >= g.count) continue;
    if (g.pairs != nullptr) {  // routed pair (t, j): weighted, into slot j
      const int pair = g.pairs[i];
      const int t = pair / top_k, j = pair % top_k;
      ffn_out[(static_cast<int64_t>(t) * num_slots + j) * hidden + n] = topk_weights[pair] * acc[i][0];
    } else {  // dense group: the last slot, unweighted (the shared-expert gate is applied when folding)
      ffn_out[(static_cast<int64_t>(i) * num_slots + num_slots - 1) * hidden + n] = acc[i][0];
    }
  }
}

// ---- large passes: grouped GEMM on the tensor cores ----------------------------------------------------

constexpr int k_bm = k_expert_tile_rows;  // 64 sorted rows per tile
constexpr int k_bn = 64;                  // output columns per tile
constexpr int k_bk = 32;                  // k per pipeline stage
constexpr int k_lds = k_bk + 8;           // shared row pitch in bf16: 80 bytes, conflict-free fragment loads
constexpr int k_gemm_threads = 128;       // 4 warps, 2 x 2, each 32 x 32 of the tile


// GATED: hb[s, n] = silu(a[s] . gate[n]) * (a[s] . up[n]), a = xb rows gathered by token, n < inter.
// else:  ffn_out[t, j, n] = topk_weights[pair] * (hb[s] . down[n]), n < hidden, pair = sorted_pairs[s].
// SPLIT: a is a_src.hi + a_src.lo, each term a product of its own into the same accumulators (and
// hb.lo receives the output's lo term). grid (max tiles, ceil(N / 64)); tiles past *num_tiles exit.
template <bool GATED, bool SPLIT>
__global__ void __launch_bounds__(k_gemm_threads)
    grouped_gemm_kernel(Bf16Pair hb, float* ffn_out, int num_slots, ConstBf16Pair a_src, const float* topk_weights,
                        ExpertWeights w, ExpertGroups groups, int hidden, int top_k) {
  constexpr int NB = GATED ? 2 : 1;  // weight tiles per stage: gate and up, or down
  constexpr int NA = SPLIT ? 2 : 1;  // activation terms: hi (and lo)
  __shared__ __align__(16) bf16 as[2][NA][k_bm][k_lds];
  __shared__ __align__(16) bf16 bs[2][NB][k_bn][k_lds];
  const int tile = blockIdx.x;
  if (tile >= *groups.num_tiles) return;
  const int e = groups.tile_expert[tile], row0 = groups.tile_row[tile];
  const int row_end = min(row0 + k_bm, groups.expert_offsets[e + 1]);
  const int inter = w.inter;
  const int n_total = GATED ? inter : hidden, k_total = GATED ? hidden : inter;
  const int n0 = blockIdx.y * k_bn;
  if (n0 >= n_total) return;
  const bf16* b_base = GATED ? w.gate_up + static_cast<int64_t>(e) * 2 * inter * hidden
                             : w.down + static_cast<int64_t>(e) * hidden * inter;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, tq = lane & 3;

  // Each thread copies two 16-byte chunks of the A tile and two of each B tile per stage: chunk c =
  // tid + 128 i covers row c / 4, columns (c % 4) * 8 .. + 8.
  const bf16* a_row[2][NA];
  bool a_ok[2];
  const bf16* b_row[2][NB];
  bool b_ok[2];
  int chunk_row[2], chunk_col[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = tid + i * k_gemm_threads;
    chunk_row[i] = c >> 2;
    chunk_col[i] = (c & 3) * 8;
    const int s = row0 + chunk_row[i];
    a_ok[i] = s < row_end;
    const int64_t a_index = GATED ? (a_ok[i] ? groups.sorted_pairs[s] / top_k : 0) : (a_ok[i] ? s : 0);
    a_row[i][0] = a_src.hi + a_index * k_total;
    if constexpr (SPLIT) a_row[i][NA - 1] = a_src.lo + a_index * k_total;
    const int n = n0 + chunk_row[i];
    b_ok[i] = n < n_total;
    const int nn = b_ok[i] ? n : 0;
    b_row[i][0] = b_base + static_cast<int64_t>(nn) * k_total;
    if constexpr (GATED) b_row[i][NB - 1] = b_base + static_cast<int64_t>(inter + nn) * k_total;
  }
  auto load_stage = [&](int stage, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = k0 + chunk_col[i];
      const bool k_ok = k < k_total;  // k_total % 8 == 0: a chunk is all in or all out
#pragma unroll
      for (int term = 0; term < NA; ++term)
        cp_async16(&as[stage][term][chunk_row[i]][chunk_col[i]], a_row[i][term] + (k_ok ? k : 0), a_ok[i] && k_ok);
#pragma unroll
      for (int m = 0; m < NB; ++m)
        cp_async16(&bs[stage][m][chunk_row[i]][chunk_col[i]], b_row[i][m] + (k_ok ? k : 0), b_ok[i] && k_ok);
    }
  };

  float acc[NB][2][4][4];
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][mi][ni][c] = 0.0f;

  const int num_k = (k_total + k_bk - 1) / k_bk;
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < num_k; ++kt) {
    if (kt + 1 < num_k) {
      load_stage((kt + 1) & 1, (kt + 1) * k_bk);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = kt & 1;
#pragma unroll
    for (int kk = 0; kk < k_bk; kk += 16) {
      uint32_t af[NA][2][4];
#pragma unroll
      for (int term = 0; term < NA; ++term)
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = wm * 32 + mi * 16 + g;
          af[term][mi][0] = lds32(&as[st][term][r][kk + 2 * tq]);
          af[term][mi][1] = lds32(&as[st][term][r + 8][kk + 2 * tq]);
          af[term][mi][2] = lds32(&as[st][term][r][kk + 8 + 2 * tq]);
          af[term][mi][3] = lds32(&as[st][term][r + 8][kk + 8 + 2 * tq]);
        }
#pragma unroll
      for (int m = 0; m < NB; ++m)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int c = wn * 32 + ni * 8 + g;
          const uint32_t b0 = lds32(&bs[st][m][c][kk + 2 * tq]), b1 = lds32(&bs[st][m][c][kk + 8 + 2 * tq]);
#pragma unroll
          for (int term = 0; term < NA; ++term)
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) mma_bf16(acc[m][mi][ni], af[term][mi], b0, b1);
        }
    }
    __syncthreads();  // the stage just read is the next one loaded
  }

  // Epilogue. Accumulator c of tile (mi, ni): row wm*32 + mi*16 + g + 8*(c / 2), column wn*32 + ni*8 + 2*tq + c % 2.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int s = row0 + wm * 32 + mi * 16 + g + 8 * half;
      if (s >= row_end) continue;
      if constexpr (GATED) {
        const int64_t out = static_cast<int64_t>(s) * inter;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + wn * 32 + ni * 8 + 2 * tq + c;
            if (n < inter) store_bf16(hb, out + n, silu(acc[0][mi][ni][2 * half + c]) * acc[NB - 1][mi][ni][2 * half + c]);
          }
      } else {
        const int pair = groups.sorted_pairs[s];
        const int t = pair / top_k, j = pair % top_k;
        const float weight = topk_weights[pair];
        float* out = ffn_out + (static_cast<int64_t>(t) * num_slots + j) * hidden;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + wn * 32 + ni * 8 + 2 * tq + c;
            if (n < hidden) out[n] = weight * acc[0][mi][ni][2 * half + c];
          }
      }
    }
}

}  // namespace

void experts_gate_up_small(float* h, int ld_h, const float* x, const ExpertWeights& w, const ExpertGroups& groups,
                           int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (num_tokens > k_small_batch_max_tokens) argument_error("experts_gate_up_small", "too many tokens for the small path");
  if (hidden % 8 != 0 || ld_h % 8 != 0) argument_error("experts_gate_up_small", "hidden and ld_h must be multiples of 8");
  const int num_pairs = num_tokens * top_k;
  const int routed_groups = num_experts > 0 ? std::min(num_experts, num_pairs) : 0;
  const int blocks_per_routed = ceil_div(w.inter, k_small_warps);
  const int dense_blocks = w.dense_gate_up != nullptr ? ceil_div(w.dense_inter, k_small_warps) : 0;
  const int blocks = routed_groups * blocks_per_routed + dense_blocks;
  if (blocks == 0) return;
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    gate_up_small_kernel<MAXT><<<blocks, k_small_warps * 32, 0, stream>>>(h, ld_h, x, w, groups, num_tokens, hidden,
                                                                           top_k, routed_groups, blocks_per_routed);
  });
  CUDA_CHECK_LAUNCH();
}

void experts_down_small(float* ffn_out, int num_slots, const float* h, int ld_h, const float* topk_weights,
                        const ExpertWeights& w, const ExpertGroups& groups, int num_tokens, int hidden,
                        int num_experts, int top_k, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (num_tokens > k_small_batch_max_tokens) argument_error("experts_down_small", "too many tokens for the small path");
  if ((num_experts > 0 && w.inter % 8 != 0) || (w.dense_down != nullptr && w.dense_inter % 8 != 0))
    argument_error("experts_down_small", "intermediate sizes must be multiples of 8");
  const int num_pairs = num_tokens * top_k;
  const int routed_groups = num_experts > 0 ? std::min(num_experts, num_pairs) : 0;
  const int blocks_per_routed = ceil_div(hidden, k_small_warps);
  const int dense_blocks = w.dense_down != nullptr ? blocks_per_routed : 0;
  const int blocks = routed_groups * blocks_per_routed + dense_blocks;
  if (blocks == 0) return;
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    down_small_kernel<MAXT><<<blocks, k_small_warps * 32, 0, stream>>>(ffn_out, num_slots, h, ld_h, topk_weights, w,
                                                                        groups, num_tokens, hidden, top_k,
                                                                        routed_groups, blocks_per_routed);
  });
  CUDA_CHECK_LAUNCH();
}

void experts_gate_up_grouped(Bf16Pair hb, ConstBf16Pair xb, const ExpertWeights& w, const ExpertGroups& groups,
                             int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream) {
  const int num_pairs = num_tokens * top_k;
  if (num_pairs == 0 || num_experts == 0) return;
  if (hidden % 8 != 0) argument_error("experts_gate_up_grouped", "hidden must be a multiple of 8");
  if ((xb.lo == nullptr) != (hb.lo == nullptr))
    argument_error("experts_gate_up_grouped", "the input and the output have a lo term together or not at all");
  const dim3 grid(max_expert_tiles(num_pairs, num_experts), ceil_div(w.inter, k_bn));
  if (xb.lo != nullptr)
    grouped_gemm_kernel<true, true><<<grid, k_gemm_threads, 0, stream>>>(hb, nullptr, 0, xb, nullptr, w, groups, hidden, top_k);
  else
    grouped_gemm_kernel<true, false><<<grid, k_gemm_threads, 0, stream>>>(hb, nullptr, 0, xb, nullptr, w, groups, hidden, top_k);
  CUDA_CHECK_LAUNCH();
}

void experts_down_grouped(float* ffn_out, int num_slots, ConstBf16Pair hb, const float* topk_weights,
                          const ExpertWeights& w, const ExpertGroups& groups, int num_tokens, int hidden,
                          int num_experts, int top_k, cudaStream_t stream) {
  const int num_pairs = num_tokens * top_k;
  if (num_pairs == 0 || num_experts == 0) return;
  if (w.inter % 8 != 0) argument_error("experts_down_grouped", "the expert intermediate size must be a multiple of 8");
  const dim3 grid(max_expert_tiles(num_pairs, num_experts), ceil_div(hidden, k_bn));
  if (hb.lo != nullptr)
    grouped_gemm_kernel<false, true><<<grid, k_gemm_threads, 0, stream>>>(nullptr, ffn_out, num_slots, hb, topk_weights,
                                                                          w, groups, hidden, top_k);
  else
    grouped_gemm_kernel<false, false><<<grid, k_gemm_threads, 0, stream>>>(nullptr, ffn_out, num_slots, hb, topk_weights,
                                                                           w, groups, hidden, top_k);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
