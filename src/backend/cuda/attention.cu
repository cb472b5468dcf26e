// Causal GQA attention over the paged KV cache, with an online softmax in f32 (flash-style). Prefill
// rows are computed in tiles of 64 consecutive tokens of one sequence that share each key block loaded
// into shared memory (16-byte loads); a decode row (a sequence with one new token) has a block of its
// own whose eight warps split the positions, each loading its keys and values with all loads in
// flight, and merge their partial softmaxes.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_threads = 256;
constexpr int k_warps = k_threads / 32;
constexpr int k_key_block = 32;                               // positions per step, one per lane
constexpr int k_rows_per_warp = k_prefill_tile_rows / k_warps;  // prefill rows each warp owns
constexpr int k_max_head_dim = 256;
constexpr int k_value_chunk = 16;  // decode: positions whose values are loaded together

// Eight consecutive cached values (16 bytes of bf16, or 32 of f32) as floats.
__device__ __forceinline__ void load8(const bf16* at, float out[8]) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(at));
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = bf16_lo(ws[i]);
    out[2 * i + 1] = bf16_hi(ws[i]);
  }
}
__device__ __forceinline__ void load8(const float* at, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(at)), b = __ldg(reinterpret_cast<const float4*>(at) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ float load1(const bf16* at) { return bf16_to_float(*at); }
__device__ __forceinline__ float load1(const float* at) { return *at; }

__device__ __forceinline__ int64_t cache_row(const int32_t* block_table, int block_size, int pos) {
  return static_cast<int64_t>(block_table[pos / block_size]) * block_size + pos % block_size;
}

// grid (num_prefill_tiles, num_heads). NCH = ceil(head_dim / 32): dims lane + 32 c for c < NCH per lane.
// Dynamic shared memory: q [64][hd], k [32][hd + 1] (padded: lanes read different rows), v [32][hd].
template <int NCH, typename CacheT>
__global__ void __launch_bounds__(k_threads)
    attention_prefill_kernel(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
                             AttentionBatch b, int num_heads, int num_kv_heads, int hd, float scale) {
  extern __shared__ float smem[];
  float* qs = smem;
  float* ks = qs + k_prefill_tile_rows * hd;
  float* vs = ks + k_key_block * (hd + 1);
  const PrefillTile tile = b.prefill_tiles[blockIdx.x];
  const int h = blockIdx.y, kvh = h / (num_heads / num_kv_heads);
  const int q_size = num_heads * hd, kv_size = num_kv_heads * hd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t* block_table = b.block_tables + static_cast<int64_t>(tile.seq) * b.max_blocks;

  for (int i = tid; i < tile.num_rows * hd; i += k_threads)
    qs[i] = q[static_cast<int64_t>(tile.row + i / hd) * q_size + h * hd + i % hd];

  float m[k_rows_per_warp], l[k_rows_per_warp], acc[k_rows_per_warp][NCH];
#pragma unroll
  for (int r = 0; r < k_rows_per_warp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) acc[r][c] = 0.0f;
  }

  const int last_pos = tile.pos + tile.num_rows - 1;
  for (int k0 = 0; k0 <= last_pos; k0 += k_key_block) {
    __syncthreads();  // q loaded; the previous key block no longer read
    const int chunks_per_row = hd / 8;  // 16-byte pieces of a cached row
    for (int c = tid; c < k_key_block * chunks_per_row; c += k_threads) {
      const int j = c / chunks_per_row, d = (c % chunks_per_row) * 8, pos = k0 + j;
      float kf[8] = {}, vf[8] = {};
      if (pos <= last_pos) {
        const int64_t at = cache_row(block_table, b.block_size, pos) * kv_size + kvh * hd + d;
        load8(k_cache + at, kf);
        load8(v_cache + at, vf);
      }
      float* kd = ks + j * (hd + 1) + d;
      float* vd = vs + j * hd + d;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        kd[i] = kf[i];
        vd[i] = vf[i];
      }
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < k_rows_per_warp; ++rr) {
      const int r = warp * k_rows_per_warp + rr;
      const int pos = tile.pos + r;
      if (r >= tile.num_rows || k0 > pos) continue;  // uniform over the warp
      const int key = k0 + lane;
      float s = -INFINITY;
      if (key <= pos) {
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot = fmaf(qs[r * hd + d], ks[lane * (hd + 1) + d], dot);
        s = dot * scale;
      }
      const float m_new = fmaxf(m[rr], warp_max(s));  // finite: key k0 <= pos is valid
      const float p = key <= pos ? expf(s - m_new) : 0.0f;
      const float correction = expf(m[rr] - m_new);  // 0 on the first block (m = -inf)
      l[rr] = l[rr] * correction + warp_sum(p);
#pragma unroll
      for (int c = 0; c < NCH; ++c) acc[rr][c] *= correction;
      for (int j = 0; j < k_key_block; ++j) {
        const float pj = __shfl_sync(k_full_mask, p, j);
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int d = lane + 32 * c;
          if (d < hd) acc[rr][c] = fmaf(pj, vs[j * hd + d], acc[rr][c]);
        }
      }
      m[rr] = m_new;
    }
  }

#pragma unroll
  for (int rr = 0; rr < k_rows_per_warp; ++rr) {
    const int r = warp * k_rows_per_warp + rr;
    if (r >= tile.num_rows) continue;
    const int64_t at = static_cast<int64_t>(tile.row + r) * q_size + h * hd;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d = lane + 32 * c;
      if (d >= hd) continue;
      const float o = acc[rr][c] / l[rr];
      out[at + d] = o;
      if (out_bf16.hi != nullptr) store_bf16(out_bf16, at + d, o);
    }
  }
}

// grid (num_decode, num_heads). Warp w takes key blocks w, w + 8, ...; the eight partial softmaxes are
// merged at the end.
template <int NCH, typename CacheT>
__global__ void __launch_bounds__(k_threads)
    attention_decode_kernel(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
                            AttentionBatch b, int num_heads, int num_kv_heads, int hd, float scale) {
  __shared__ __align__(16) float qs[k_max_head_dim];
  __shared__ float part_m[k_warps], part_l[k_warps], part_acc[k_warps][k_max_head_dim];
  const int row = b.decode_rows[blockIdx.x];
  const int seq = b.token_seq[row], pos = b.token_pos[row];
  const int h = blockIdx.y, kvh = h / (num_heads / num_kv_heads);
  const int q_size = num_heads * hd, kv_size = num_kv_heads * hd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t* block_table = b.block_tables + static_cast<int64_t>(seq) * b.max_blocks;
  for (int d = tid; d < hd; d += k_threads) qs[d] = q[static_cast<int64_t>(row) * q_size + h * hd + d];
  __syncthreads();

  float m = -INFINITY, l = 0.0f, acc[NCH];
#pragma unroll
  for (int c = 0; c < NCH; ++c) acc[c] = 0.0f;
  for (int k0 = warp * k_key_block; k0 <= pos; k0 += k_warps * k_key_block) {
    const int key = k0 + lane;
    float s = -INFINITY;
    int64_t at = 0;  // this lane's cache row offset (k and v), for the shuffle below
    if (key <= pos) {
      at = cache_row(block_table, b.block_size, key) * kv_size + kvh * hd;
      float dot = 0.0f;
      if constexpr (sizeof(CacheT) == 2) {
        const uint4* kr = reinterpret_cast<const uint4*>(k_cache + at);
        uint4 kv[4 * NCH];  // the whole key row (head_dim % 8 == 0, <= 32 * NCH): every load in flight
#pragma unroll
        for (int v = 0; v < 4 * NCH; ++v) kv[v] = v < hd / 8 ? __ldg(kr + v) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int v = 0; v < 4 * NCH; ++v)
          if (v < hd / 8)
            dot = dot8(kv[v], *reinterpret_cast<const float4*>(qs + 8 * v), *reinterpret_cast<const float4*>(qs + 8 * v + 4), dot);
      } else {  // f32 cache: the row as float4s, every load in flight
        const float4* kr = reinterpret_cast<const float4*>(k_cache + at);
        float4 kv[8 * NCH];
#pragma unroll
        for (int v = 0; v < 8 * NCH; ++v) kv[v] = v < hd / 4 ? __ldg(kr + v) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int v = 0; v < 8 * NCH; ++v)
          if (v < hd / 4) {
            const float4 qv = *reinterpret_cast<const float4*>(qs + 4 * v);
            dot = fmaf(kv[v].x, qv.x, fmaf(kv[v].y, qv.y, fmaf(kv[v].z, qv.z, fmaf(kv[v].w, qv.w, dot))));
          }
      }
      s = dot * scale;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float p = key <= pos ? expf(s - m_new) : 0.0f;
    const float correction = expf(m - m_new);
    l = l * correction + warp_sum(p);
#pragma unroll
    for (int c = 0; c < NCH; ++c) acc[c] *= correction;
    const int valid = min(k_key_block, pos - k0 + 1);
    for (int j0 = 0; j0 < valid; j0 += k_value_chunk) {  // the values of 16 positions loaded before use
      float vv[k_value_chunk][NCH];
#pragma unroll
      for (int jj = 0; jj < k_value_chunk; ++jj) {
        const int64_t vat = __shfl_sync(k_full_mask, at, j0 + jj);  // 0 (a valid row) past the end
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int d = lane + 32 * c;
          vv[jj][c] = d < hd && j0 + jj < valid ? load1(v_cache + vat + d) : 0.0f;
        }
      }
#pragma unroll
      for (int jj = 0; jj < k_value_chunk; ++jj) {
        const float pj = __shfl_sync(k_full_mask, p, j0 + jj);  // 0 past the last valid position
#pragma unroll
        for (int c = 0; c < NCH; ++c) acc[c] = fmaf(pj, vv[jj][c], acc[c]);
      }
    }
    m = m_new;
  }
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) part_acc[warp][d] = acc[c];
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < k_warps; ++w) m_all = fmaxf(m_all, part_m[w]);
  float l_all = 0.0f, scale_w[k_warps];
  for (int w = 0; w < k_warps; ++w) {
    scale_w[w] = part_m[w] == -INFINITY ? 0.0f : expf(part_m[w] - m_all);  // a warp with no keys adds nothing
    l_all += part_l[w] * scale_w[w];
  }
  const int64_t at = static_cast<int64_t>(row) * q_size + h * hd;
  for (int d = tid; d < hd; d += k_threads) {
    float o = 0.0f;
    for (int w = 0; w < k_warps; ++w) o += part_acc[w][d] * scale_w[w];
    o /= l_all;
    out[at + d] = o;
    if (out_bf16.hi != nullptr) store_bf16(out_bf16, at + d, o);
  }
}

template <int NCH, typename CacheT>
void launch(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
            const AttentionBatch& b, int num_heads, int num_kv_heads, int hd, cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  if (b.num_prefill_tiles > 0) {
    const size_t smem =
        (static_cast<size_t>(k_prefill_tile_rows) * hd + k_key_block * (hd + 1) + k_key_block * hd) * sizeof(float);
    if (smem > 48 * 1024)
      CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_kernel<NCH, CacheT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
    attention_prefill_kernel<NCH, CacheT><<<dim3(b.num_prefill_tiles, num_heads), k_threads, smem, stream>>>(
        out, out_bf16, q, k_cache, v_cache, b, num_heads, num_kv_heads, hd, scale);
    CUDA_CHECK_LAUNCH();
  }
  if (b.num_decode > 0) {
    attention_decode_kernel<NCH, CacheT><<<dim3(b.num_decode, num_heads), k_threads, 0, stream>>>(
        out, out_bf16, q, k_cache, v_cache, b, num_heads, num_kv_heads, hd, scale);
    CUDA_CHECK_LAUNCH();
  }
}

template <typename CacheT>
void dispatch(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
              const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  if (head_dim % 8 != 0 || head_dim > k_max_head_dim) argument_error("attention", "head_dim must be a multiple of 8, at most 256");
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) argument_error("attention", "num_heads must be a multiple of num_kv_heads");
  const int nch = (head_dim + 31) / 32;
  if (nch == 1) launch<1>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
  else if (nch == 2) launch<2>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
  else if (nch <= 4) launch<4>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
  else launch<8>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
}

}  // namespace

void attention(float* out, Bf16Pair out_bf16, const float* q, const bf16* k_cache, const bf16* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  dispatch(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
}

void attention(float* out, Bf16Pair out_bf16, const float* q, const float* k_cache, const float* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  dispatch(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
}

}  // namespace moescope::cuda
