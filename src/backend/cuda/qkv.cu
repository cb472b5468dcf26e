// After the fused q/k/v projection, in one kernel: bias, q/k RMSNorm (per head or over the whole
// projection), clip, RoPE, and the k/v write into the paged cache. The order is the CPU's
// (src/backend/cpu/attention.cpp), which is HF's. Small passes take one block per (token, head) where
// the norm, if any, is per head, so that a decode spreads over many SMs; one block per token for the
// whole-projection norm (OLMoE), which needs every head of the token, and for passes of many tokens.
#include "backend/cuda/common.cuh"
#include "backend/cuda/gemv.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_threads = 128;

// A k/v value into the cache: rounded to bf16, or kept in f32 (--kv-cache-dtype float32).
__device__ __forceinline__ void store_cache(bf16* at, float v) { *at = float_to_bf16(v); }
__device__ __forceinline__ void store_cache(float* at, float v) { *at = v; }

// HF rotate_half RoPE of one pair of a head's values: (head[i], head[i + half]) rotate by pos * inv_freq[i].
__device__ __forceinline__ void rope_pair(float* head, int i, int half, float pos, const float* inv_freq) {
  const float angle = pos * inv_freq[i];
  const float c = cosf(angle), s = sinf(angle);
  const float a = head[i], b = head[i + half];
  head[i] = a * c - b * s;
  head[i + half] = b * c + a * s;
}

// One block per token. Dynamic shared memory: the token's row [q_size + 2 * kv_size] f32.
// q: [T, q_size]; k_cache, v_cache: [cache rows, kv_size]; qkv: [T, q_size + 2 * kv_size];
// token_pos, slots: [T].
template <typename CacheT>
__global__ void __launch_bounds__(k_threads)
    qkv_rope_cache_kernel(float* q, CacheT* k_cache, CacheT* v_cache, const float* qkv, const int32_t* token_pos,
                          const int32_t* slots, QkvParams p) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  wait_for_previous_kernel();
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, num_warps = k_threads / 32;
  const int hd = p.head_dim, q_size = p.num_heads * hd, kv_size = p.num_kv_heads * hd;
  const int width = q_size + 2 * kv_size;
  const float* src = qkv + static_cast<int64_t>(t) * width;
  for (int i = tid; i < width; i += k_threads) row[i] = src[i] + (p.bias != nullptr ? p.bias[i] : 0.0f);
  __syncthreads();

  if (p.qk_norm == QkNormKind::Full) {  // OLMoE: RMSNorm over the whole q (then k) projection
    for (int part = 0; part < 2; ++part) {
      float* v = row + (part == 0 ? 0 : q_size);
      const int n = part == 0 ? q_size : kv_size;
      const float* weight = part == 0 ? p.q_norm : p.k_norm;
      float sum_sq = 0.0f;
      for (int i = tid; i < n; i += k_threads) sum_sq += v[i] * v[i];
      sum_sq = block_sum(sum_sq, scratch);
      const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(n) + p.eps);
      for (int i = tid; i < n; i += k_threads) v[i] = weight[i] * (v[i] * inv);  // each thread its own elements
    }
    __syncthreads();
  } else if (p.qk_norm == QkNormKind::PerHead) {  // Qwen3-MoE: each head over head_dim, one warp per head
    for (int h = warp; h < p.num_heads + p.num_kv_heads; h += num_warps) {
      float* v = row + (h < p.num_heads ? h * hd : q_size + (h - p.num_heads) * hd);
      const float* weight = h < p.num_heads ? p.q_norm : p.k_norm;
      float sum_sq = 0.0f;
      for (int i = lane; i < hd; i += 32) sum_sq += v[i] * v[i];
      sum_sq = warp_sum(sum_sq);
      const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(hd) + p.eps);
      for (int i = lane; i < hd; i += 32) v[i] = weight[i] * (v[i] * inv);
    }
    __syncthreads();
  }
  if (p.clip > 0.0f) {
    for (int i = tid; i < width; i += k_threads) row[i] = fminf(fmaxf(row[i], -p.clip), p.clip);
    __syncthreads();
  }

  // HF rotate_half RoPE on every q and k head: pairs (i, i + head_dim / 2) rotate by pos * inv_freq[i].
  const int half = hd / 2;
  const float pos = static_cast<float>(token_pos[t]);
  for (int idx = tid; idx < (p.num_heads + p.num_kv_heads) * half; idx += k_threads) {
    const int h = idx / half, i = idx % half;
    rope_pair(row + (h < p.num_heads ? h * hd : q_size + (h - p.num_heads) * hd), i, half, pos, p.rope_inv_freq);
  }
  __syncthreads();

  float* q_out = q + static_cast<int64_t>(t) * q_size;
  for (int i = tid; i < q_size; i += k_threads) q_out[i] = row[i];
  const int64_t slot = slots[t];
  for (int i = tid; i < kv_size; i += k_threads) {
    store_cache(k_cache + slot * kv_size + i, row[q_size + i]);
    store_cache(v_cache + slot * kv_size + i, row[q_size + kv_size + i]);
  }
}

constexpr int k_head_threads = 64;

// Token t's head h (q heads, then k heads, then v heads, as in the fused row) as qkv_head_kernel does it,
// by threads 0 .. k_head_threads - 1 of a block (any others take part in the barriers and sums only, so
// that the sums run in the same order whatever the block's size). v: [head_dim] and scratch: [32] floats
// of shared memory. qkv is read through L2: in qkv_proj_small it was written by other blocks of the
// same launch.
template <typename CacheT>
__device__ void process_head(float* v, float* scratch, int t, int h, float* q, CacheT* k_cache, CacheT* v_cache,
                             const float* qkv, const int32_t* token_pos, const int32_t* slots, const QkvParams& p) {
  const int hd = p.head_dim, nh = p.num_heads, nkv = p.num_kv_heads;
  const int q_size = nh * hd, kv_size = nkv * hd, width = q_size + 2 * kv_size;
  const int kind = h < nh ? 0 : h < nh + nkv ? 1 : 2;  // q, k or v
  const int at = h * hd;                                 // the head's columns in the fused row
  const int tid = threadIdx.x, first = tid < k_head_threads ? tid : hd;  // first < hd: one of the working threads
  for (int i = first; i < hd; i += k_head_threads)
    v[i] = __ldcg(qkv + static_cast<int64_t>(t) * width + at + i) + (p.bias != nullptr ? p.bias[at + i] : 0.0f);
  __syncthreads();
  if (kind < 2 && p.qk_norm == QkNormKind::PerHead) {  // Qwen3-MoE: RMSNorm of each q and k head
    const float* weight = kind == 0 ? p.q_norm : p.k_norm;
    float sum_sq = 0.0f;
    for (int i = first; i < hd; i += k_head_threads) sum_sq += v[i] * v[i];
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(hd) + p.eps);
    for (int i = first; i < hd; i += k_head_threads) v[i] = weight[i] * (v[i] * inv);
    __syncthreads();
  }
  if (p.clip > 0.0f) {
    for (int i = first; i < hd; i += k_head_threads) v[i] = fminf(fmaxf(v[i], -p.clip), p.clip);
    __syncthreads();
  }
  if (kind < 2) {  // RoPE on q and k
    const int half = hd / 2;
    const float pos = static_cast<float>(token_pos[t]);
    for (int i = first; i < half; i += k_head_threads) rope_pair(v, i, half, pos, p.rope_inv_freq);
    __syncthreads();
  }
  if (kind == 0) {
    for (int i = first; i < hd; i += k_head_threads) q[static_cast<int64_t>(t) * q_size + at + i] = v[i];
  } else {
    CacheT* cache = kind == 1 ? k_cache : v_cache;
    const int64_t base = static_cast<int64_t>(slots[t]) * kv_size + (h - nh - (kind == 2 ? nkv : 0)) * hd;
    for (int i = first; i < hd; i += k_head_threads) store_cache(cache + base + i, v[i]);
  }
}

// grid (T, num_heads + 2 * num_kv_heads): a block per token and head.
template <typename CacheT>
__global__ void __launch_bounds__(k_head_threads)
    qkv_head_kernel(float* q, CacheT* k_cache, CacheT* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, QkvParams p) {
  __shared__ float v[256];  // one head (head_dim <= 256)
  __shared__ float scratch[32];
  wait_for_previous_kernel();
  process_head(v, scratch, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), q, k_cache, v_cache, qkv,
               token_pos, slots, p);
}

// The small path's q/k/v projection and the kernel above in one launch. Blocks of k_proj_warps warps, each
// warp ROWS rows of the fused [q + 2 kv, hidden] matrix for every token (warp_dot_rows, as gemv_kernel:
// the same sums), written to qkv; a head's rows fall in whole blocks (head_dim % (k_proj_warps x ROWS) ==
// 0), and the last of a head's blocks to finish (a ticket per head in `tickets`, reset by that block for
// the next launch) processes the head for every token. This saves a launch and its wait between the
// projection and the post-processing of a decode step's layer.
constexpr int k_proj_warps = 4;
template <int ROWS, int MAXT, typename CacheT>
__global__ void __launch_bounds__(k_proj_warps * 32)
    qkv_proj_small_kernel(float* qkv, float* q, CacheT* k_cache, CacheT* v_cache, const float* x, const bf16* w,
                          const int32_t* token_pos, const int32_t* slots, int num_tokens, int k, QkvParams p,
                          unsigned* tickets) {
  __shared__ float v[256];
  __shared__ float scratch[32];
  __shared__ bool last;
  constexpr int BLOCK_ROWS = k_proj_warps * ROWS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int row0 = (static_cast<int>(blockIdx.x) * k_proj_warps + warp) * ROWS;  // < n: the blocks cover n exactly
  const bf16* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = w + static_cast<int64_t>(row0 + r) * k;
  const float* xs[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) xs[t] = x + static_cast<int64_t>(min(t, num_tokens - 1)) * k;
  float acc[MAXT][ROWS];
  warp_dot_rows<ROWS, MAXT, true>(acc, rows, xs, num_tokens, k);  // waits for the previous kernel inside
  if (lane == 0)
#pragma unroll
    for (int t = 0; t < MAXT; ++t)
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (t < num_tokens) qkv[static_cast<int64_t>(t) * n + row0 + r] = acc[t][r];
  const int h = static_cast<int>(blockIdx.x) * BLOCK_ROWS / p.head_dim;
  __threadfence();  // this block's rows, visible before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&tickets[h], 1u) == static_cast<unsigned>(p.head_dim / BLOCK_ROWS - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) tickets[h] = 0;  // for the next launch (launches on a stream run in order)
  for (int t = 0; t < num_tokens; ++t) {
    process_head(v, scratch, t, h, q, k_cache, v_cache, qkv, token_pos, slots, p);
    __syncthreads();  // v is the next token's
  }
}

// Passes of this many tokens or more take one block per token (the row kernel) whatever the norm: a
// block per head would be tens of thousands of tiny blocks (a 2048-token prefill: 2.99 against 1.16 ms
// a pass on the H100).
constexpr int k_row_kernel_from_tokens = 128;

template <typename CacheT>
void launch_qkv(float* q, CacheT* k_cache, CacheT* v_cache, const float* qkv, const int32_t* token_pos,
                const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (p.head_dim % 2 != 0 || p.head_dim > 256) argument_error("qkv_rope_cache", "head_dim must be even, at most 256");
  if (p.qk_norm != QkNormKind::Full && num_tokens < k_row_kernel_from_tokens) {
    launch_kernel(qkv_head_kernel<CacheT>, dim3(num_tokens, p.num_heads + 2 * p.num_kv_heads), k_head_threads, 0, stream,
                  q, k_cache, v_cache, qkv, token_pos, slots, p);
    CUDA_CHECK_LAUNCH();
    return;
  }
  const size_t smem = static_cast<size_t>(p.num_heads + 2 * p.num_kv_heads) * p.head_dim * sizeof(float);
  allow_dynamic_smem(qkv_rope_cache_kernel<CacheT>, smem);
  launch_kernel(qkv_rope_cache_kernel<CacheT>, num_tokens, k_threads, smem, stream, q, k_cache, v_cache, qkv, token_pos,
                slots, p);
  CUDA_CHECK_LAUNCH();
}

template <typename CacheT>
bool launch_proj_small(float* qkv, float* q, CacheT* k_cache, CacheT* v_cache, const float* x, const bf16* w,
                       const int32_t* token_pos, const int32_t* slots, int num_tokens, int hidden, const QkvParams& p,
                       unsigned* tickets, cudaStream_t stream) {
  if (num_tokens == 0) return true;
  if (num_tokens > k_small_batch_max_tokens) argument_error("qkv_proj_small", "more tokens than the small-batch path takes");
  if (hidden % 8 != 0) argument_error("qkv_proj_small", "hidden must be a multiple of 8");
  if (p.head_dim % 2 != 0 || p.head_dim > 256) argument_error("qkv_proj_small", "head_dim must be even, at most 256");
  const int heads = p.num_heads + 2 * p.num_kv_heads, n = heads * p.head_dim;
  bool launched = false;
  dispatch_max_tokens(num_tokens, [&]<int MAXT>() {
    constexpr int ROWS = small_rows_per_warp(MAXT);
    if (p.qk_norm == QkNormKind::Full || p.head_dim % (k_proj_warps * ROWS) != 0) return;
    launch_kernel(qkv_proj_small_kernel<ROWS, MAXT, CacheT>, n / (k_proj_warps * ROWS), k_proj_warps * 32, 0, stream,
                  qkv, q, k_cache, v_cache, x, w, token_pos, slots, num_tokens, hidden, p, tickets);
    CUDA_CHECK_LAUNCH();
    launched = true;
  });
  return launched;
}

}  // namespace

void qkv_rope_cache(float* q, bf16* k_cache, bf16* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream) {
  launch_qkv(q, k_cache, v_cache, qkv, token_pos, slots, num_tokens, p, stream);
}

void qkv_rope_cache(float* q, float* k_cache, float* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream) {
  launch_qkv(q, k_cache, v_cache, qkv, token_pos, slots, num_tokens, p, stream);
}

bool qkv_proj_small(float* qkv, float* q, bf16* k_cache, bf16* v_cache, const float* x, const bf16* w,
                    const int32_t* token_pos, const int32_t* slots, int num_tokens, int hidden, const QkvParams& p,
                    unsigned* tickets, cudaStream_t stream) {
  return launch_proj_small(qkv, q, k_cache, v_cache, x, w, token_pos, slots, num_tokens, hidden, p, tickets, stream);
}

bool qkv_proj_small(float* qkv, float* q, float* k_cache, float* v_cache, const float* x, const bf16* w,
                    const int32_t* token_pos, const int32_t* slots, int num_tokens, int hidden, const QkvParams& p,
                    unsigned* tickets, cudaStream_t stream) {
  return launch_proj_small(qkv, q, k_cache, v_cache, x, w, token_pos, slots, num_tokens, hidden, p, tickets, stream);
}

}  // namespace moescope::cuda
