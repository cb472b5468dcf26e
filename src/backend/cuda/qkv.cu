// After the fused q/k/v projection, in one kernel: bias, q/k RMSNorm (per head or over the whole
// projection), clip, RoPE, and the k/v write into the paged cache. The order is the CPU's
// (src/backend/cpu/attention.cpp), which is HF's. Small passes take one block per (token, head) where
// the norm, if any, is per head, so that a decode spreads over many SMs; one block per token for the
// whole-projection norm (OLMoE), which needs every head of the token, and for passes of many tokens.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_threads = 128;

// A k/v value into the cache: rounded to bf16, or kept in f32 (--kv-cache-dtype float32).
__device__ __forceinline__ void store_cache(bf16* at, float v) { *at = float_to_bf16(v); }
__device__ __forceinline__ void store_cache(float* at, float v) { *at = v; }

// HF rotate_half RoPE of one pair of a head's values: (head[i], head[i + half]) rotate by pos * inv_freq[i],
// whose cosine and sine are c and s (rope_angle).
__device__ __forceinline__ void rope_angle(float& c, float& s, int i, float pos, const float* inv_freq) {
  const float angle = pos * inv_freq[i];
  c = cosf(angle);
  s = sinf(angle);
}
__device__ __forceinline__ void rope_rotate(float* head, int i, int half, float c, float s) {
  const float a = head[i], b = head[i + half];
  head[i] = a * c - b * s;
  head[i + half] = b * c + a * s;
}
__device__ __forceinline__ void rope_pair(float* head, int i, int half, float pos, const float* inv_freq) {
  float c, s;
  rope_angle(c, s, i, pos, inv_freq);
  rope_rotate(head, i, half, c, s);
}

// Four k/v values into the cache at `at` (a multiple of 4): one 8-byte store of bf16, or 16 of f32.
__device__ __forceinline__ void store_cache4(bf16* at, float4 v) {
  *reinterpret_cast<uint2*>(at) = make_uint2(static_cast<uint32_t>(float_to_bf16(v.x)) | (static_cast<uint32_t>(float_to_bf16(v.y)) << 16),
                                             static_cast<uint32_t>(float_to_bf16(v.z)) | (static_cast<uint32_t>(float_to_bf16(v.w)) << 16));
}
__device__ __forceinline__ void store_cache4(float* at, float4 v) { *reinterpret_cast<float4*>(at) = v; }

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
  // hd % 4 == 0 (every head size here): the row, q and the cache rows in 16-byte pieces, a thread's loads
  // all in flight before its first use of them.
  const bool vec = hd % 4 == 0;
  float4* const row4 = reinterpret_cast<float4*>(row);
  if (vec) {
    constexpr int U = 6;
    const float4* src4 = reinterpret_cast<const float4*>(src);
    const float4* bias4 = reinterpret_cast<const float4*>(p.bias);
    for (int base = tid; base < width / 4; base += U * k_threads) {
      float4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * k_threads;
        v[u] = i < width / 4 ? __ldcg(src4 + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * k_threads;
        if (i >= width / 4) break;
        const float4 b = p.bias != nullptr ? bias4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        row4[i] = make_float4(v[u].x + b.x, v[u].y + b.y, v[u].z + b.z, v[u].w + b.w);
      }
    }
  } else {
    for (int i = tid; i < width; i += k_threads) row[i] = src[i] + (p.bias != nullptr ? p.bias[i] : 0.0f);
  }
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

  // HF rotate_half RoPE on every q and k head: pairs (i, i + head_dim / 2) rotate by pos * inv_freq[i],
  // whose cosine and sine every head of the token shares (a table of head_dim / 2, once a token).
  __shared__ float rope_cos[128], rope_sin[128];
  const int half = hd / 2;
  const float pos = static_cast<float>(token_pos[t]);
  for (int i = tid; i < half; i += k_threads) rope_angle(rope_cos[i], rope_sin[i], i, pos, p.rope_inv_freq);
  __syncthreads();
  for (int idx = tid; idx < (p.num_heads + p.num_kv_heads) * half; idx += k_threads) {
    const int h = idx / half, i = idx % half;
    rope_rotate(row + (h < p.num_heads ? h * hd : q_size + (h - p.num_heads) * hd), i, half, rope_cos[i], rope_sin[i]);
  }
  __syncthreads();

  float* q_out = q + static_cast<int64_t>(t) * q_size;
  const int64_t slot = slots[t];
  if (vec) {
    for (int i = tid; i < q_size / 4; i += k_threads) reinterpret_cast<float4*>(q_out)[i] = row4[i];
    for (int i = tid; i < kv_size / 4; i += k_threads) {
      store_cache4(k_cache + slot * kv_size + 4 * i, row4[q_size / 4 + i]);
      store_cache4(v_cache + slot * kv_size + 4 * i, row4[(q_size + kv_size) / 4 + i]);
    }
    return;
  }
  for (int i = tid; i < q_size; i += k_threads) q_out[i] = row[i];
  for (int i = tid; i < kv_size; i += k_threads) {
    store_cache(k_cache + slot * kv_size + i, row[q_size + i]);
    store_cache(v_cache + slot * kv_size + i, row[q_size + kv_size + i]);
  }
}

constexpr int k_head_threads = 64;

// grid (T, num_heads + 2 * num_kv_heads): q heads, then k heads, then v heads, as in the fused row.
template <typename CacheT>
__global__ void __launch_bounds__(k_head_threads)
    qkv_head_kernel(float* q, CacheT* k_cache, CacheT* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, QkvParams p) {
  __shared__ float v[256];  // one head (head_dim <= 256)
  __shared__ float scratch[32];
  wait_for_previous_kernel();
  const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const int hd = p.head_dim, nh = p.num_heads, nkv = p.num_kv_heads;
  const int q_size = nh * hd, kv_size = nkv * hd, width = q_size + 2 * kv_size;
  const int kind = h < nh ? 0 : h < nh + nkv ? 1 : 2;  // q, k or v
  const int at = h * hd;                                 // the head's columns in the fused row
  for (int i = tid; i < hd; i += k_head_threads)
    v[i] = qkv[static_cast<int64_t>(t) * width + at + i] + (p.bias != nullptr ? p.bias[at + i] : 0.0f);
  __syncthreads();
  if (kind < 2 && p.qk_norm == QkNormKind::PerHead) {  // Qwen3-MoE: RMSNorm of each q and k head
    const float* weight = kind == 0 ? p.q_norm : p.k_norm;
    float sum_sq = 0.0f;
    for (int i = tid; i < hd; i += k_head_threads) sum_sq += v[i] * v[i];
    sum_sq = block_sum(sum_sq, scratch);
    const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(hd) + p.eps);
    for (int i = tid; i < hd; i += k_head_threads) v[i] = weight[i] * (v[i] * inv);
    __syncthreads();
  }
  if (p.clip > 0.0f) {
    for (int i = tid; i < hd; i += k_head_threads) v[i] = fminf(fmaxf(v[i], -p.clip), p.clip);
    __syncthreads();
  }
  if (kind < 2) {  // RoPE on q and k
    const int half = hd / 2;
    const float pos = static_cast<float>(token_pos[t]);
    for (int i = tid; i < half; i += k_head_threads) rope_pair(v, i, half, pos, p.rope_inv_freq);
    __syncthreads();
  }
  if (kind == 0) {
    for (int i = tid; i < hd; i += k_head_threads) q[static_cast<int64_t>(t) * q_size + at + i] = v[i];
  } else {
    CacheT* cache = kind == 1 ? k_cache : v_cache;
    const int64_t base = static_cast<int64_t>(slots[t]) * kv_size + (h - nh - (kind == 2 ? nkv : 0)) * hd;
    for (int i = tid; i < hd; i += k_head_threads) store_cache(cache + base + i, v[i]);
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

}  // namespace

void qkv_rope_cache(float* q, bf16* k_cache, bf16* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream) {
  launch_qkv(q, k_cache, v_cache, qkv, token_pos, slots, num_tokens, p, stream);
}

void qkv_rope_cache(float* q, float* k_cache, float* v_cache, const float* qkv, const int32_t* token_pos,
                    const int32_t* slots, int num_tokens, const QkvParams& p, cudaStream_t stream) {
  launch_qkv(q, k_cache, v_cache, qkv, token_pos, slots, num_tokens, p, stream);
}

}  // namespace moescope::cuda
