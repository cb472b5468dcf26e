// The experts of a MoE block (and the dense MLP, which is one group that every token goes through).
// Small passes: warps over the rows of each active expert, each row read once for all of its tokens.
// Large passes: grouped GEMMs on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate) over
// the expert-sorted pairs, SwiGLU fused into gate/up, routing weight and un-permute into down.
#include <type_traits>

#include "backend/cuda/device_memory.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

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

// The block's place in the group order: the dense group's blocks come last in that order and are
// launched first (the grid runs in blockIdx order), so that with a programmatic launch they are the ones
// resident while the router still runs, loading their weights (routed blocks can only wait).
__device__ __forceinline__ int small_block() { return static_cast<int>(gridDim.x - 1 - blockIdx.x); }

// Splits small_block() into (group, block within the group). Returns false when the block has no work.
__device__ __forceinline__ bool find_group(Group& g, int& block_in_group, const ExpertWeights& w,
                                           const ExpertGroups& groups, int routed_groups, int blocks_per_routed,
                                           int num_tokens, int hidden) {
  const int b = small_block();
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
// C: columns per warp (gate and up rows of each): with more tokens, more rows share each activation load.
// dn.weight (NORM): the dense group normalises its input itself (dn.x, the residual before the
// post-attention norm) instead of reading x, which the router kernel before this one writes: its blocks
// do not wait for the router but run beside it. Each block stages its tokens' rows in shared memory and
// norms them as router_small does (sum_squares8 in the same lane order, warp_inv_rms, then
// norm_weight * (x * inv)), so its products are those of x to the bit. This relies on the router kernel
// letting this one start only after its own wait: the residual is then complete (read through L2).
template <int MAXT, int C, bool NORM>
__global__ void __launch_bounds__(k_small_warps * 32)
    gate_up_small_kernel(float* h, int ld_h, const float* x, ExpertWeights w, ExpertGroups groups, int num_tokens,
                         int hidden, int top_k, int routed_groups, int blocks_per_routed, DenseNorm dn) {
  // The dense group's rows are known before the router has run: its warps load their first weights, then
  // wait (inside warp_dot_rows), or with NORM run at once. Routed groups come from the router's grouping:
  // those blocks wait first.
  const bool dense = small_block() >= routed_groups * blocks_per_routed;
  if (!dense) wait_for_previous_kernel();
  else if (NORM) allow_next_kernel();
  Group g;
  int block;
  if (!find_group(g, block, w, groups, routed_groups, blocks_per_routed, num_tokens, hidden)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col0 = (block * k_small_warps + warp) * C;
  // A NORM dense block's warps all take part in its barriers: one past the columns computes and drops.
  if (col0 >= g.inter && !(NORM && dense)) return;
  const bf16* rows[2 * C];
#pragma unroll
  for (int c = 0; c < C; ++c) {  // columns past the end re-read the last one; their sums are dropped
    const int col = min(col0 + c, g.inter - 1);
    rows[2 * c] = g.gate_up + static_cast<int64_t>(col) * hidden;
    rows[2 * c + 1] = g.gate_up + static_cast<int64_t>(g.inter + col) * hidden;
  }
  const int num_pairs = num_tokens * top_k;
  extern __shared__ float4 gate_up_small_smem[];  // NORM dense blocks: [count][hidden] normed rows
  float* const staged = reinterpret_cast<float*>(gate_up_small_smem);
  const bool own_norm = NORM && dense;
  const float* xs[MAXT];
  int out_row[MAXT];
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    const int ii = min(i, g.count - 1);
    const int token = g.pairs != nullptr ? g.pairs[ii] / top_k : ii;
    xs[i] = own_norm ? staged + static_cast<int64_t>(ii) * hidden : x + static_cast<int64_t>(token) * hidden;
    out_row[i] = g.pairs != nullptr ? g.pairs[ii] : num_pairs + ii;
  }
  float acc[MAXT][2 * C];
  if (own_norm) {
    // After this warp's first weight loads: the block's rows of dn.x into shared memory, each row's inverse
    // RMS (every warp the same sums in the same order), then the rows normed in place.
    auto norm_rows = [&] {
      const int count = g.count, vec4 = hidden >> 2, num_vec = hidden >> 3;
      block_stage_l2(gate_up_small_smem, reinterpret_cast<const float4*>(dn.x), count * vec4, count * vec4);
      __syncthreads();
      float inv[MAXT];
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        float sum_sq = 0.0f;
        if (t < count)
          for (int v = lane; v < num_vec; v += 32)
            sum_sq = sum_squares8(gate_up_small_smem[t * 2 * num_vec + 2 * v], gate_up_small_smem[t * 2 * num_vec + 2 * v + 1],
                                  sum_sq);
        inv[t] = warp_inv_rms(sum_sq, hidden, dn.eps);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < count)
          for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            staged[t * hidden + i] = dn.weight[i] * (staged[t * hidden + i] * inv[t]);
      __syncthreads();
    };
    warp_dot_rows<2 * C, MAXT, false, false, true>(acc, rows, xs, g.count, hidden, norm_rows);
  } else if (dense) {
    warp_dot_rows<2 * C, MAXT, true>(acc, rows, xs, g.count, hidden);
  } else {
    warp_dot_rows<2 * C, MAXT>(acc, rows, xs, g.count, hidden);
  }
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < MAXT; ++i)
#pragma unroll
    for (int c = 0; c < C; ++c)
      if (i < g.count && col0 + c < g.inter)
        h[static_cast<int64_t>(out_row[i]) * ld_h + col0 + c] = silu(acc[i][2 * c]) * acc[i][2 * c + 1];
}

// ffn_out: [T, num_slots, hidden]; h: as above; topk_weights: [T * top_k]. R: output rows per warp.
template <int MAXT, int R>
__global__ void __launch_bounds__(k_small_warps * 32)
    down_small_kernel(float* ffn_out, int num_slots, const float* h, int ld_h, const float* topk_weights,
                      ExpertWeights w, ExpertGroups groups, int num_tokens, int hidden, int top_k, int routed_groups,
                      int blocks_per_routed) {
  // The dense group's rows are known before the router has run: its warps load their first weights, then
  // wait (inside warp_dot_rows). Routed groups come from the router's grouping: those blocks wait first.
  const bool dense = small_block() >= routed_groups * blocks_per_routed;
  if (!dense) wait_for_previous_kernel();
  Group g;
  int block;
  if (!find_group(g, block, w, groups, routed_groups, blocks_per_routed, num_tokens, hidden)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (block * k_small_warps + warp) * R;
  if (n0 >= hidden) return;
  const bf16* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = g.down + static_cast<int64_t>(min(n0 + r, hidden - 1)) * g.inter;
  const int num_pairs = num_tokens * top_k;
  const float* hs[MAXT];
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    const int ii = min(i, g.count - 1);
    hs[i] = h + static_cast<int64_t>(g.pairs != nullptr ? g.pairs[ii] : num_pairs + ii) * ld_h;
  }
  float acc[MAXT][R];
  if (dense) warp_dot_rows<R, MAXT, true>(acc, rows, hs, g.count, g.inter);
  else warp_dot_rows<R, MAXT>(acc, rows, hs, g.count, g.inter);
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < MAXT; ++i) {
    if (i >= g.count) continue;
    int64_t at;
    float weight = 1.0f;
    if (g.pairs != nullptr) {  // routed pair (t, j): weighted, into slot j
      const int pair = g.pairs[i];
      const int t = pair / top_k, j = pair % top_k;
      at = (static_cast<int64_t>(t) * num_slots + j) * hidden;
      weight = topk_weights[pair];
    } else {  // dense group: the last slot, unweighted (the shared-expert gate is applied when folding)
      at = (static_cast<int64_t>(i) * num_slots + num_slots - 1) * hidden;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (n0 + r < hidden) ffn_out[at + n0 + r] = weight * acc[i][r];  // 1 * x is x exactly
  }
}

// One token (experts_down_fold): warp n takes output element n of every slot. The dense group's row first
// (its weights load before the wait), then the routed experts' rows k_fold_experts at a time with their
// loads in flight together (warp_dot_pairs, the same sums as down_small_kernel's warp_dot_rows<1, 1>),
// then x[n] += the slots in rms_norm's fold order (fold_slot). The routed slot is weight x sum rounded on its own (__fmul_rn: not contracted
// into the fold's fma), as down_small_kernel stores it.
constexpr int k_fold_experts = 4;
__global__ void __launch_bounds__(k_small_warps * 32)
    down_fold_kernel(float* x, const float* h, int ld_h, const int32_t* topk_ids, const float* topk_weights,
                     const float* shared_gate, ExpertWeights w, int hidden, int top_k) {
  const int lane = threadIdx.x & 31, n = blockIdx.x * k_small_warps + (threadIdx.x >> 5);
  if (n >= hidden) return;  // no block barriers below
  float dense = 0.0f;
  if (w.dense_down != nullptr) {
    const bf16* rows[1] = {w.dense_down + static_cast<int64_t>(n) * w.dense_inter};
    const float* hs[1] = {h + static_cast<int64_t>(top_k) * ld_h};
    float acc[1][1];
    warp_dot_rows<1, 1, true>(acc, rows, hs, 1, w.dense_inter);  // waits for the previous kernel inside
    dense = acc[0][0];
  } else {
    wait_for_previous_kernel();
  }
  float block_out = 0.0f;
  for (int j0 = 0; j0 < top_k; j0 += k_fold_experts) {
    const bf16* rows[k_fold_experts];
    const float* hs[k_fold_experts];
#pragma unroll
    for (int j = 0; j < k_fold_experts; ++j) {
      const int jj = min(j0 + j, top_k - 1);
      rows[j] = w.down + (static_cast<int64_t>(topk_ids[jj]) * hidden + n) * w.inter;
      hs[j] = h + static_cast<int64_t>(jj) * ld_h;
    }
    float acc[k_fold_experts];
    warp_dot_pairs<k_fold_experts>(acc, rows, hs, min(k_fold_experts, top_k - j0), w.inter);
#pragma unroll
    for (int j = 0; j < k_fold_experts; ++j)
      if (j0 + j < top_k) block_out = fold_slot(block_out, 1.0f, __fmul_rn(topk_weights[j0 + j], acc[j]));
  }
  if (w.dense_down != nullptr) block_out = fold_slot(block_out, shared_gate != nullptr ? shared_gate[0] : 1.0f, dense);
  if (lane == 0) x[n] = x[n] + block_out;
}

// ---- large passes: grouped GEMM on the tensor cores ----------------------------------------------------
//
// A CTA computes one row tile of align_by_expert (BM sorted rows of one expert) against 64 gate columns
// and the 64 matching up columns (GATED) or 128 down columns. Warps are WARPS_M x 4; each owns 64 rows
// (four m16 slices) by 32 columns (16 gate + 16 up, or 32 down). Operands go global -> shared with a
// STAGES-deep cp.async pipeline (BK per stage, rows padded by 8 bf16 so that ldmatrix is conflict-free),
// shared -> registers with ldmatrix.x4. Slices that hold no row of the tile are neither loaded nor
// multiplied: a tile of 5 rows costs one m16 slice per warp, and its weights still stream once.
// Two configurations (the host picks one from the pairs per expert, as align_by_expert does its tiles):
//   few rows per expert (decode batches, bandwidth-bound): BM 64, 1 x 4 warps, BK 128, 2 stages (SPLIT: BK 64, 3);
//   many rows per expert (prefill, compute-bound): BM 128, 2 x 4 warps, BK 32, 4 stages (3 SPLIT).

template <bool GATED, bool SPLIT, int BM_, int WARPS_M_, int BK_, int STAGES_>
struct GemmConfig {
  static constexpr int BM = BM_, WARPS_M = WARPS_M_, WARPS_N = 4, BK = BK_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int NB = GATED ? 2 : 1;      // weight matrices per CTA: gate and up, or down
  static constexpr int NA = SPLIT ? 2 : 1;      // activation terms: hi (and lo)
  static constexpr int BN = GATED ? 64 : 128;   // output columns per weight matrix
  static constexpr int WM = BM / WARPS_M;       // rows per warp
  static constexpr int MI = WM / 16;            // m16 slices per warp
  static constexpr int WN = BN / WARPS_N;       // columns per warp and matrix
  static constexpr int NI = WN / 8;             // n8 tiles per warp and matrix
  static constexpr int BKP = BK + 8;            // shared row pitch in bf16 (16-byte multiple, conflict-free)
  static constexpr int CPR = BK / 8;            // 16-byte chunks per row and stage
  static constexpr int RPP = THREADS / CPR;     // rows one pass of the threads copies
  static constexpr int A_ITERS = BM / RPP;
  static constexpr int B_ITERS = NB * BN / RPP;
  static constexpr int A_ELEMS = BM * BKP;                    // one activation term, one stage
  static constexpr int STAGE_ELEMS = (NA * BM + NB * BN) * BKP;
  static constexpr size_t SMEM_BYTES = static_cast<size_t>(STAGES) * STAGE_ELEMS * sizeof(bf16);
  static_assert(WM == 64 && NI % 2 == 0 && BK % 16 == 0, "warp tile: 64 rows, pairs of n8 tiles");
  static_assert(THREADS % CPR == 0 && BM % RPP == 0 && (NB * BN) % RPP == 0, "whole rows per copy pass");
  static_assert(SMEM_BYTES <= 163 * 1024, "fits sm_80's shared memory per block");
};

// Decode batches stream the experts' weights: long k tiles (256 bytes of each weight row a stage) serve the
// bandwidth better than deep pipelines (cuda_kernels_bench on the H100, 256 tokens: BK 128 x 2 stages 0.83
// of the floor, BK 64 x 4 stages 0.80, BK 32 0.59); the two-term products keep BK 64 x 3 stages, which
// leaves room for their second activation term (BK 128 x 2 stages: 0.70 against 0.84 at 64 tokens).
template <bool GATED, bool SPLIT>
using DecodeGemm = std::conditional_t<SPLIT, GemmConfig<GATED, true, 64, 1, 64, 3>, GemmConfig<GATED, false, 64, 1, 128, 2>>;
template <bool GATED, bool SPLIT>
using PrefillGemm = GemmConfig<GATED, SPLIT, 128, 2, 32, SPLIT ? 3 : 4>;


// The dense group (the shared expert) in the same launch as the routed experts: its tiles are the
// tokens in order, its weights w.dense_*. Gate/up writes its SwiGLU output to hb; down reads a and
// writes ffn_out's last slot (weight 1: the shared expert's gate is the fold's). tokens == 0: none.
struct DenseTiles {
  Bf16Pair hb;       // gate/up: [tokens, dense_inter] out
  ConstBf16Pair a;   // down: [tokens, dense_inter] in
  int tokens = 0;
  int blocks = 0;    // ceil(tokens / BM) x ceil(N / BN)
  // Prefill tiles: the dense tiles spread evenly through the grid instead of first, so that the SMs run
  // its compute-bound tiles beside the routed ones, which are bound by memory.
  bool spread = false;
};

// A grouped-GEMM CTA's tile: sorted rows row0 .. row0 + rows - 1 (1..BM) against output columns n0 ..,
// of the group whose weights are b (gate/up or down) with intermediate size inter. 1-D grid: dense.blocks
// dense tiles (row tile fastest) and max_tiles x ceil(N / BN) routed ones (tile fastest), the dense ones
// first or, with dense.spread, block b dense where floor((b + 1) D / G) steps up (D dense blocks of G).
// False when the block has no work: a routed tile past *num_tiles, or columns past the output's.
struct GemmTile {
  bool dense;
  int row0, rows, n0, inter;
  const bf16* b;
};
//
// tail > 0: an expert's last rows, when tail or fewer remain past one of its full tiles, go with that tile
// (rows up to bm + tail), and the tile align_by_expert made of them has no work.
template <bool GATED>
__device__ __forceinline__ bool find_gemm_tile(GemmTile& t, int block, int bm, int bn, const ExpertWeights& w,
                                               const ExpertGroups& groups, const DenseTiles& dense, int hidden,
                                               int max_tiles, int tail = 0) {
  int dense_index = block, routed_index = block - dense.blocks;
  t.dense = block < dense.blocks;
  if (dense.spread) {
    const int64_t d = dense.blocks, g = gridDim.x;
    const int before = static_cast<int>(block * d / g), through = static_cast<int>((block + 1) * d / g);
    t.dense = through > before;
    dense_index = before;
    routed_index = block - through;
  }
  if (t.dense) {
    const int row_tiles = (dense.tokens + bm - 1) / bm;
    t.row0 = (dense_index % row_tiles) * bm;
    t.rows = min(bm, dense.tokens - t.row0);
    t.n0 = (dense_index / row_tiles) * bn;
    t.inter = w.dense_inter;
    t.b = GATED ? w.dense_gate_up : w.dense_down;
  } else {
    const int b = routed_index, tile = b % max_tiles;
    if (tile >= *groups.num_tiles) return false;
    const int e = groups.tile_expert[tile];
    t.row0 = groups.tile_row[tile];
    const int rest = groups.expert_offsets[e + 1] - t.row0;
    if (rest <= tail && t.row0 > groups.expert_offsets[e]) return false;  // the tile before took these rows
    t.rows = rest <= bm + tail ? rest : bm;
    t.n0 = (b / max_tiles) * bn;
    t.inter = w.inter;
    t.b = GATED ? w.gate_up + static_cast<int64_t>(e) * 2 * t.inter * hidden
                : w.down + static_cast<int64_t>(e) * hidden * t.inter;
  }
  return t.n0 < (GATED ? t.inter : hidden);
}

// GATED: hb[s, n] = silu(a[s] . gate[n]) * (a[s] . up[n]), a = xb rows gathered by token, n < inter.
// else:  ffn_out[t, j, n] = topk_weights[pair] * (hb[s] . down[n]), n < hidden, pair = sorted_pairs[s].
// SPLIT: a is a_src.hi + a_src.lo, each term a product of its own into the same accumulators (and
// hb.lo receives the output's lo term). 1-D grid: dense.blocks dense tiles (row tile fastest) and
// max_tiles x ceil(N / BN) routed ones (tile fastest), in find_gemm_tile's order; tiles past *num_tiles exit.
// Dynamic shared memory: Cfg::SMEM_BYTES, per stage [NA][BM][BKP] activations then [NB * BN][BKP] weights.
template <bool GATED, bool SPLIT, class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS)
    grouped_gemm_kernel(Bf16Pair hb, float* ffn_out, int num_slots, ConstBf16Pair a_src, const float* topk_weights,
                        ExpertWeights w, ExpertGroups groups, int hidden, int top_k, DenseTiles dense, int max_tiles) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, BKP = Cfg::BKP, STAGES = Cfg::STAGES;
  constexpr int NA = Cfg::NA, NB = Cfg::NB, MI = Cfg::MI, NI = Cfg::NI, CPR = Cfg::CPR, RPP = Cfg::RPP;
  constexpr int A_ITERS = Cfg::A_ITERS, B_ITERS = Cfg::B_ITERS;
  extern __shared__ __align__(16) unsigned char gemm_smem[];
  bf16* const smem = reinterpret_cast<bf16*>(gemm_smem);
  wait_for_previous_kernel();

  GemmTile tile;
  if (!find_gemm_tile<GATED>(tile, static_cast<int>(blockIdx.x), BM, BN, w, groups, dense, hidden, max_tiles)) return;
  const bool is_dense = tile.dense;
  const int row0 = tile.row0, rows = tile.rows, n0 = tile.n0, inter = tile.inter;
  const bf16* const b_base = tile.b;
  const int n_total = GATED ? inter : hidden, k_total = GATED ? hidden : inter;
  // The activations: rows gathered by token (gate/up: routed rows are pairs), or the tile's rows in order.
  const ConstBf16Pair a_in = is_dense && !GATED ? dense.a : a_src;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N, g = lane >> 2, tq = lane & 3;
  // Rows copied: the whole m16 slices that hold a row of the tile (rows past `rows` in them zero-filled).
  const int rows_loaded = (rows + 15) & ~15;
  // This warp's m16 slices that hold rows (warp-uniform): the others are skipped.
  const int warp_slices = min(MI, max(0, (rows - wm * Cfg::WM + 15) / 16));

  // Copies: thread tid moves 16-byte chunks at column (tid % CPR) * 8 of rows tid / CPR + RPP * i.
  const int chunk_col = (tid % CPR) * 8, chunk_row = tid / CPR;
  const bf16* a_ptr[A_ITERS][NA];
  bool a_copy[A_ITERS], a_ok[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int r = chunk_row + i * RPP;
    a_copy[i] = r < rows_loaded;
    a_ok[i] = r < rows;
    const int64_t a_index = !a_ok[i] ? 0 : GATED && !is_dense ? groups.sorted_pairs[row0 + r] / top_k : row0 + r;
    a_ptr[i][0] = a_in.hi + a_index * k_total;
    if constexpr (SPLIT) a_ptr[i][NA - 1] = a_in.lo + a_index * k_total;
  }
  const bf16* b_ptr[B_ITERS];
  bool b_ok[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int r = chunk_row + i * RPP;  // row of the stage's weight tile: matrix r / BN, column r % BN
    const int n = n0 + r % BN;
    b_ok[i] = n < n_total;
    b_ptr[i] = b_base + static_cast<int64_t>(b_ok[i] ? (r / BN) * inter + n : 0) * k_total;
  }
  auto load_stage = [&](int stage, int k0) {
    bf16* const st = smem + stage * Cfg::STAGE_ELEMS;
    const int k = k0 + chunk_col;
    const bool k_ok = k < k_total;  // k_total % 8 == 0: a chunk is all in or all out
    const int kc = k_ok ? k : 0;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      if (!a_copy[i]) continue;
      const int at = (chunk_row + i * RPP) * BKP + chunk_col;
#pragma unroll
      for (int term = 0; term < NA; ++term)
        cp_async16(st + term * Cfg::A_ELEMS + at, a_ptr[i][term] + kc, a_ok[i] && k_ok);
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i)
      cp_async16(st + NA * Cfg::A_ELEMS + (chunk_row + i * RPP) * BKP + chunk_col, b_ptr[i] + kc, b_ok[i] && k_ok);
  };

  float acc[NB][MI][NI][4];
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][mi][ni][c] = 0.0f;

  // ldmatrix addresses within a stage. A (x4 = one m16 x k16 fragment): lane l gives row l % 16 of the
  // slice at k + 8 (l / 16), so registers 0..3 are a0..a3 of mma's A (rows g / g+8, k 2tq / 8+2tq).
  // B (x4 = two n8 x k16 fragments): lane l gives column (l % 8) + 8 (l / 16) at k + 8 ((l / 8) % 2), so
  // registers 0, 1 are b0, b1 of the first n8 tile and 2, 3 those of the second.
  const int a_lane = (wm * Cfg::WM + (lane & 15)) * BKP + ((lane >> 4) << 3);
  const int b_lane = (wn * Cfg::WN + (lane & 7) + ((lane >> 4) << 3)) * BKP + (((lane >> 3) & 1) << 3);

  // Pipeline: group i copies k tile i (empty groups past the end keep the count uniform). Before tile kt
  // is read, wait until at most STAGES - 2 groups are pending: groups 0..kt are complete.
  const int num_k = (k_total + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k) load_stage(s, s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with the stage read at kt - 1
    {
      const int next = kt + STAGES - 1;  // into the stage read at kt - 1
      if (next < num_k) load_stage(next % STAGES, next * BK);
      cp_async_commit();
    }
    if (warp_slices == 0) continue;
    const bf16* const st = smem + (kt % STAGES) * Cfg::STAGE_ELEMS;
    const bf16* const bs = st + NA * Cfg::A_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t bf[NB][NI][2];
#pragma unroll
      for (int m = 0; m < NB; ++m)
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj)
          ldmatrix_x4(bf[m][2 * nj][0], bf[m][2 * nj][1], bf[m][2 * nj + 1][0], bf[m][2 * nj + 1][1],
                      bs + b_lane + (m * BN + nj * 16) * BKP + kk);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if (mi >= warp_slices) break;
        uint32_t af[NA][4];
#pragma unroll
        for (int term = 0; term < NA; ++term)
          ldmatrix_x4(af[term][0], af[term][1], af[term][2], af[term][3],
                      st + term * Cfg::A_ELEMS + a_lane + mi * 16 * BKP + kk);
#pragma unroll
        for (int m = 0; m < NB; ++m)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int term = 0; term < NA; ++term) mma_bf16(acc[m][mi][ni], af[term], bf[m][ni][0], bf[m][ni][1]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; nothing in flight at exit

  // Epilogue. Accumulator c of (mi, ni): row wm*WM + mi*16 + g + 8*(c / 2), column wn*WN + ni*8 + 2*tq + c % 2.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    if (mi >= warp_slices) break;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * Cfg::WM + mi * 16 + g + 8 * half;
      if (r >= rows) continue;
      const int s = row0 + r;
      if constexpr (GATED) {
        const Bf16Pair out_pair = is_dense ? dense.hb : hb;
        const int64_t out = static_cast<int64_t>(s) * inter;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + wn * Cfg::WN + ni * 8 + 2 * tq + c;
            if (n < inter) store_bf16(out_pair, out + n, silu(acc[0][mi][ni][2 * half + c]) * acc[NB - 1][mi][ni][2 * half + c]);
          }
      } else {
        const int pair = is_dense ? 0 : groups.sorted_pairs[s];
        const int t = is_dense ? s : pair / top_k, j = is_dense ? num_slots - 1 : pair % top_k;
        const float weight = is_dense ? 1.0f : topk_weights[pair];
        float* out = ffn_out + (static_cast<int64_t>(t) * num_slots + j) * hidden;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + wn * Cfg::WN + ni * 8 + 2 * tq + c;
            if (n < hidden) out[n] = weight * acc[0][mi][ni][2 * half + c];
          }
      }
    }
  }
}

// ---- the grouped GEMM on Hopper (sm_90a): wgmma ------------------------------------------------------
//
// The same products as grouped_gemm_kernel's, one activation term (the two-term products of
// --matmul-precision high keep mma.sync). A CTA of WGS warpgroups computes one tile of 64 WGS rows (the
// tiles of align_by_expert: 64 rows for decode batches, 128 for prefill) against 128 gate columns and the
// 128 matching up columns (GATED) or 256 down columns. Warpgroup w owns rows 64w..64w+63 and, per k16
// step, issues two m64n128k16 (gate and up, or the two halves of the columns) from shared memory; a
// warpgroup without rows in the tile issues none. Operands go global -> shared with cp.async into the
// 128-byte-swizzled layout the descriptors describe (wgmma.cuh), 64 k a stage, STAGES - 2 stages ahead of
// the products: decode tiles (5 stages, one warpgroup) keep three stages of weights in flight, near the
// bandwidth; prefill tiles (4 stages, two warpgroups) two, with one batch of products running behind.
//
// TAIL (prefill): a tile may carry up to TAIL rows past its BM (find_gemm_tile), an expert's last few
// rows, which would otherwise take a tile of their own: a second CTA streaming the same weights and
// multiplying a full m64 block for a handful of rows (at 2048 tokens most experts have 128 + ~8 rows). The
// tail's rows sit between the activations and the weights of each stage, and the products run with the
// roles swapped: the weights' four m64 blocks as A, the tail's rows as an n8..n32 B (wgmma_m64nNk16),
// warpgroup w taking blocks w and w + 2 (gate and up of the same columns when GATED).
template <int WGS_, int STAGES_, int TAIL_ = 0>
struct WgmmaGemm {
  static constexpr int WGS = WGS_, STAGES = STAGES_, TAIL = TAIL_;
  static constexpr int BM = 64 * WGS, THREADS = 128 * WGS, BK = 64;
  static constexpr int HALF = 128;                 // columns of one m64n128 product
  static constexpr int B_ROWS = 2 * HALF;          // weight rows a stage holds
  static constexpr int ROW_BYTES = BK * 2;         // 128: one swizzle atom's width
  static constexpr int A_BYTES = BM * ROW_BYTES, TAIL_BYTES = TAIL * ROW_BYTES, B_OFFSET = A_BYTES + TAIL_BYTES;
  static constexpr int STAGE_BYTES = B_OFFSET + B_ROWS * ROW_BYTES;
  static constexpr int COPY_ROWS = THREADS / 8;    // rows one pass of the threads copies (8 chunks a row)
  static constexpr int A_ITERS = BM / COPY_ROWS, B_ITERS = B_ROWS / COPY_ROWS, TAIL_ITERS = TAIL / COPY_ROWS;
  static constexpr size_t SMEM_BYTES = static_cast<size_t>(STAGES) * STAGE_BYTES + 1024;  // + base alignment
  __host__ __device__ static constexpr int columns(bool gated) { return gated ? HALF : 2 * HALF; }
  static_assert(STAGE_BYTES % 1024 == 0, "every stage's operands start 1024-aligned");
  static_assert(A_ITERS * COPY_ROWS == BM && B_ITERS * COPY_ROWS == B_ROWS, "whole rows per copy pass");
  static_assert(TAIL_ITERS * COPY_ROWS == TAIL && TAIL <= 32 && (TAIL == 0 || WGS == 2),
                "a tail of whole copy passes, at most n32, the weights' four m64 blocks over two warpgroups");
  static_assert(SMEM_BYTES <= 227 * 1024, "fits sm_90's shared memory per block");
};
using WgmmaDecode = WgmmaGemm<1, 5>;
using WgmmaPrefill = WgmmaGemm<2, 4, 32>;

// As grouped_gemm_kernel (GATED: hb[s, n] = silu(a[s] . gate[n]) * (a[s] . up[n]); else ffn_out[t, j, n] =
// topk_weights[pair] * (hb[s] . down[n]); the dense group as there). 1-D grid: dense.blocks dense tiles
// (row tile fastest) and max_tiles x ceil(N / columns) routed ones (tile fastest), in find_gemm_tile's
// order; tiles past *num_tiles exit. Dynamic shared memory: Cfg::SMEM_BYTES. tail: Cfg::TAIL, or 0 (MOESCOPE_CUDA_TAIL=0).
template <bool GATED, class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1)
    grouped_gemm_wgmma_kernel(bf16* hb, float* ffn_out, int num_slots, const bf16* a_src, const float* topk_weights,
                              ExpertWeights w, ExpertGroups groups, int hidden, int top_k, DenseTiles dense,
                              int max_tiles, int tail) {
#if MOESCOPE_WGMMA
  constexpr int BM = Cfg::BM, BK = Cfg::BK, STAGES = Cfg::STAGES, HALF = Cfg::HALF;
  constexpr int A_ITERS = Cfg::A_ITERS, B_ITERS = Cfg::B_ITERS, COPY_ROWS = Cfg::COPY_ROWS;
  constexpr int COLUMNS = Cfg::columns(GATED);
  extern __shared__ __align__(16) unsigned char wgmma_smem[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(wgmma_smem)) + 1023) & ~1023u;
  wait_for_previous_kernel();

  GemmTile tile;
  if (!find_gemm_tile<GATED>(tile, static_cast<int>(blockIdx.x), BM, COLUMNS, w, groups, dense, hidden, max_tiles,
                             min(tail, Cfg::TAIL)))
    return;
  const bool is_dense = tile.dense;
  const int row0 = tile.row0, rows = tile.rows, n0 = tile.n0, inter = tile.inter;
  const bf16* const b_base = tile.b;
  const int n_total = GATED ? inter : hidden, k_total = GATED ? hidden : inter;
  // The activations: rows gathered by token (gate/up: routed rows are pairs), or the tile's rows in order.
  const bf16* const a_in = is_dense && !GATED ? dense.a.hi : a_src;
  const int tail_rows = rows - min(rows, BM);  // block-uniform; at most Cfg::TAIL

  // Copies: thread tid moves chunk tid % 8 of rows tid / 8 + COPY_ROWS * i; every such row has the same
  // row % 8, so the chunk's swizzled place in its row is the thread's own.
  const int tid = threadIdx.x, chunk = tid & 7, copy_row = tid >> 3;
  const int swizzled = ((chunk ^ (copy_row & 7)) << 4) + copy_row * Cfg::ROW_BYTES;
  // This thread's chunk of the activation row for tile row r (copied: r < rows), or of row 0 (not copied).
  auto a_chunk = [&](int r, bool copied) {
    const int64_t a_row = !copied ? 0 : GATED && !is_dense ? groups.sorted_pairs[row0 + r] / top_k : row0 + r;
    return a_in + a_row * k_total + chunk * 8;
  };
  const bf16* a_ptr[A_ITERS];
  bool a_copy[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int r = copy_row + i * COPY_ROWS;
    a_copy[i] = r < rows;  // rows past the tile's are left as they are: only their own outputs see them
    a_ptr[i] = a_chunk(r, a_copy[i]);
  }
  constexpr int TAIL_SLOTS = Cfg::TAIL_ITERS > 0 ? Cfg::TAIL_ITERS : 1;
  const bf16* t_ptr[TAIL_SLOTS];
  bool t_copy[TAIL_SLOTS];
#pragma unroll
  for (int i = 0; i < TAIL_SLOTS; ++i) {
    const int r = BM + copy_row + i * COPY_ROWS;
    t_copy[i] = i < Cfg::TAIL_ITERS && r < rows;
    t_ptr[i] = a_chunk(r, t_copy[i]);
  }
  const bf16* b_ptr[B_ITERS];
  bool b_ok[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int r = copy_row + i * COPY_ROWS;  // weight row of the stage: gate (r < HALF) or up, or column n0 + r
    const int n = GATED ? n0 + r % HALF : n0 + r;
    b_ok[i] = n < n_total;
    b_ptr[i] = b_base + static_cast<int64_t>(b_ok[i] ? (GATED ? (r / HALF) * inter + n : n) : 0) * k_total + chunk * 8;
  }
  auto load_stage = [&](int stage, int k0) {
    const uint32_t st = smem + stage * Cfg::STAGE_BYTES + swizzled;
    const bool k_ok = k0 + chunk * 8 < k_total;  // k_total % 8 == 0: a chunk is all in or all out
    const int kc = k_ok ? k0 : 0;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i)
      if (a_copy[i]) cp_async16_shared(st + i * COPY_ROWS * Cfg::ROW_BYTES, a_ptr[i] + kc, k_ok);
#pragma unroll
    for (int i = 0; i < Cfg::TAIL_ITERS; ++i)
      if (t_copy[i]) cp_async16_shared(st + Cfg::A_BYTES + i * COPY_ROWS * Cfg::ROW_BYTES, t_ptr[i] + kc, k_ok);
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i)
      cp_async16_shared(st + Cfg::B_OFFSET + i * COPY_ROWS * Cfg::ROW_BYTES, b_ptr[i] + kc, b_ok[i] && k_ok);
  };

  float acc[2][64];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0.0f;
  float acc_t[2][16];  // the tail (Cfg::TAIL > 0): weight rows 64 (wg + 2j) + .. against the tail's rows
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int i = 0; i < 16; ++i) acc_t[j][i] = 0.0f;
  const int wg = tid >> 7;
  const bool wg_rows = rows > wg * 64;  // warpgroup-uniform

  // Pipeline: group i copies k tile i, STAGES - 2 tiles ahead of the products, which run one batch behind
  // the issue: at iteration kt, tile kt's copies are waited for and published by the barrier, tile
  // kt + STAGES - 2 is copied into the stage of tile kt - 2 (every warpgroup finished those products before
  // the barrier: it waited for all but its last batch), and tile kt's products are issued while kt - 1's
  // may still run. Empty groups past the end keep the count uniform.
  static_assert(STAGES >= 3, "a stage being filled, one being multiplied, one whose products may still run");
  const int num_k = (k_total + BK - 1) / BK;
  // The main loop for a tail of TN columns (0: none), chosen once per CTA: a branch around the tail's
  // products inside it would make the compiler fence the accumulators again before them.
  auto main_loop = [&]<int TN>() {
    auto fence_accumulators = [&] {  // the registers the issued products write, for the compiler
      wgmma_fence_operands(acc[0]);
      wgmma_fence_operands(acc[1]);
      if constexpr (TN > 0) {
        wgmma_fence_operands(acc_t[0]);
        wgmma_fence_operands(acc_t[1]);
      }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
      if (s < num_k) load_stage(s, s * BK);
      cp_async_commit();
    }
    for (int kt = 0; kt < num_k; ++kt) {
      cp_async_wait<STAGES - 3>();
      fence_proxy_async();  // this thread's copies of tile kt, visible to the tensor cores
      __syncthreads();
      {
        const int next = kt + STAGES - 2;
        if (next < num_k) load_stage(next % STAGES, next * BK);
        cp_async_commit();
      }
      if (!wg_rows) continue;
      const uint32_t a = smem + (kt % STAGES) * Cfg::STAGE_BYTES + wg * 64 * Cfg::ROW_BYTES;
      const uint32_t b = smem + (kt % STAGES) * Cfg::STAGE_BYTES + Cfg::B_OFFSET;
      wgmma_fence();
      fence_accumulators();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint64_t a_desc = wgmma_desc(a + kk * 32);
        wgmma_m64n128k16(acc[0], a_desc, wgmma_desc(b + kk * 32));
        wgmma_m64n128k16(acc[1], a_desc, wgmma_desc(b + HALF * Cfg::ROW_BYTES + kk * 32));
        if constexpr (TN > 0) {  // the tail's products, roles swapped: d[weight row][tail row]
          const uint64_t t_desc = wgmma_desc(smem + (kt % STAGES) * Cfg::STAGE_BYTES + Cfg::A_BYTES + kk * 32);
          wgmma_m64nNk16<TN>(acc_t[0], wgmma_desc(b + wg * 64 * Cfg::ROW_BYTES + kk * 32), t_desc);
          wgmma_m64nNk16<TN>(acc_t[1], wgmma_desc(b + (wg + 2) * 64 * Cfg::ROW_BYTES + kk * 32), t_desc);
        }
      }
      wgmma_commit();
      wgmma_wait<1>();
      fence_accumulators();
    }
    wgmma_wait<0>();
    fence_accumulators();
  };
  if constexpr (Cfg::TAIL > 0) {
    if (tail_rows == 0) main_loop.template operator()<0>();
    else if (tail_rows <= 8) main_loop.template operator()<8>();
    else if (tail_rows <= 16) main_loop.template operator()<16>();
    else if (tail_rows <= 24) main_loop.template operator()<24>();
    else main_loop.template operator()<32>();
  } else {
    main_loop.template operator()<0>();
  }
  cp_async_wait<0>();  // only empty groups remain; nothing in flight at exit
  if (!wg_rows) return;

  // Where sorted row s's outputs go: gate/up, its row of hb; down, its token's slot of ffn_out, with the
  // routing weight it is scaled by.
  auto gated_row = [&](int s) { return (is_dense ? dense.hb.hi : hb) + static_cast<int64_t>(s) * inter; };
  auto down_row = [&](int s, float& weight) {
    const int pair = is_dense ? 0 : groups.sorted_pairs[s];
    const int t = is_dense ? s : pair / top_k, j = is_dense ? num_slots - 1 : pair % top_k;
    weight = is_dense ? 1.0f : topk_weights[pair];
    return ffn_out + (static_cast<int64_t>(t) * num_slots + j) * hidden;
  };

  // Epilogue. acc[h][4i + c]: row 64 wg + 16 (warp % 4) + g + 8 (c / 2), column 8i + 2tq + c % 2 of half h.
  const int lane = tid & 31, g = lane >> 2, tq = lane & 3, warp_row = wg * 64 + ((tid >> 5) & 3) * 16 + g;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp_row + 8 * half;
    if (r >= rows) continue;
    const int s = row0 + r;
    if constexpr (GATED) {
      bf16* const out = gated_row(s);
#pragma unroll
      for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int n = n0 + 8 * i + 2 * tq + c;
          if (n < inter) out[n] = float_to_bf16(silu(acc[0][4 * i + 2 * half + c]) * acc[1][4 * i + 2 * half + c]);
        }
    } else {
      float weight;
      float* const out = down_row(s, weight);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 16; ++i)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int n = n0 + h * HALF + 8 * i + 2 * tq + c;
            if (n < hidden) out[n] = weight * acc[h][4 * i + 2 * half + c];  // 1 * x is x exactly
          }
    }
  }
  if constexpr (Cfg::TAIL > 0) {
    if (tail_rows == 0) return;
    // acc_t[j][4i + c]: weight row 64 (wg + 2j) + m, m = 16 (warp % 4) + g + 8 (c / 2), against tail row
    // tt = 8i + 2tq + c % 2 (wgmma.cuh's layout with the roles swapped).
    const int m_base = ((tid >> 5) & 3) * 16 + g;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tt = 8 * i + 2 * tq + (c & 1), m = m_base + 8 * (c >> 1);
        if (tt >= tail_rows) continue;
        const int s = row0 + BM + tt;
        if constexpr (GATED) {
          const int n = n0 + 64 * wg + m;
          if (n < inter) gated_row(s)[n] = float_to_bf16(silu(acc_t[0][4 * i + c]) * acc_t[1][4 * i + c]);
        } else {
          float weight;
          float* const out = down_row(s, weight);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int n = n0 + 64 * (wg + 2 * h) + m;
            if (n < hidden) out[n] = weight * acc_t[h][4 * i + c];
          }
        }
      }
  }
#else
  (void)hb, (void)ffn_out, (void)num_slots, (void)a_src, (void)topk_weights, (void)w, (void)groups, (void)hidden,
      (void)top_k, (void)dense, (void)max_tiles, (void)tail;
#endif
}

// The 1-D grid of a grouped-GEMM launch (find_gemm_tile's order) for tiles of bm rows and bn columns:
// sets dense.blocks and returns the grid's size.
template <bool GATED>
int64_t grouped_gemm_blocks(DenseTiles& dense, int bm, int bn, int max_tiles, const ExpertWeights& w, int hidden) {
  dense.blocks = dense.tokens > 0 ? ceil_div(dense.tokens, bm) * ceil_div(GATED ? w.dense_inter : hidden, bn) : 0;
  return dense.blocks + static_cast<int64_t>(max_tiles) * ceil_div(GATED ? w.inter : hidden, bn);
}

template <bool GATED, class Cfg>
void launch_grouped_gemm_wgmma(int max_tiles, cudaStream_t stream, bf16* hb, float* ffn_out, int num_slots,
                               const bf16* a_src, const float* topk_weights, const ExpertWeights& w,
                               const ExpertGroups& groups, int hidden, int top_k, DenseTiles dense) {
  allow_dynamic_smem(grouped_gemm_wgmma_kernel<GATED, Cfg>, Cfg::SMEM_BYTES);
  const int64_t blocks = grouped_gemm_blocks<GATED>(dense, Cfg::BM, Cfg::columns(GATED), max_tiles, w, hidden);
  if (blocks == 0) return;
  launch_kernel(grouped_gemm_wgmma_kernel<GATED, Cfg>, static_cast<unsigned>(blocks), Cfg::THREADS, Cfg::SMEM_BYTES,
                stream, hb, ffn_out, num_slots, a_src, topk_weights, w, groups, hidden, top_k, dense, max_tiles,
                expert_tails_allowed() ? Cfg::TAIL : 0);
  CUDA_CHECK_LAUNCH();
}

__global__ void wgmma_probe_kernel(int* out) { *out = MOESCOPE_WGMMA; }

// Launches one configuration of the mma.sync kernel.
template <bool GATED, bool SPLIT, class Cfg>
void launch_grouped_gemm(int max_tiles, cudaStream_t stream, Bf16Pair hb, float* ffn_out, int num_slots,
                         ConstBf16Pair a_src, const float* topk_weights, const ExpertWeights& w,
                         const ExpertGroups& groups, int hidden, int top_k, DenseTiles dense) {
  allow_dynamic_smem(grouped_gemm_kernel<GATED, SPLIT, Cfg>, Cfg::SMEM_BYTES);
  const int64_t blocks = grouped_gemm_blocks<GATED>(dense, Cfg::BM, Cfg::BN, max_tiles, w, hidden);
  if (blocks == 0) return;
  launch_kernel(grouped_gemm_kernel<GATED, SPLIT, Cfg>, static_cast<unsigned>(blocks), Cfg::THREADS, Cfg::SMEM_BYTES,
                stream, hb, ffn_out, num_slots, a_src, topk_weights, w, groups, hidden, top_k, dense, max_tiles);
  CUDA_CHECK_LAUNCH();
}

// The configuration for tiles of `tile_rows` (expert_tile_rows: 64 or 128).
template <bool GATED, bool SPLIT>
void dispatch_grouped_gemm(int num_pairs, int num_experts, cudaStream_t stream, Bf16Pair hb, float* ffn_out,
                           int num_slots, ConstBf16Pair a_src, const float* topk_weights, const ExpertWeights& w,
                           const ExpertGroups& groups, int hidden, int top_k, const DenseTiles& dense) {
  const int tile_rows = expert_tile_rows(num_pairs, num_experts);
  const int max_tiles = max_expert_tiles(num_pairs, num_experts, tile_rows);
  if constexpr (!SPLIT) {
    if (wgmma_allowed() && wgmma_available()) {
      if (tile_rows == WgmmaPrefill::BM)
        return launch_grouped_gemm_wgmma<GATED, WgmmaPrefill>(max_tiles, stream, hb.hi, ffn_out, num_slots, a_src.hi,
                                                              topk_weights, w, groups, hidden, top_k, dense);
      return launch_grouped_gemm_wgmma<GATED, WgmmaDecode>(max_tiles, stream, hb.hi, ffn_out, num_slots, a_src.hi,
                                                           topk_weights, w, groups, hidden, top_k, dense);
    }
  }
  if (tile_rows == PrefillGemm<GATED, SPLIT>::BM)
    launch_grouped_gemm<GATED, SPLIT, PrefillGemm<GATED, SPLIT>>(max_tiles, stream, hb, ffn_out, num_slots, a_src,
                                                                 topk_weights, w, groups, hidden, top_k, dense);
  else
    launch_grouped_gemm<GATED, SPLIT, DecodeGemm<GATED, SPLIT>>(max_tiles, stream, hb, ffn_out, num_slots, a_src,
                                                                topk_weights, w, groups, hidden, top_k, dense);
}

static_assert(DecodeGemm<true, false>::BM == k_expert_tile_rows, "the decode tiles are align_by_expert's small tiles");
static_assert(PrefillGemm<true, false>::BM == k_expert_tile_rows_large, "the prefill tiles are its large ones");
static_assert(WgmmaDecode::BM == k_expert_tile_rows && WgmmaPrefill::BM == k_expert_tile_rows_large,
              "the wgmma configurations' tiles are align_by_expert's");

}  // namespace

bool wgmma_available() {
  static PerDeviceCache cache{};  // 1: no, 2: yes
  return once_per_device(cache, [](int device) {
    int major = 0, has = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major == 9) {  // the sm_90a code runs on compute capability 9.0 only
      DeviceBuffer<int> flag(1);
      wgmma_probe_kernel<<<1, 1>>>(flag.data());
      CUDA_CHECK_LAUNCH();
      CUDA_CHECK(cudaMemcpy(&has, flag.data(), sizeof has, cudaMemcpyDeviceToHost));
    }
    return has != 0 ? 2 : 1;
  }) == 2;
}

void experts_gate_up_small(float* h, int ld_h, const float* x, const ExpertWeights& w, const ExpertGroups& groups,
                           int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream,
                           const DenseNorm& dn) {
  if (num_tokens == 0) return;
  if (num_tokens > k_small_batch_max_tokens) argument_error("experts_gate_up_small", "too many tokens for the small path");
  if (hidden % 8 != 0 || ld_h % 8 != 0) argument_error("experts_gate_up_small", "hidden and ld_h must be multiples of 8");
  const int num_pairs = num_tokens * top_k;
  const int routed_groups = num_experts > 0 ? std::min(num_experts, num_pairs) : 0;
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    constexpr int C = small_rows_per_warp(MAXT) > 1 ? small_rows_per_warp(MAXT) / 2 : 1;  // columns per warp
    const int blocks_per_routed = ceil_div(w.inter, k_small_warps * C);
    const int dense_blocks = w.dense_gate_up != nullptr ? ceil_div(w.dense_inter, k_small_warps * C) : 0;
    const int blocks = routed_groups * blocks_per_routed + dense_blocks;
    if (blocks == 0) return;
    // The dense group's own norm for one or two tokens (a decode step of one or two sequences), whose
    // staged rows cost the routed blocks little shared memory: up to 16 KB a block at hidden 2048.
    const size_t norm_smem = static_cast<size_t>(num_tokens) * hidden * sizeof(float);
    if constexpr (MAXT <= 2) {
      if (dn.weight != nullptr && dense_blocks > 0 && norm_smem <= 48 * 1024) {
        launch_kernel(gate_up_small_kernel<MAXT, C, true>, blocks, k_small_warps * 32, norm_smem, stream, h, ld_h, x, w,
                      groups, num_tokens, hidden, top_k, routed_groups, blocks_per_routed, dn);
        return;
      }
    }
    launch_kernel(gate_up_small_kernel<MAXT, C, false>, blocks, k_small_warps * 32, 0, stream, h, ld_h, x, w, groups,
                  num_tokens, hidden, top_k, routed_groups, blocks_per_routed, DenseNorm{});
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
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    constexpr int R = small_rows_per_warp(MAXT);
    const int blocks_per_routed = ceil_div(hidden, k_small_warps * R);
    const int dense_blocks = w.dense_down != nullptr ? blocks_per_routed : 0;
    const int blocks = routed_groups * blocks_per_routed + dense_blocks;
    if (blocks > 0)
      launch_kernel(down_small_kernel<MAXT, R>, blocks, k_small_warps * 32, 0, stream, ffn_out, num_slots, h, ld_h,
                    topk_weights, w, groups, num_tokens, hidden, top_k, routed_groups, blocks_per_routed);
  });
  CUDA_CHECK_LAUNCH();
}

void experts_down_fold(float* x, const float* h, int ld_h, const int32_t* topk_ids, const float* topk_weights,
                       const float* shared_gate, const ExpertWeights& w, int hidden, int top_k, cudaStream_t stream) {
  if ((top_k > 0 && w.inter % 8 != 0) || (w.dense_down != nullptr && w.dense_inter % 8 != 0))
    argument_error("experts_down_fold", "intermediate sizes must be multiples of 8");
  if (top_k == 0 && w.dense_down == nullptr) return;
  launch_kernel(down_fold_kernel, ceil_div(hidden, k_small_warps), k_small_warps * 32, 0, stream, x, h, ld_h, topk_ids,
                topk_weights, shared_gate, w, hidden, top_k);
  CUDA_CHECK_LAUNCH();
}

void experts_gate_up_grouped(Bf16Pair hb, ConstBf16Pair xb, const ExpertWeights& w, const ExpertGroups& groups,
                             int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream,
                             Bf16Pair dense_hb) {
  const int num_pairs = num_tokens * top_k;
  if (num_pairs == 0 || num_experts == 0) return;
  const bool with_dense = dense_hb.hi != nullptr;
  if (hidden % 8 != 0) argument_error("experts_gate_up_grouped", "hidden must be a multiple of 8");
  if ((xb.lo == nullptr) != (hb.lo == nullptr) || (with_dense && (xb.lo == nullptr) != (dense_hb.lo == nullptr)))
    argument_error("experts_gate_up_grouped", "the input and the outputs have a lo term together or not at all");
  if (with_dense && w.dense_gate_up == nullptr) argument_error("experts_gate_up_grouped", "a dense output without dense weights");
  DenseTiles dense{dense_hb, {}, with_dense ? num_tokens : 0, 0};
  dense.spread = expert_tile_rows(num_pairs, num_experts) == k_expert_tile_rows_large;
  if (xb.lo != nullptr)
    dispatch_grouped_gemm<true, true>(num_pairs, num_experts, stream, hb, nullptr, 0, xb, nullptr, w, groups, hidden,
                                      top_k, dense);
  else
    dispatch_grouped_gemm<true, false>(num_pairs, num_experts, stream, hb, nullptr, 0, xb, nullptr, w, groups, hidden,
                                       top_k, dense);
}

void experts_down_grouped(float* ffn_out, int num_slots, ConstBf16Pair hb, const float* topk_weights,
                          const ExpertWeights& w, const ExpertGroups& groups, int num_tokens, int hidden,
                          int num_experts, int top_k, cudaStream_t stream, ConstBf16Pair dense_hb) {
  const int num_pairs = num_tokens * top_k;
  if (num_pairs == 0 || num_experts == 0) return;
  const bool with_dense = dense_hb.hi != nullptr;
  if (w.inter % 8 != 0 || (with_dense && w.dense_inter % 8 != 0))
    argument_error("experts_down_grouped", "intermediate sizes must be multiples of 8");
  if (with_dense && ((hb.lo == nullptr) != (dense_hb.lo == nullptr)))
    argument_error("experts_down_grouped", "the routed and the dense inputs have a lo term together or not at all");
  if (with_dense && w.dense_down == nullptr) argument_error("experts_down_grouped", "a dense input without dense weights");
  DenseTiles dense{{}, dense_hb, with_dense ? num_tokens : 0, 0};
  dense.spread = expert_tile_rows(num_pairs, num_experts) == k_expert_tile_rows_large;
  if (hb.lo != nullptr)
    dispatch_grouped_gemm<false, true>(num_pairs, num_experts, stream, nullptr, ffn_out, num_slots, hb, topk_weights, w,
                                       groups, hidden, top_k, dense);
  else
    dispatch_grouped_gemm<false, false>(num_pairs, num_experts, stream, nullptr, ffn_out, num_slots, hb, topk_weights, w,
                                        groups, hidden, top_k, dense);
}

}  // namespace moescope::cuda
