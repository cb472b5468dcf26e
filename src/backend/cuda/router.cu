// The router in one kernel per pass and layer (logits, softmax, top-k, renormalisation, the shared
// expert's gate), writing the routes straight into the pass's routing buffer; then the token-expert
// pairs grouped by expert for the expert kernels.
#include <climits>

#include "backend/cuda/gemv.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_max_top_k = 32;

// One block per token (1024 threads for a few tokens: a decode's router is one block, so its warps
// should be many). Dynamic shared memory: logits, then probabilities, [num_experts + 1].
// topk_ids, topk_weights: [T, top_k]; shared_gate: [T] or null; x: [T, hidden]; w: [E (+1), hidden].
// With group_single_token (one token, one block), also writes the ExpertGroups of its top_k pairs.
__global__ void __launch_bounds__(1024)
    router_topk_kernel(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                       int hidden, int num_experts, int top_k, bool norm_topk_prob, ExpertGroups g,
                       bool group_single_token, ExpertCounts counts) {
  extern __shared__ float probs[];
  __shared__ int32_t chosen_ids[k_max_top_k];
  __shared__ float chosen_weights[k_max_top_k];
  wait_for_previous_kernel();
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_warps = blockDim.x / 32;

  // Logits in f32 (the gate row of the shared expert, when there is one, comes after the experts).
  const int rows = num_experts + (shared_gate != nullptr ? 1 : 0);
  const float* const xs[1] = {x + static_cast<int64_t>(t) * hidden};
  for (int e = warp; e < rows; e += num_warps) {
    const bf16* const wr[1] = {w + static_cast<int64_t>(e) * hidden};
    float acc[1][1];
    warp_dot_rows<1, 1>(acc, wr, xs, 1, hidden);
    if (lane == 0) probs[e] = acc[0][0];
  }
  __syncthreads();
  if (warp != 0) return;

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
  if (!group_single_token) return;
  // One token: its pairs are its slots j. Sorted by expert id, each chosen expert owns one pair and
  // one grouped-GEMM tile; offsets[e] counts the chosen ids below e.
  __syncwarp();
  for (int e = lane; e <= num_experts; e += 32) {
    int below = 0;
    for (int j = 0; j < top_k; ++j) below += chosen_ids[j] < e ? 1 : 0;
    g.expert_offsets[e] = below;
  }
  if (lane < top_k) {
    int rank = 0;  // position of slot `lane` among the chosen ids in ascending order (ids are distinct)
    for (int j = 0; j < top_k; ++j) rank += chosen_ids[j] < chosen_ids[lane] ? 1 : 0;
    g.sorted_pairs[rank] = lane;
    g.active_experts[rank] = chosen_ids[lane];
    g.tile_expert[rank] = chosen_ids[lane];
    g.tile_row[rank] = rank;
  }
  if (lane == 0) {
    *g.num_active = top_k;
    *g.num_tiles = top_k;
  }
}

// One block. Counts pairs per expert, lays out the offsets, the active experts and the grouped GEMM's
// row tiles (tile_rows sorted rows each), then places every pair at its expert's slot, in pair order (a
// ballot per 32 pairs). topk_ids: [num_pairs]. Dynamic shared memory: counts [E] and offsets [E + 1].
__global__ void align_kernel(ExpertGroups g, const int32_t* topk_ids, int num_pairs, int num_experts, int tile_rows) {
  extern __shared__ int32_t counts[];
  int32_t* offsets = counts + num_experts;
  wait_for_previous_kernel();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, num_warps = blockDim.x / 32;
  for (int e = tid; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int p = tid; p < num_pairs; p += blockDim.x) atomicAdd(&counts[topk_ids[p]], 1);
  __syncthreads();
  if (tid == 0) {
    int num_active = 0, num_tiles = 0;
    offsets[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
      offsets[e + 1] = offsets[e] + counts[e];
      if (counts[e] == 0) continue;
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
  for (int e = warp; e < num_experts; e += num_warps) {
    if (counts[e] == 0) continue;
    int next = offsets[e];
    for (int c = 0; c < num_pairs; c += 32) {
      const int p = c + lane;
      const bool hit = p < num_pairs && topk_ids[p] == e;
      const unsigned mask = __ballot_sync(k_full_mask, hit);
      if (hit) g.sorted_pairs[next + __popc(mask & ((1u << lane) - 1u))] = p;
      next += __popc(mask);
    }
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

bool router_topk(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                 int num_tokens, int hidden, int num_experts, int top_k, bool norm_topk_prob, cudaStream_t stream,
                 const ExpertGroups* groups, ExpertCounts counts) {
  if (num_tokens == 0) return false;
  if (top_k < 1 || top_k > k_max_top_k || top_k > num_experts) argument_error("router_topk", "top_k must be in [1, min(32, num_experts)]");
  if (hidden % 8 != 0) argument_error("router_topk", "hidden must be a multiple of 8");
  const size_t smem = (static_cast<size_t>(num_experts) + 1) * sizeof(float);
  const int threads = num_tokens <= 64 ? 1024 : 256;
  const bool group = groups != nullptr && num_tokens == 1;
  launch_kernel(router_topk_kernel, num_tokens, threads, smem, stream, topk_ids, topk_weights, shared_gate, x, w, hidden,
                num_experts, top_k, norm_topk_prob, group ? *groups : ExpertGroups{}, group, counts);
  CUDA_CHECK_LAUNCH();
  return group;
}

void align_by_expert(const ExpertGroups& groups, const int32_t* topk_ids, int num_pairs, int num_experts,
                     cudaStream_t stream) {
  const size_t smem = (2 * static_cast<size_t>(num_experts) + 1) * sizeof(int32_t);
  launch_kernel(align_kernel, 1, 1024, smem, stream, groups, topk_ids, num_pairs, num_experts,
                expert_tile_rows(num_pairs, num_experts));
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
