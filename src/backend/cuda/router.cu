// The router in one kernel per pass and layer (logits, softmax, top-k, renormalisation, the shared
// expert's gate), writing the routes straight into the pass's routing buffer; then the token-expert
// pairs grouped by expert for the expert kernels. Small passes do all of it, and the post-attention
// RMSNorm before it, in one launch (router_small).
#include <climits>

#include "backend/cuda/gemv.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_max_top_k = 32;

// Token t's routes from its router logits, by one whole warp. probs: [num_experts (+1: the shared
// expert's gate logit)] in shared memory, the logits on entry (overwritten); chosen_ids, chosen_weights:
// [top_k] in shared memory, the choice on return. Writes topk_ids/topk_weights[t], shared_gate[t] and
// the tallies.
__device__ void route_token(float* probs, int32_t* chosen_ids, float* chosen_weights, int t, int num_experts, int top_k,
                            bool norm_topk_prob, int32_t* topk_ids, float* topk_weights, float* shared_gate,
                            ExpertCounts counts) {
  const int lane = threadIdx.x & 31;
  // Softmax over the experts in f32, as HF (softmax(router_logits, dtype=torch.float)).
  float max_logit = -INFINITY;
  for (int e = lane; e < num_experts; e += 32) max_logit = fmaxf(max_logit, probs[e]);
  max_logit = warp_max(max_logit);
  float sum = 0.0f;
  for (int e = lane; e < num_experts; e += 32) {
    const float p = expf(probs[e] - max_logit);
    probs[e] = p;
    sum += p;
  }
  sum = warp_sum(sum);
  for (int e = lane; e < num_experts; e += 32) probs[e] /= sum;
  __syncwarp();

  // torch.topk order: larger probability first, the lower expert id on equal probabilities. A chosen
  // expert is marked -1 (probabilities are >= 0) so the next round skips it.
  for (int j = 0; j < top_k; ++j) {
    float best = -1.0f;
    int best_e = INT_MAX;
    for (int e = lane; e < num_experts; e += 32) {  // ascending ids: strict > keeps the lowest of equals
      const float p = probs[e];
      if (p > best) {
        best = p;
        best_e = e;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(k_full_mask, best, offset);
      const int other_e = __shfl_xor_sync(k_full_mask, best_e, offset);
      if (other > best || (other == best && other_e < best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    if (best_e == INT_MAX) best_e = 0;  // only with NaN logits; keeps the id in range
    if (lane == 0) {
      chosen_ids[j] = best_e;
      chosen_weights[j] = best;
    }
    if (lane == best_e % 32) probs[best_e] = -1.0f;
    __syncwarp();
  }
  if (lane == 0) {
    float chosen_sum = 0.0f;
    for (int j = 0; j < top_k; ++j) chosen_sum += chosen_weights[j];
    for (int j = 0; j < top_k; ++j) {
      const float weight = norm_topk_prob ? chosen_weights[j] / chosen_sum : chosen_weights[j];
      topk_ids[static_cast<int64_t>(t) * top_k + j] = chosen_ids[j];
      topk_weights[static_cast<int64_t>(t) * top_k + j] = weight;
      if (counts.counts != nullptr) {
        atomicAdd(&counts.counts[chosen_ids[j]], 1);
        atomicAdd(&counts.weight_sums[chosen_ids[j]], __float2ull_rn(weight * 4294967296.0f));
      }
    }
    if (shared_gate != nullptr) shared_gate[t] = 1.0f / (1.0f + expf(-probs[num_experts]));
  }
  __syncwarp();
}

// Blocks of 8 warps over TT tokens each. A warp dots R router rows at a time with every token of the
// block (warp_dot_rows: each row read once for the TT tokens, each token's vector once for the R rows; the
// sum for one (token, row) runs in the same order whatever TT and R, so the logits do not depend on them),
// then warp t routes the block's token t. More tokens a block cut the router's reads of its weights (a
// block per token read them T times from L2: 2 GB a layer at 8192 tokens); fewer keep enough blocks for
// decode batches. Dynamic shared memory: [TT][num_experts + 1] logits. topk_ids, topk_weights: [T, top_k];
// shared_gate: [T] or null; x: [T, hidden]; w: [E (+1), hidden].
// The warp dots all TT tokens with no per-token branch (xs are clamped to real tokens), which unpacks each
// weight once for all of them; at TT = 8 that takes ~170 registers, so one block an SM (the bound below lets
// ptxas use them rather than spill).
constexpr int k_router_warps = 8, k_router_rows = 4;
template <int TT>
__global__ void __launch_bounds__(k_router_warps * 32, 1)
    router_topk_kernel(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                       int num_tokens, int hidden, int num_experts, int top_k, bool norm_topk_prob, ExpertCounts counts) {
  static_assert(TT <= k_router_warps, "warp t routes token t");
  extern __shared__ float probs[];
  __shared__ int32_t chosen_ids[TT][k_max_top_k];
  __shared__ float chosen_weights[TT][k_max_top_k];
  wait_for_previous_kernel();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t0 = blockIdx.x * TT, n = min(TT, num_tokens - t0), stride = num_experts + 1;

  // Logits in f32 (the gate row of the shared expert, when there is one, comes after the experts).
  const int rows = num_experts + (shared_gate != nullptr ? 1 : 0);
  const float* xs[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) xs[t] = x + static_cast<int64_t>(t0 + min(t, n - 1)) * hidden;
  for (int r0 = warp * k_router_rows; r0 < rows; r0 += k_router_warps * k_router_rows) {
    const bf16* wr[k_router_rows];
#pragma unroll
    for (int r = 0; r < k_router_rows; ++r) wr[r] = w + static_cast<int64_t>(min(r0 + r, rows - 1)) * hidden;
    float acc[TT][k_router_rows];
    warp_dot_rows<k_router_rows, TT, false, true>(acc, wr, xs, n, hidden);  // xs clamped above
    if (lane == 0)
#pragma unroll
      for (int t = 0; t < TT; ++t)
#pragma unroll
        for (int r = 0; r < k_router_rows; ++r)
          if (t < n && r0 + r < rows) probs[t * stride + r0 + r] = acc[t][r];
  }
  __syncthreads();
  if (warp < n)
    route_token(probs + warp * stride, chosen_ids[warp], chosen_weights[warp], t0 + warp, num_experts, top_k,
                norm_topk_prob, topk_ids, topk_weights, shared_gate, counts);
}

// Large passes: router_topk_kernel with the block's TT activation rows staged in shared memory (read
// once from global memory, then by every warp from there) and each warp's next weight vectors loaded
// while it multiplies the current ones. Warp w takes router rows 4 w .. 4 w + 3, then 4 (w + 8) .., and
// dots them with the TT tokens exactly as warp_dot_rows does (lane l: vectors l, l + 32, .. in that order,
// one dot8 each, then warp_sum), so every logit, and so every route, is the same to the bit as
// router_topk_kernel's; what changes is the traffic: the 1-block-an-SM kernel above reloads each token's
// row from L1 for each of its row groups and waits on each step's weights. 64 registers' worth of
// accumulators and weights, two blocks an SM. Dynamic shared memory: [TT][hidden] activations (below), then
// [TT][num_experts + 1] logits.
constexpr int k_router_staged_warps = 8, k_router_staged_rows = 4;
template <int TT>
__global__ void __launch_bounds__(k_router_staged_warps * 32, 2)
    router_staged_kernel(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                         int num_tokens, int hidden, int num_experts, int top_k, bool norm_topk_prob,
                         ExpertCounts counts) {
  static_assert(TT <= k_router_staged_warps, "warp t routes token t");
  constexpr int R = k_router_staged_rows;
  extern __shared__ float4 router_staged_smem[];
  float* const probs = reinterpret_cast<float*>(router_staged_smem + TT * 2 * (hidden >> 3));  // after x
  __shared__ int32_t chosen_ids[TT][k_max_top_k];
  __shared__ float chosen_weights[TT][k_max_top_k];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t0 = blockIdx.x * TT, n = min(TT, num_tokens - t0), stride = num_experts + 1;
  const int rows = num_experts + (shared_gate != nullptr ? 1 : 0), num_vec = hidden >> 3;

  // The weight vectors lane l takes next: rows r0 .. r0 + R - 1 (clamped), vector v.
  auto load_rows = [&](uint4 (&dst)[R], int r0, int v) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      dst[r] = v < num_vec ? load_stream(w + static_cast<int64_t>(min(r0 + r, rows - 1)) * hidden + v * 8)
                           : make_uint4(0, 0, 0, 0);
  };
  // This warp's first weight vectors need nothing from the previous kernel.
  int r0 = warp * R;
  uint4 cur[R], next[R] = {};
  load_rows(cur, r0, lane);
  wait_for_previous_kernel();
  // The block's rows of x (rows past n: zeros, their sums are dropped), all of a thread's loads in flight,
  // vector v's two halves in two planes ([TT][2][num_vec] float4), so that the lanes' loads below are
  // consecutive 16-byte words (no bank conflicts).
  block_stage_l2<16>(router_staged_smem, reinterpret_cast<const float4*>(x + static_cast<int64_t>(t0) * hidden),
                     n * 2 * num_vec, TT * 2 * num_vec, [num_vec](int i) {
                       const int t = i / (2 * num_vec), q = i % (2 * num_vec);
                       return (2 * t + (q & 1)) * num_vec + (q >> 1);
                     });
  __syncthreads();

  for (; r0 < rows; r0 += k_router_staged_warps * R) {
    float acc[TT][R];
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[t][r] = 0.0f;
    for (int v = lane; v < num_vec; v += 32) {
      // The next vectors: this row group's at v + 32, or the first of the warp's next row group.
      if (v + 32 < num_vec) load_rows(next, r0, v + 32);
      else if (r0 + k_router_staged_warps * R < rows) load_rows(next, r0 + k_router_staged_warps * R, lane);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float4 a = router_staged_smem[2 * t * num_vec + v], b = router_staged_smem[(2 * t + 1) * num_vec + v];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[t][r] = dot8(cur[r], a, b, acc[t][r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) cur[r] = next[r];
    }
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float sum = warp_sum(acc[t][r]);
        if (lane == 0 && t < n && r0 + r < rows) probs[t * stride + r0 + r] = sum;
      }
  }
  __syncthreads();
  if (warp < n)
    route_token(probs + warp * stride, chosen_ids[warp], chosen_weights[warp], t0 + warp, num_experts, top_k,
                norm_topk_prob, topk_ids, topk_weights, shared_gate, counts);
}

// ---- small passes: RMSNorm, router and grouping in one launch ----------------------------------------

constexpr int k_router_small_warps = 8;  // a router row per warp
static_assert(k_router_small_max_tokens <= k_router_small_warps, "the last block routes token t with warp t");

// grid (ceil(rows / 8), ceil(n / TPB)) blocks of 8 warps: block (b, y) takes router rows 8 b .. 8 b + 7 (a
// warp each) for tokens TPB y .. TPB y + TPB - 1 (n <= 8 tokens). Each warp issues its router row's first
// loads, waits for the previous kernel, and reads each of its tokens' residual rows once for two sums:
// x . x (the RMSNorm's) and w . (norm_weight * x), so that logit = inv_rms * that, with no barrier on the
// way (the norm is a scalar per token: HF's w . (norm_weight * (x * inv_rms)) in another order). The
// blocks b = 0 also write their tokens' normed rows h for the experts. The last block to finish (a ticket
// in global memory, reset by it for the next launch) routes token t with warp t and groups the pairs by
// expert. Dynamic shared memory: [n][rows] logits.
template <int TPB>
__global__ void __launch_bounds__(k_router_small_warps * 32)
    router_small_kernel(int32_t* topk_ids, float* topk_weights, float* shared_gate, float* h, const float* x,
                        const float* norm_weight, float eps, const bf16* w, int n, int hidden, int num_experts,
                        int top_k, bool norm_topk_prob, ExpertGroups g, ExpertCounts counts, float* logits,
                        unsigned* ticket) {
  extern __shared__ float router_smem[];
  __shared__ int32_t chosen_ids[k_router_small_warps][k_max_top_k];
  __shared__ float chosen_weights[k_router_small_warps][k_max_top_k];
  __shared__ bool last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = num_experts + (shared_gate != nullptr ? 1 : 0);
  const int row = blockIdx.x * k_router_small_warps + warp;
  const int t0 = blockIdx.y * TPB, nt = min(TPB, n - t0);  // this block's tokens
  const int num_vec = hidden >> 3;
  const bf16* const wr = w + static_cast<int64_t>(min(row, rows - 1)) * hidden;
  constexpr int U = 8;  // 16-byte loads per lane in flight
  uint4 wv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {  // the first of the row's weights, before the wait (they need nothing from it)
    const int v = u * 32 + lane;
    wv[u] = v < num_vec ? load_stream(wr + v * 8) : make_uint4(0, 0, 0, 0);
  }
  wait_for_previous_kernel();

  float dot[TPB] = {}, sum_sq[TPB] = {};
  for (int base = 0; base < num_vec; base += 32 * U) {
    if (base > 0)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = base + u * 32 + lane;
        wv[u] = v < num_vec ? load_stream(wr + v * 8) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = base + u * 32 + lane;
      if (v >= num_vec) continue;
      const float4 na = __ldg(reinterpret_cast<const float4*>(norm_weight + v * 8));
      const float4 nb = __ldg(reinterpret_cast<const float4*>(norm_weight + v * 8) + 1);
#pragma unroll
      for (int t = 0; t < TPB; ++t) {
        if (t >= nt) continue;
        // L1-cached: the block's eight warps read the same rows.
        const float4* xv = reinterpret_cast<const float4*>(x + static_cast<int64_t>(t0 + t) * hidden + v * 8);
        const float4 a = __ldca(xv), b = __ldca(xv + 1);
        sum_sq[t] = sum_squares8(a, b, sum_sq[t]);
        dot[t] = dot8(wv[u], make_float4(na.x * a.x, na.y * a.y, na.z * a.z, na.w * a.w),
                      make_float4(nb.x * b.x, nb.y * b.y, nb.z * b.z, nb.w * b.w), dot[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TPB; ++t) {
    if (t >= nt) continue;
    // Every warp adds the same terms in the same order: the same inv_rms in all of them.
    const float inv = warp_inv_rms(sum_sq[t], hidden, eps);
    const float logit = warp_sum(dot[t]) * inv;
    if (lane == 0 && row < rows) logits[(t0 + t) * rows + row] = logit;
    if (blockIdx.x == 0) {  // h = norm_weight * (x * inv_rms), as rms_norm; the block's warps take a slice each
      const float* xt = x + static_cast<int64_t>(t0 + t) * hidden;
      float* ht = h + static_cast<int64_t>(t0 + t) * hidden;
      for (int i = warp * 32 + lane; i < hidden; i += k_router_small_warps * 32) ht[i] = norm_weight[i] * (__ldcg(xt + i) * inv);
    }
  }

  // The last block to finish takes the routes.
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(ticket, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (tid == 0) *ticket = 0;  // for the next launch (launches on a stream run one after another)
  float* const probs = router_smem;  // [n][rows]
  if (warp < n) {
    for (int e = lane; e < rows; e += 32) probs[warp * rows + e] = __ldcg(logits + warp * rows + e);
    __syncwarp();
    route_token(probs + warp * rows, chosen_ids[warp], chosen_weights[warp], warp, num_experts, top_k, norm_topk_prob,
                topk_ids, topk_weights, shared_gate, counts);
  }
  __syncthreads();
  if (warp != 0) return;

  // The n * top_k pairs (p = t * top_k + j) grouped by expert, as align_by_expert: sorted by expert,
  // pair order within one. An expert has at most one pair per token, so at most n <= 8 pairs: one tile.
  const int num_pairs = n * top_k;
  auto id_of = [&](int p) { return chosen_ids[p / top_k][p % top_k]; };
  int num_active = 0;
  for (int e0 = 0; e0 <= num_experts; e0 += 32) {  // lane l: expert e0 + l (num_experts: the end offset)
    const int e = e0 + lane;
    int below = 0, own = 0;
    for (int q = 0; q < num_pairs; ++q) {
      const int f = id_of(q);
      below += f < e ? 1 : 0;
      own += f == e ? 1 : 0;
    }
    if (e <= num_experts) g.expert_offsets[e] = below;
    const unsigned active = __ballot_sync(k_full_mask, own > 0);
    if (own > 0) {
      const int a = num_active + __popc(active & ((1u << lane) - 1u));
      g.active_experts[a] = e;
      g.tile_expert[a] = e;
      g.tile_row[a] = below;
    }
    num_active += __popc(active);
  }
  for (int p = lane; p < num_pairs; p += 32) {
    const int e = id_of(p);
    int at = 0;
    for (int q = 0; q < num_pairs; ++q) {
      const int f = id_of(q);
      at += f < e || (f == e && q < p) ? 1 : 0;
    }
    g.sorted_pairs[at] = p;
  }
  if (lane == 0) {
    *g.num_active = num_active;
    *g.num_tiles = num_active;
  }
}

// One block. Each warp takes a contiguous chunk of the pairs and counts its pairs per expert; a scan
// over the warps gives each (warp, expert) its first sorted row, and thread 0 lays out the offsets, the
// active experts and the grouped GEMM's row tiles (tile_rows sorted rows each). Then each warp places its
// pairs in pair order, 32 at a time (__match_any_sync ranks the lanes of equal ids): every pair is read
// twice, whatever the number of experts. topk_ids: [num_pairs]. Dynamic shared memory: [warps][num_experts]
// counts (then next rows), [num_experts + 1] offsets.
__global__ void align_kernel(ExpertGroups g, const int32_t* topk_ids, int num_pairs, int num_experts, int tile_rows) {
  extern __shared__ int32_t align_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, num_warps = blockDim.x / 32;
  int32_t* const warp_rows = align_smem;                          // [num_warps][num_experts]
  int32_t* const offsets = align_smem + num_warps * num_experts;  // [num_experts + 1]
  wait_for_previous_kernel();
  for (int i = tid; i < num_warps * num_experts; i += blockDim.x) warp_rows[i] = 0;
  __syncthreads();
  const int chunk = (num_pairs + num_warps - 1) / num_warps;
  const int begin = min(num_pairs, warp * chunk), end = min(num_pairs, begin + chunk);
  for (int p = begin + lane; p < end; p += 32) atomicAdd(&warp_rows[warp * num_experts + topk_ids[p]], 1);
  __syncthreads();
  for (int e = tid; e < num_experts; e += blockDim.x) {  // each warp's first row within expert e; e's count
    int run = 0;
    for (int w = 0; w < num_warps; ++w) {
      const int count = warp_rows[w * num_experts + e];
      warp_rows[w * num_experts + e] = run;
      run += count;
    }
    offsets[e + 1] = run;
  }
  __syncthreads();
  if (tid == 0) {
    int num_active = 0, num_tiles = 0;
    offsets[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int count = offsets[e + 1];
      offsets[e + 1] = offsets[e] + count;
      if (count == 0) continue;
      g.active_experts[num_active++] = e;
      for (int r = offsets[e]; r < offsets[e + 1]; r += tile_rows) {
        g.tile_expert[num_tiles] = e;
        g.tile_row[num_tiles] = r;
        ++num_tiles;
      }
    }
    *g.num_active = num_active;
    *g.num_tiles = num_tiles;
  }
  __syncthreads();
  for (int e = tid; e <= num_experts; e += blockDim.x) g.expert_offsets[e] = offsets[e];
  for (int c = begin; c < end; c += 32) {
    const int p = c + lane;
    const bool in = p < end;
    const int e = in ? topk_ids[p] : -1;
    const unsigned same = __match_any_sync(k_full_mask, e);  // the lanes with this lane's expert
    if (in) g.sorted_pairs[offsets[e] + warp_rows[warp * num_experts + e] + __popc(same & ((1u << lane) - 1u))] = p;
    __syncwarp();
    if (in && lane == __ffs(same) - 1) warp_rows[warp * num_experts + e] += __popc(same);
    __syncwarp();
  }
}

}  // namespace

int64_t expert_groups_ints(int num_pairs, int num_experts) {
  return static_cast<int64_t>(num_pairs) + (num_experts + 1) + num_experts + 1 + 2 * max_expert_tiles(num_pairs, num_experts) + 1;
}

ExpertGroups carve_expert_groups(int32_t* memory, int num_pairs, int num_experts) {
  ExpertGroups g;
  const int max_tiles = max_expert_tiles(num_pairs, num_experts);
  g.sorted_pairs = memory;
  g.expert_offsets = g.sorted_pairs + num_pairs;
  g.active_experts = g.expert_offsets + num_experts + 1;
  g.num_active = g.active_experts + num_experts;
  g.tile_expert = g.num_active + 1;
  g.tile_row = g.tile_expert + max_tiles;
  g.num_tiles = g.tile_row + max_tiles;
  return g;
}

// The shapes both router launches take.
void check_router_shapes(const char* function, int hidden, int num_experts, int top_k) {
  if (top_k < 1 || top_k > k_max_top_k || top_k > num_experts) argument_error(function, "top_k must be in [1, min(32, num_experts)]");
  if (hidden % 8 != 0) argument_error(function, "hidden must be a multiple of 8");
}

void router_topk(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                 int num_tokens, int hidden, int num_experts, int top_k, bool norm_topk_prob, cudaStream_t stream,
                 ExpertCounts counts) {
  if (num_tokens == 0) return;
  check_router_shapes("router_topk", hidden, num_experts, top_k);
  // Tokens a block: as many as keep a block per SM or more (on the H100's 132: 1 up to 263 tokens, 8 from
  // 1056). The routes do not depend on it.
  auto run = [&]<int TT>() {
    const size_t smem = static_cast<size_t>(TT) * (num_experts + 1) * sizeof(float);
    allow_dynamic_smem(router_topk_kernel<TT>, smem);
    launch_kernel(router_topk_kernel<TT>, ceil_div(num_tokens, TT), k_router_warps * 32, smem, stream, topk_ids,
                  topk_weights, shared_gate, x, w, num_tokens, hidden, num_experts, top_k, norm_topk_prob, counts);
  };
  const int sms = multiprocessors();
  // From 8 tokens a block on, the staged kernel where its rows fit in shared memory (two blocks an SM
  // up to hidden 3328); MOESCOPE_CUDA_ROUTER_STAGED=0 keeps the kernel above.
  const size_t staged_smem = (static_cast<size_t>(8) * hidden + 8 * (num_experts + 1)) * sizeof(float);
  if (num_tokens >= 8 * sms && router_staged_allowed() && staged_smem <= 200 * 1024) {
    allow_dynamic_smem(router_staged_kernel<8>, staged_smem);
    launch_kernel(router_staged_kernel<8>, ceil_div(num_tokens, 8), k_router_staged_warps * 32, staged_smem, stream,
                  topk_ids, topk_weights, shared_gate, x, w, num_tokens, hidden, num_experts, top_k, norm_topk_prob,
                  counts);
  } else if (num_tokens >= 8 * sms) run.template operator()<8>();
  else if (num_tokens >= 4 * sms) run.template operator()<4>();
  else if (num_tokens >= 2 * sms) run.template operator()<2>();
  else run.template operator()<1>();
  CUDA_CHECK_LAUNCH();
}

void router_small(int32_t* topk_ids, float* topk_weights, float* shared_gate, float* h, const float* x,
                  const float* norm_weight, float eps, const bf16* w, int num_tokens, int hidden, int num_experts,
                  int top_k, bool norm_topk_prob, const ExpertGroups& groups, ExpertCounts counts, float* logits,
                  unsigned* ticket, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (num_tokens > k_router_small_max_tokens) argument_error("router_small", "more tokens than the small path takes");
  check_router_shapes("router_small", hidden, num_experts, top_k);
  const int rows = num_experts + (shared_gate != nullptr ? 1 : 0);
  // One token a block for up to two tokens (a decode of one sequence keeps few blocks), two from three on:
  // more warps, each with less to read.
  const size_t smem = static_cast<size_t>(num_tokens) * rows * sizeof(float);
  auto run = [&](auto kernel, int tokens_per_block) {
    allow_dynamic_smem(kernel, smem);
    launch_kernel(kernel, dim3(ceil_div(rows, k_router_small_warps), ceil_div(num_tokens, tokens_per_block)),
                  k_router_small_warps * 32, smem, stream, topk_ids, topk_weights, shared_gate, h, x, norm_weight, eps, w,
                  num_tokens, hidden, num_experts, top_k, norm_topk_prob, groups, counts, logits, ticket);
  };
  if (num_tokens <= 2) run(router_small_kernel<1>, 1);
  else run(router_small_kernel<2>, 2);
  CUDA_CHECK_LAUNCH();
}

void align_by_expert(const ExpertGroups& groups, const int32_t* topk_ids, int num_pairs, int num_experts,
                     cudaStream_t stream) {
  if (num_pairs == 0) return;
  // 32 warps where their counts fit in 40 KB of shared memory (up to 312 experts), fewer beyond.
  const int warps = std::clamp((40 * 1024 / 4 - num_experts - 1) / std::max(num_experts, 1), 1, 32);
  const size_t smem = (static_cast<size_t>(warps) * num_experts + num_experts + 1) * sizeof(int32_t);
  allow_dynamic_smem(align_kernel, smem);
  launch_kernel(align_kernel, 1, warps * 32, smem, stream, groups, topk_ids, num_pairs, num_experts,
                expert_tile_rows(num_pairs, num_experts));
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
