#pragma once
// The CUDA backend's kernels, as host functions that launch them on a stream. Every pointer is device
// memory unless its comment says otherwise. Activations are f32; weights and the KV cache are bf16
// (raw bits in uint16_t, so that this header needs no CUDA types beyond the runtime API); every kernel
// accumulates in f32. Each kernel has a CPU counterpart it is tested against (tests/cuda_kernels_test.cpp).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moescope::cuda {

using bf16 = uint16_t;  // bfloat16 bits on the device

// The bf16 copy of f32 activations that a tensor-core product reads. hi = bf16(v) always; with
// --matmul-precision high also lo = bf16(v - hi), and every product then takes both terms (hi + lo
// carries v to 2^-17 relative instead of 2^-9; the weights are bf16 already, so the products are as
// exact as f32 activations would make them, up to that). lo == nullptr: one term, bf16 activations.
struct Bf16Pair {
  bf16* hi = nullptr;
  bf16* lo = nullptr;
  Bf16Pair() = default;
  Bf16Pair(std::nullptr_t) {}  // NOLINT: no bf16 output
  Bf16Pair(bf16* hi_, bf16* lo_ = nullptr) : hi(hi_), lo(lo_) {}  // NOLINT: a plain bf16 buffer is one term
};
struct ConstBf16Pair {
  const bf16* hi = nullptr;
  const bf16* lo = nullptr;
  ConstBf16Pair() = default;
  ConstBf16Pair(const bf16* hi_, const bf16* lo_ = nullptr) : hi(hi_), lo(lo_) {}  // NOLINT
  ConstBf16Pair(Bf16Pair p) : hi(p.hi), lo(p.lo) {}                                 // NOLINT
};

// --- Embedding and RMSNorm (norm.cu) ---------------------------------------------------------------

// x[t] = table[token_ids[t]] widened to f32.  x: [num_tokens, hidden], table: [vocab, hidden].
void embed(float* x, const bf16* table, const int32_t* token_ids, int num_tokens, int hidden, cudaStream_t stream);

// The feed-forward output of the previous block, not yet added into the residual stream: RMSNorm adds
// it first (x += sum over slots), so the add costs no launch of its own.
struct FfnFold {
  const float* ffn_out = nullptr;          // [num_tokens, num_slots, hidden], or nullptr: nothing to add
  int num_slots = 0;
  const float* last_slot_scale = nullptr;  // [num_tokens] multiplies slot num_slots - 1 (shared-expert gate)
};

// For each row r (rows[r], or r when rows is nullptr): x[row] += fold (written back), then
// out[r] = x[row] / sqrt(mean(x[row]^2) + eps) * weight, as HF's RMSNorm in f32.
// x: [num_tokens, hidden]; out: [num_rows, hidden] f32 or nullptr (large passes' input norm: only the
// bf16 terms are read); out_bf16: [num_rows, hidden] (hi, and lo when given) or nullptr; weight: [hidden].
void rms_norm(float* out, Bf16Pair out_bf16, float* x, const int32_t* rows, int num_rows, int hidden, const float* weight,
              float eps, const FfnFold& fold, cudaStream_t stream);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i], rounded to bf16.
// gate_up: [num_tokens, 2 * inter] f32 (gate columns, then up columns); out: [num_tokens, inter] (hi, and lo
// when given).
void swiglu_bf16(Bf16Pair out, const float* gate_up, int num_tokens, int inter, cudaStream_t stream);

// --- Skinny matrix products for small passes (gemv.cu) ---------------------------------------------

// Passes of at most this many tokens take the small-batch path: f32 activations, each weight row read
// once for all tokens, many warps over the rows so the weights stream at full bandwidth.
constexpr int k_small_batch_max_tokens = 8;

// y[t, n] = x[t] . w[n]  (y[t, n] += ... when accumulate).  num_tokens <= k_small_batch_max_tokens.
// x: [num_tokens, k] f32, w: [n, k] bf16 (k % 8 == 0), y: [num_tokens, ldy] f32.
void gemv(float* y, int ldy, const float* x, const bf16* w, int num_tokens, int n, int k, bool accumulate,
          cudaStream_t stream);

// One token: y[n] = w[n] . RMSNorm(x) with norm_weight and eps (HF's RMSNorm in f32), each warp norming x
// itself as router_small does (inv_rms * (w[n] . (norm_weight * x)): the same sum in another order), so
// that no norm kernel runs before it (a decode step of one sequence, whose previous down
// kernel folded the feed-forward output into x: experts_down_fold). x: [k] f32; w: [n, k] bf16; y: [n].
void gemv_normed(float* y, const float* x, const float* norm_weight, float eps, const bf16* w, int n, int k,
                 cudaStream_t stream);

// --- q/k/v: bias, q/k norm, clip, RoPE and the KV-cache write in one kernel (qkv.cu) ---------------

// Where q/k RMSNorm applies (ModelConfig's QkNorm; kept apart so that the .cu files need no model headers).
enum class QkNormKind { None, PerHead, Full };

struct QkvParams {
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  const float* bias = nullptr;           // [q_size + 2 * kv_size] or nullptr
  QkNormKind qk_norm = QkNormKind::None;
  const float* q_norm = nullptr;         // [head_dim] (PerHead) or [q_size] (Full)
  const float* k_norm = nullptr;         // [head_dim] (PerHead) or [kv_size] (Full)
  float eps = 1e-6f;
  float clip = 0.0f;                     // clamp q/k/v to [-clip, clip] when > 0 (OLMoE)
  const float* rope_inv_freq = nullptr;  // [head_dim / 2]
};

// qkv: [num_tokens, q_size + 2 * kv_size] f32 (the fused projection); q: [num_tokens, q_size] f32 out;
// k_cache, v_cache: [num_cache_rows, kv_size] bf16 (or f32: --kv-cache-dtype float32), row slots[t]
// receives token t's k and v; token_pos: [num_tokens] RoPE positions.
void qkv_rope_cache(float* q, bf16* k_cache, bf16* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream);
void qkv_rope_cache(float* q, float* k_cache, float* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream);

// --- Attention over the paged KV cache (attention.cu) ----------------------------------------------

// Rows of one sequence computed together by the prefill kernel: {sequence, first token row, rows,
// position of the first row}.
struct PrefillTile {
  int32_t seq, row, num_rows, pos;
};
constexpr int k_prefill_tile_rows = 64;

struct AttentionBatch {
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks] cache block ids
  int max_blocks = 0;
  int block_size = 0;
  const PrefillTile* prefill_tiles = nullptr;  // [num_prefill_tiles]
  int num_prefill_tiles = 0;
  const int32_t* decode_rows = nullptr;   // [num_decode] rows of sequences with one new token
  int num_decode = 0;
  const int32_t* token_seq = nullptr;     // [num_tokens]
  const int32_t* token_pos = nullptr;     // [num_tokens]
  // Room for decode rows split over the positions (flash-decoding), when few rows leave most of the GPU
  // idle: partial softmaxes of up to decode_split_blocks() (row, head) pairs x k_decode_max_splits parts of
  // head_dim + 2 floats, and a ticket per (row, head), zero before the first launch (the kernel's last
  // block of a pair resets it). Null: no splits.
  float* split_partials = nullptr;
  unsigned* split_tickets = nullptr;
};
constexpr int k_decode_max_splits = 64;
// Rows x heads below which decode rows split; the room the split scratch needs (decode_split_floats).
int decode_split_blocks();
inline int64_t decode_split_floats(int head_dim) {
  return static_cast<int64_t>(decode_split_blocks()) * k_decode_max_splits * (head_dim + 2);
}

// Causal GQA attention of every new token over its sequence's cached positions 0..pos (the new
// tokens' k/v already written). q, out: [num_tokens, num_heads * head_dim] f32; out_bf16: same shape
// (hi, and lo when given) or nullptr; k_cache, v_cache: [num_blocks * block_size, num_kv_heads * head_dim] bf16 or f32. head_dim <= 256.
// With the bf16 cache and head_dim % 16 == 0, <= 128, prefill tiles run on the tensor cores, q and the
// softmax weights rounded to bf16 for the products; everything else computes in f32.
void attention(float* out, Bf16Pair out_bf16, const float* q, const bf16* k_cache, const bf16* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream);
void attention(float* out, Bf16Pair out_bf16, const float* q, const float* k_cache, const float* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream);

// --- Router and expert grouping (router.cu) --------------------------------------------------------

// Per token: logits = w . x[t] in f32, softmax over the experts in f32, top-k in torch.topk order (larger
// first, lower id on ties), renormalised when norm_topk_prob; with a shared-expert gate row after the
// experts, also shared_gate[t] = sigmoid(w[num_experts] . x[t]).
// x: [num_tokens, hidden] f32; w: [num_experts (+1), hidden] bf16; topk_ids, topk_weights: [num_tokens, top_k];
// shared_gate: [num_tokens] or nullptr (no gate row).
struct ExpertGroups;
// With counts given, the kernel also adds each chosen expert's selection and routing weight into one MoE
// layer's running totals (the recorder's stat and per_pass figures, with no launch of their own).
struct ExpertCounts {
  unsigned long long* counts = nullptr;        // [num_experts] selections
  unsigned long long* weight_sums = nullptr;   // [num_experts] routing weights in units of 2^-32 (integer
                                               // atomics: the same sums in any order)
};
constexpr double k_weight_sum_unit = 1.0 / 4294967296.0;  // 2^-32
void router_topk(int32_t* topk_ids, float* topk_weights, float* shared_gate, const float* x, const bf16* w,
                 int num_tokens, int hidden, int num_experts, int top_k, bool norm_topk_prob, cudaStream_t stream,
                 ExpertCounts counts = {});
// Small passes (up to k_router_small_max_tokens tokens): the post-attention RMSNorm, the router and the
// grouping in one launch of ceil((num_experts (+1)) / 8) blocks, a router row per warp, no barrier before
// the last block. h = rms_norm(x) with norm_weight ([num_tokens, hidden] out, as rms_norm's); the routes as
// router_topk's on h (each logit as inv_rms * (w . (norm_weight * x)): the same sum in another order); the
// groups as align_by_expert's on the routes. logits: [num_tokens, num_experts (+1)] scratch; ticket: one
// unsigned, zero before the first launch, which the kernel's last block resets (launches on one stream run
// in order).
constexpr int k_router_small_max_tokens = k_small_batch_max_tokens;
void router_small(int32_t* topk_ids, float* topk_weights, float* shared_gate, float* h, const float* x,
                  const float* norm_weight, float eps, const bf16* w, int num_tokens, int hidden, int num_experts,
                  int top_k, bool norm_topk_prob, const ExpertGroups& groups, ExpertCounts counts, float* logits,
                  unsigned* ticket, cudaStream_t stream);

// Token-expert pairs (pair p = t * top_k + j) grouped by expert, written by align_by_expert.
struct ExpertGroups {
  int32_t* sorted_pairs = nullptr;    // [num_pairs] grouped by expert id, pair order kept within an expert
  int32_t* expert_offsets = nullptr;  // [num_experts + 1] expert e owns sorted_pairs[offsets[e], offsets[e+1])
  int32_t* active_experts = nullptr;  // [num_experts] experts with at least one pair, ascending
  int32_t* num_active = nullptr;      // [1]
  int32_t* tile_expert = nullptr;     // [max_expert_tiles] the grouped GEMM's row tiles: expert ...
  int32_t* tile_row = nullptr;        // [max_expert_tiles] ... and first sorted row
  int32_t* num_tiles = nullptr;       // [1]
};
// Sorted rows per tile: few pairs per expert (decode batches) take tiles of 64 rows, many (prefill) tiles
// of 128, each for a grouped-GEMM configuration of its own. align_by_expert and the grouped GEMMs pick
// the same size from the same (num_pairs, num_experts).
constexpr int k_expert_tile_rows = 64;
constexpr int k_expert_tile_rows_large = 128;
constexpr int k_expert_large_tiles_from = 48;  // pairs per expert on average
inline int expert_tile_rows(int num_pairs, int num_experts) {
  return num_pairs >= k_expert_large_tiles_from * num_experts ? k_expert_tile_rows_large : k_expert_tile_rows;
}
// Upper bound on the grouped GEMM's row tiles of tile_rows each (the host sizes grids with it; unused
// tiles exit). The default, the smaller tiles, bounds both sizes (the ExpertGroups arrays use it).
inline int max_expert_tiles(int num_pairs, int num_experts, int tile_rows = k_expert_tile_rows) {
  return num_pairs / tile_rows + (num_pairs < num_experts ? num_pairs : num_experts);
}
// Ints of device memory an ExpertGroups needs (carve_expert_groups lays them out).
int64_t expert_groups_ints(int num_pairs, int num_experts);
ExpertGroups carve_expert_groups(int32_t* memory, int num_pairs, int num_experts);

void align_by_expert(const ExpertGroups& groups, const int32_t* topk_ids, int num_pairs, int num_experts,
                     cudaStream_t stream);

// --- Experts (experts.cu) --------------------------------------------------------------------------

// One MoE (or dense MLP) block's weights on the device. Routed experts are stacked; gate and up rows
// are concatenated per expert. The dense group is the shared expert of a MoE layer or the MLP of a
// dense layer: every token goes through it.
struct ExpertWeights {
  const bf16* gate_up = nullptr;        // [num_experts, 2 * inter, hidden]
  const bf16* down = nullptr;           // [num_experts, hidden, inter]
  int inter = 0;
  const bf16* dense_gate_up = nullptr;  // [2 * dense_inter, hidden] or nullptr
  const bf16* dense_down = nullptr;     // [hidden, dense_inter]
  int dense_inter = 0;
};

// Small passes. Gate/up of every active expert (and of the dense group) with SwiGLU fused; each
// expert's rows are read once for all of its tokens.
// x: [num_tokens, hidden] f32; h: [num_tokens * top_k + num_tokens, ld_h] f32 out: row p for routed
// pair p, row num_tokens * top_k + t for token t in the dense group.
// dn (a MoE layer's small pass after router_small): x is router_small's normed output, and dn.x with
// dn.weight and dn.eps its input and norm; the dense group's blocks then norm dn.x themselves, to the bit as
// router_small, and run beside the router instead of after it (one or two tokens; else dn is unused).
struct DenseNorm {
  const float* x = nullptr;       // [num_tokens, hidden] f32: the residual stream before the norm
  const float* weight = nullptr;  // [hidden] the RMSNorm's weight, or nullptr: x is read
  float eps = 0.0f;
};
void experts_gate_up_small(float* h, int ld_h, const float* x, const ExpertWeights& w, const ExpertGroups& groups,
                           int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream,
                           const DenseNorm& dn = {});
// Down projections with the routing weight and un-permute fused: ffn_out[t, j] = topk_weights[t, j] *
// down_e(h[pair]) for routed pair (t, j); ffn_out[t, num_slots - 1] = dense_down(h[dense row t]).
// ffn_out: [num_tokens, num_slots, hidden]; topk_weights: [num_tokens, top_k].
void experts_down_small(float* ffn_out, int num_slots, const float* h, int ld_h, const float* topk_weights,
                        const ExpertWeights& w, const ExpertGroups& groups, int num_tokens, int hidden,
                        int num_experts, int top_k, cudaStream_t stream);
// One token: the down projections of experts_down_small folded straight into the residual, x[n] +=
// sum over slots, each slot computed as there (the same sums to the bit) and added in rms_norm's fold
// order (routed slots j = 0 .. top_k - 1 weighted, then the dense group times shared_gate[0] when given).
// A warp takes one output element n for every slot, so no slot goes through memory and no norm kernel
// needs to fold. h: as experts_gate_up_small wrote it (routed pair j in row j, the dense row top_k);
// topk_ids, topk_weights: [top_k] (top_k 0: the dense MLP alone); x: [hidden].
void experts_down_fold(float* x, const float* h, int ld_h, const int32_t* topk_ids, const float* topk_weights,
                       const float* shared_gate, const ExpertWeights& w, int hidden, int top_k, cudaStream_t stream);

// Large passes: grouped GEMMs on the tensor cores over the expert-sorted pairs.
// Gate/up with SwiGLU fused: hb[s] = silu(g) * u for sorted row s (its token's xb row gathered).
// xb: [num_tokens, hidden] bf16; hb: [num_tokens * top_k, inter] bf16. With xb.lo the products take both
// terms (twice the tensor-core work), and hb.lo (then required) receives the lo term of the output.
// dense_hb given: the dense group (w.dense_*) in the same launch, every token in order, its SwiGLU output
// into dense_hb [num_tokens, dense_inter] (as the routed one: lo with xb.lo).
void experts_gate_up_grouped(Bf16Pair hb, ConstBf16Pair xb, const ExpertWeights& w, const ExpertGroups& groups,
                             int num_tokens, int hidden, int num_experts, int top_k, cudaStream_t stream,
                             Bf16Pair dense_hb = {});
// Down with the routing weight and un-permute fused: ffn_out[t, j] = topk_weights[t, j] * (hb[s] . down_e),
// hb's lo term included when given. dense_hb given ([num_tokens, dense_inter]): also
// ffn_out[t, num_slots - 1] = dense_hb[t] . dense_down, in the same launch.
void experts_down_grouped(float* ffn_out, int num_slots, ConstBf16Pair hb, const float* topk_weights,
                          const ExpertWeights& w, const ExpertGroups& groups, int num_tokens, int hidden,
                          int num_experts, int top_k, cudaStream_t stream, ConstBf16Pair dense_hb = {});
// Whether the current device runs this build's sm_90a code, with Hopper's warpgroup MMA: a probe kernel
// says so, once per device (call it before capturing a graph: the backend does at start). The grouped
// GEMMs of one activation term then run on wgmma when wgmma_allowed() (device.h), else on mma.sync.
bool wgmma_available();
// Whether a large pass takes its dense group (the shared expert) into the grouped GEMMs: passes of the
// small tiles (decode batches), where cuBLAS on 9..~700 rows runs few CTAs well below the bandwidth;
// larger passes give it to cuBLAS, which is faster than the grouped kernels when compute-bound.
inline bool grouped_takes_dense(int num_tokens, int num_experts, int top_k) {
  return num_experts > 0 && expert_tile_rows(num_tokens * top_k, num_experts) == k_expert_tile_rows;
}

// --- Greedy sampling (greedy.cu) -------------------------------------------------------------------

// keys[r] = the largest logit of row r with its index, as one key (greedy_token() reads the index): the
// first index on ties, NaN above every number, as torch.argmax. logits: [rows, vocab] f32; keys: [rows].
void greedy_keys(unsigned long long* keys, const float* logits, int rows, int vocab, cudaStream_t stream);
inline int32_t greedy_token(unsigned long long key) { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key)); }

// --- Device bandwidth (bandwidth.cu) ---------------------------------------------------------------

struct BandwidthSample {
  double best_gb_per_s = 0.0, median_gb_per_s = 0.0, min_gb_per_s = 0.0;
  size_t bytes = 0;  // bytes moved per run (read, or read + written for a copy)
  int repeats = 0;
};
// Streams a buffer of `bytes` through a reading kernel (the way decode reads weights), timed with events.
BandwidthSample measure_read_bandwidth(size_t bytes = size_t{4} << 30, int repeats = 10);
// Device-to-device copy kernel of `bytes`, counting bytes read plus bytes written.
BandwidthSample measure_copy_bandwidth(size_t bytes = size_t{2} << 30, int repeats = 10);

// --- Synchronisation costs (sync_cost.cu) ----------------------------------------------------------

// A grid-wide barrier of a persistent launch (one block of 256 threads an SM, the blocks meeting at an
// atomic counter) against the boundary between two kernels of a pass (a CUDA graph of kernels launched as
// the passes launch theirs, each waiting for the previous one): microseconds each, from `count` of them
// against none (barriers) or one (kernels), medians of `repeats` timings. The *_checked flags say that
// every barrier and every kernel ran (the counter's final values).
struct SyncCosts {
  double barrier_us = 0.0, boundary_us = 0.0;
  int blocks = 0;
  bool programmatic = false, barriers_checked = false, links_checked = false;
};
SyncCosts measure_sync_costs(int count, int repeats);

}  // namespace moescope::cuda
