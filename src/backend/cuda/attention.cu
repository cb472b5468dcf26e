// Causal GQA attention over the paged KV cache, with an online softmax in f32 (flash-style). Prefill
// rows are computed in tiles of 64 consecutive tokens of one sequence. With the bf16 cache and head_dim a
// multiple of 16 (at most 128) a tile runs on the tensor cores (flash-attention 2: mma.sync m16n8k16, bf16
// in, f32 accumulate, key blocks of 64 positions double-buffered in shared memory with cp.async; on an
// sm_90a GPU the tile's four warps take both products as one warpgroup on wgmma instead, q and P from the
// registers, k and v read from shared memory by the tensor cores: the same products, whose f32 sums can
// differ from mma.sync's in the last bit); there q and the softmax weights P are rounded to bf16 for the
// two products (new roundings beside the cache's own: a relative error of a few 2^-9), while the scores,
// the softmax and the output stay f32. Otherwise
// (the f32 cache, the accuracy path, and other head sizes) a tile computes in f32 on the CUDA cores,
// sharing each key block loaded into shared memory (16-byte loads). A decode row (a sequence with one new
// token) has a block of its own whose eight warps split the positions, each loading its keys and values
// with all loads in flight, and merge their partial softmaxes; it computes in f32 for either cache.
#include <cstddef>
#include <type_traits>

#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace moescope::cuda {
namespace {

constexpr int k_threads = 256;
constexpr int k_warps = k_threads / 32;
constexpr int k_key_block = 32;                               // positions per step, one per lane
constexpr int k_rows_per_warp = k_prefill_tile_rows / k_warps;  // prefill rows each warp owns
constexpr int k_max_head_dim = 256;
constexpr int k_value_chunk = 16;  // decode: positions whose values are loaded together

// 16 bytes of cached values as floats: 8 bf16 or 4 f32.
__device__ __forceinline__ void unpack16(uint4 w, float (&out)[8]) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = bf16_lo(ws[i]);
    out[2 * i + 1] = bf16_hi(ws[i]);
  }
}
__device__ __forceinline__ void unpack16(uint4 w, float (&out)[4]) {
  out[0] = __uint_as_float(w.x), out[1] = __uint_as_float(w.y), out[2] = __uint_as_float(w.z), out[3] = __uint_as_float(w.w);
}

// Eight consecutive cached values (16 bytes of bf16, or 32 of f32) as floats.
__device__ __forceinline__ void load8(const bf16* at, float (&out)[8]) {
  unpack16(__ldcg(reinterpret_cast<const uint4*>(at)), out);
}
__device__ __forceinline__ void load8(const float* at, float (&out)[8]) {
  const float4 a = __ldcg(reinterpret_cast<const float4*>(at)), b = __ldcg(reinterpret_cast<const float4*>(at) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ float load1(const bf16* at) { return bf16_to_float(*at); }
__device__ __forceinline__ float load1(const float* at) { return *at; }

__device__ __forceinline__ int64_t cache_row(const int32_t* block_table, int block_size, int pos) {
  return static_cast<int64_t>(block_table[pos / block_size]) * block_size + pos % block_size;
}

// grid (num_heads, num_prefill_tiles), as the tensor-core kernel's: every head of a tile before the next
// tile, a prompt's last (longest) tiles first. NCH = ceil(head_dim / 32): dims lane + 32 c for c < NCH per lane.
// Dynamic shared memory: q [64][hd], k [32][hd + 1] (padded: lanes read different rows), v [32][hd].
template <int NCH, typename CacheT>
__global__ void __launch_bounds__(k_threads)
    attention_prefill_kernel(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
                             AttentionBatch b, int num_heads, int num_kv_heads, int hd, float scale) {
  extern __shared__ float smem[];
  wait_for_previous_kernel();
  float* qs = smem;
  float* ks = qs + k_prefill_tile_rows * hd;
  float* vs = ks + k_key_block * (hd + 1);
  const PrefillTile tile = b.prefill_tiles[gridDim.y - 1 - blockIdx.y];
  const int h = blockIdx.x, kvh = h / (num_heads / num_kv_heads);
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

// A decode row's end: the block's k_warps partial softmaxes (running max, sum and unnormalised output of
// head_dim values each, in shared memory after a barrier) merged into the row's output at `at`.
template <int PITCH>
__device__ __forceinline__ void merge_warps(float* out, const Bf16Pair& out_bf16, int64_t at, int hd,
                                            const float* part_m, const float* part_l, const float (*part_acc)[PITCH]) {
  float m_all = -INFINITY;
  for (int w = 0; w < k_warps; ++w) m_all = fmaxf(m_all, part_m[w]);
  float l_all = 0.0f, scale_w[k_warps];
  for (int w = 0; w < k_warps; ++w) {
    scale_w[w] = part_m[w] == -INFINITY ? 0.0f : expf(part_m[w] - m_all);  // a warp with no positions adds nothing
    l_all += part_l[w] * scale_w[w];
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < k_warps; ++w) o += part_acc[w][d] * scale_w[w];
    o /= l_all;
    out[at + d] = o;
    if (out_bf16.hi != nullptr) store_bf16(out_bf16, at + d, o);
  }
}

// The eight warps' partial softmaxes as one block's partial: partial[0] = max, partial[1] = sum, partial[2 +
// d] = the output's dim d, unnormalised (scaled to that max).
template <int PITCH>
__device__ __forceinline__ void merge_warps(float* partial, std::nullptr_t, int hd, const float* part_m,
                                            const float* part_l, const float (*part_acc)[PITCH]) {
  float m_all = -INFINITY;
  for (int w = 0; w < k_warps; ++w) m_all = fmaxf(m_all, part_m[w]);
  float l_all = 0.0f, scale_w[k_warps];
  for (int w = 0; w < k_warps; ++w) {
    scale_w[w] = part_m[w] == -INFINITY ? 0.0f : expf(part_m[w] - m_all);
    l_all += part_l[w] * scale_w[w];
  }
  if (threadIdx.x == 0) partial[0] = m_all, partial[1] = l_all;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < k_warps; ++w) o += part_acc[w][d] * scale_w[w];
    partial[2 + d] = o;
  }
}

// The parts' partial softmaxes (merge_warps above, `parts` of them, hd + 2 floats apart) merged in part
// order into the output row at `at`. Read through L2: other blocks wrote them.
__device__ __forceinline__ void merge_splits(float* out, const Bf16Pair& out_bf16, int64_t at, int hd,
                                             const float* partials, int parts) {
  float m_all = -INFINITY;
  for (int z = 0; z < parts; ++z) m_all = fmaxf(m_all, __ldcg(partials + z * (hd + 2)));
  float l_all = 0.0f;
  for (int z = 0; z < parts; ++z)
    l_all += __ldcg(partials + z * (hd + 2) + 1) * expf(__ldcg(partials + z * (hd + 2)) - m_all);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int z = 0; z < parts; ++z)
      o += __ldcg(partials + z * (hd + 2) + 2 + d) * expf(__ldcg(partials + z * (hd + 2)) - m_all);
    o /= l_all;
    out[at + d] = o;
    if (out_bf16.hi != nullptr) store_bf16(out_bf16, at + d, o);
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
  wait_for_previous_kernel();
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
        for (int v = 0; v < 4 * NCH; ++v) kv[v] = v < hd / 8 ? __ldcg(kr + v) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int v = 0; v < 4 * NCH; ++v)
          if (v < hd / 8)
            dot = dot8(kv[v], *reinterpret_cast<const float4*>(qs + 8 * v), *reinterpret_cast<const float4*>(qs + 8 * v + 4), dot);
      } else {  // f32 cache: the row as float4s, every load in flight
        const float4* kr = reinterpret_cast<const float4*>(k_cache + at);
        float4 kv[8 * NCH];
#pragma unroll
        for (int v = 0; v < 8 * NCH; ++v) kv[v] = v < hd / 4 ? __ldcg(kr + v) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
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
  merge_warps(out, out_bf16, static_cast<int64_t>(row) * q_size + h * hd, hd, part_m, part_l, part_acc);
}

// ---- prefill on the tensor cores: bf16 cache, head_dim a multiple of 16, at most 128 --------------------

constexpr int k_mma_threads = 128;      // 4 warps
constexpr int k_mma_warp_rows = 16;     // query rows per warp: one m16 tile
constexpr int k_mma_keys = 64;          // key positions per block (one pipeline stage)
constexpr int k_mma_max_head_dim = 128;
static_assert(k_mma_threads / 32 * k_mma_warp_rows == k_prefill_tile_rows, "4 warps of 16 rows make a tile");

// Dynamic shared memory of the kernel: k and v of two key blocks, [2][64][hd + 8] bf16 each. The 16-byte
// pad makes the row pitch an odd number of 16-byte units (hd % 16 == 0), so the eight rows of an ldmatrix
// phase fall in eight different bank groups. With WGMMA (Hopper's warpgroup MMA) k is kept as wgmma
// reads it instead (wgmma.cuh): per stage, chunks of 64 dims, each [64 keys][128 bytes] swizzled,
// 1024-aligned (1024 bytes more for the alignment); v after it, the same way for HDMAX 128 (P . V on
// wgmma too), else as before.
constexpr int k_key_chunk_bytes = k_mma_keys * 128;  // 64 dims of 64 keys
__host__ __device__ constexpr int key_chunks(int hdmax) { return hdmax > 64 ? hdmax / 64 : 1; }
size_t mma_smem_bytes(int hd, int hdmax, bool wgmma) {
  const size_t v = size_t{2} * k_mma_keys * (hd + 8) * sizeof(bf16), k = size_t{2} * key_chunks(hdmax) * k_key_chunk_bytes;
  if (!wgmma) return 2 * v;
  return 1024 + k + (hdmax == 128 ? k : v);
}

// grid (num_heads, num_prefill_tiles). Warp w owns the tile's rows 16 w .. 16 w + 15: their q as A
// fragments (bf16) and their output as C fragments (f32). Lane (g, tq) holds rows 16 w + g and
// 16 w + g + 8. HDMAX: head_dim rounded up to 32, 64 or 128, the size of the register arrays (16-dim
// steps past hd are skipped). WGMMA (sm_90a): the four warps, one warpgroup, take the scores q . k of a
// key block with one wgmma.m64n64k16 per 16 dims (q from the registers, k from shared memory), whose
// accumulators are laid out as the mma.sync ones; for HDMAX 128 (WG_PV) also P . V, one wgmma.m64n128k16
// per 16 keys (P from the registers, v from shared memory as an MN-major operand), below on mma.sync.
template <int HDMAX, bool WGMMA>
__global__ void __launch_bounds__(k_mma_threads, 3)
    attention_prefill_mma_kernel(float* out, Bf16Pair out_bf16, const float* q, const bf16* k_cache,
                                 const bf16* v_cache, AttentionBatch b, int num_heads, int num_kv_heads, int hd,
                                 float scale_log2) {
  constexpr int KS = HDMAX / 16;      // 16-dim steps of q . k
  constexpr int ND = HDMAX / 8;       // 8-dim column tiles of the output
  constexpr int NK = k_mma_keys / 8;  // 8-key column tiles of the scores
  constexpr int KCH = key_chunks(HDMAX), K_STAGE_BYTES = KCH * k_key_chunk_bytes;
  constexpr bool WG_PV = WGMMA && HDMAX == 128;  // P . V on wgmma too (v laid out as k)
  extern __shared__ uint4 kv_smem[];  // uint4: 16-byte aligned for cp.async and ldmatrix
  const int pitch = hd + 8, stage_elems = k_mma_keys * pitch;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(kv_smem));
  const uint32_t k_swizzled = (smem_base + 1023) & ~1023u;  // WGMMA: [2][KCH][64][128 bytes]
  bf16* const ks = reinterpret_cast<bf16*>(kv_smem);        // else: [2][64][pitch]
  bf16* const vs = WGMMA ? reinterpret_cast<bf16*>(reinterpret_cast<unsigned char*>(kv_smem) +
                                                   (k_swizzled - smem_base) + 2 * K_STAGE_BYTES)
                         : ks + 2 * stage_elems;  // [2][64][pitch]; WG_PV: as k, [2][KCH][64][128 bytes]
  const uint32_t v_swizzled = k_swizzled + 2 * K_STAGE_BYTES;
  wait_for_previous_kernel();

  // A prompt's tiles come in position order and its last tiles see the most keys: the grid starts those
  // first, every head of a tile before the next tile, which shortens the grid's tail (the blocks start in
  // x-fastest order).
  const PrefillTile tile = b.prefill_tiles[gridDim.y - 1 - blockIdx.y];
  const int h = blockIdx.x, kvh = h / (num_heads / num_kv_heads);
  const int q_size = num_heads * hd, kv_size = num_kv_heads * hd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int32_t* block_table = b.block_tables + static_cast<int64_t>(tile.seq) * b.max_blocks;
  const int last_pos = tile.pos + tile.num_rows - 1;

  // Keys and values of positions k0 .. k0 + 63 into stage `stage`, 16 bytes per cp.async: thread tid
  // moves the 16-byte piece tid % CPR of the rows tid / CPR + RPP i (compile-time counts: the loop unrolls
  // and all of a thread's cache lookups are in flight at once; pieces past hd are skipped). The cache row
  // is looked up per position (a key block spans several cache blocks when block_size < 64), with a shift
  // where block_size is a power of two. Positions past last_pos are zero-filled: their P is 0, and 0 times
  // a NaN left in shared memory would not be.
  constexpr int CPR = HDMAX / 8, RPP = k_mma_threads / CPR, ITERS = k_mma_keys / RPP;
  static_assert(k_mma_threads % CPR == 0 && k_mma_keys % RPP == 0, "whole rows per pass of the threads");
  const int piece = (tid % CPR) * 8, piece_row = tid / CPR;
  const bool piece_in = piece < hd;
  const int bs = b.block_size, bs_shift = __ffs(bs) - 1;
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  auto load_block = [&](int stage, int k0) {
    bf16* kd = ks + stage * stage_elems;
    bf16* vd = vs + stage * stage_elems;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = piece_row + RPP * i, pos = k0 + j;
      const bool valid = pos <= last_pos;
      const int blk = bs_pow2 ? pos >> bs_shift : pos / bs;
      const int64_t cache_pos = valid ? static_cast<int64_t>(block_table[blk]) * bs + (pos - blk * bs) : 0;
      const int64_t at = valid ? cache_pos * kv_size + kvh * hd + piece : 0;
      if constexpr (WGMMA)  // the pieces past hd too, as zeros: the products run over HDMAX dims
        cp_async16_shared(k_swizzled + stage * K_STAGE_BYTES + (piece / 64) * k_key_chunk_bytes +
                              swizzle128(j, (piece % 64) / 8),
                          k_cache + (piece_in ? at : 0), valid && piece_in);
      if (piece_in) {
        if constexpr (!WGMMA) cp_async16(kd + j * pitch + piece, k_cache + at, valid);
        if constexpr (WG_PV)
          cp_async16_shared(v_swizzled + stage * K_STAGE_BYTES + (piece / 64) * k_key_chunk_bytes +
                                swizzle128(j, (piece % 64) / 8),
                            v_cache + at, valid);
        else
          cp_async16(vd + j * pitch + piece, v_cache + at, valid);
      }
    }
  };
  const int num_key_blocks = last_pos / k_mma_keys + 1;
  load_block(0, 0);
  cp_async_commit();

  const int r0 = warp * k_mma_warp_rows + g, r1 = r0 + 8;  // this lane's rows in the tile
  const int pos0 = tile.pos + r0, pos1 = tile.pos + r1;
  // Rows past the tile's end have positions past last_pos, so the causal mask alone keeps their scores
  // finite (their q is zero); they are never written.
  const int warp_rows = min(k_mma_warp_rows, tile.num_rows - warp * k_mma_warp_rows);  // <= 0: none
  const int warp_first_pos = tile.pos + warp * k_mma_warp_rows, warp_last_pos = warp_first_pos + warp_rows - 1;

  // q rounded to bf16 once (round to nearest even), as the A fragments of the 16-dim steps.
  uint32_t qf[KS][4];
  {
    const bool ok0 = r0 < tile.num_rows, ok1 = r1 < tile.num_rows;
    const float* q0 = q + static_cast<int64_t>(tile.row + (ok0 ? r0 : 0)) * q_size + h * hd;
    const float* q1 = q + static_cast<int64_t>(tile.row + (ok1 ? r1 : 0)) * q_size + h * hd;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const int d = 16 * kk + 2 * tq;
      const bool in = 16 * kk < hd;
      float2 a0 = make_float2(0.0f, 0.0f), a1 = a0, a2 = a0, a3 = a0;
      if (in && ok0) {
        a0 = __ldcg(reinterpret_cast<const float2*>(q0 + d));
        a2 = __ldcg(reinterpret_cast<const float2*>(q0 + d + 8));
      }
      if (in && ok1) {
        a1 = __ldcg(reinterpret_cast<const float2*>(q1 + d));
        a3 = __ldcg(reinterpret_cast<const float2*>(q1 + d + 8));
      }
      qf[kk][0] = pack_bf16x2(a0.x, a0.y);
      qf[kk][1] = pack_bf16x2(a1.x, a1.y);
      qf[kk][2] = pack_bf16x2(a2.x, a2.y);
      qf[kk][3] = pack_bf16x2(a3.x, a3.y);
    }
  }

  // o: C fragments of the output tiles (8 dims each); m: running max of the unscaled scores; l: this
  // lane's part of the running sum (its 16 of a row's 64 keys per block; the quad's parts are added at
  // the end). Row r0 takes c0, c1 and m0, l0; row r1 takes c2, c3 and m1, l1.
  float o[ND * 4];  // o[4 nd + c]: the C fragment of dims 8 nd .. 8 nd + 7 (WG_PV: the m64n128 accumulators)
#pragma unroll
  for (int i = 0; i < ND * 4; ++i) o[i] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  // Lane addresses for ldmatrix (lane 8 i + r gives row r of matrix i). k: matrices (keys +0, dims +0),
  // (keys +0, dims +8), (keys +8, dims +0), (keys +8, dims +8): b0, b1 of two 8-key tiles. v (.trans):
  // (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +8), (keys +8, dims +8): b0, b1 of two 8-dim tiles.
  const int k_lane = ((lane & 7) + ((lane >> 4) << 3)) * pitch + ((lane >> 3) & 1) * 8;
  const int v_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * pitch + (lane >> 4) * 8;

  for (int kb = 0; kb < num_key_blocks; ++kb) {
    if (kb + 1 < num_key_blocks) {
      load_block((kb + 1) & 1, (kb + 1) * k_mma_keys);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (WGMMA) fence_proxy_async();  // this thread's copies of k, visible to the tensor cores
    __syncthreads();  // block kb is in shared memory
    const int k0 = kb * k_mma_keys;
    // S = q k^T over the 64 keys: s[nt] holds keys k0 + 8 nt .. + 7. WGMMA: for the whole warpgroup (every
    // block of the loop reaches some row of the tile).
    float s[NK][4];
    if constexpr (WGMMA) {
      // Every 16 dims up to HDMAX (k's dims past hd are zeros, as q's).
      static_assert(NK * 4 == 32, "64 keys: the accumulators of m64n64");
      float sw[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) sw[i] = 0.0f;
      const uint32_t kt = k_swizzled + (kb & 1) * K_STAGE_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        wgmma_m64n64k16_rs(sw, qf[kk], wgmma_desc(kt + (kk / 4) * k_key_chunk_bytes + (kk % 4) * 32));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(sw);
#pragma unroll
      for (int nt = 0; nt < NK; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nt][c] = sw[4 * nt + c];
    } else {
#pragma unroll
      for (int nt = 0; nt < NK; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nt][c] = 0.0f;
    }
    // A block wholly above the diagonal of the warp's rows adds nothing (uniform over the warp). Every
    // warp with rows takes block 0, where key 0 is visible to each row: the running max is finite from then on.
    uint32_t pf[NK / 2][4];  // P rounded to bf16: the A fragments of keys k0 + 16 kc .. + 15
#pragma unroll
    for (int kc = 0; kc < NK / 2; ++kc)
#pragma unroll
      for (int i = 0; i < 4; ++i) pf[kc][i] = 0u;
    if (k0 <= warp_last_pos) {
      if constexpr (!WGMMA) {
        const bf16* kt = ks + (kb & 1) * stage_elems;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          if (16 * kk >= hd) continue;
#pragma unroll
          for (int nt = 0; nt < NK; nt += 2) {
            uint32_t bk[4];
            ldmatrix_x4(bk, kt + k_lane + nt * 8 * pitch + 16 * kk);
            mma_bf16(s[nt], qf[kk], bk[0], bk[1]);
            mma_bf16(s[nt + 1], qf[kk], bk[2], bk[3]);
          }
        }
      }

      // Causal mask, where the block reaches past the diagonal of one of the warp's rows.
      if (k0 + k_mma_keys - 1 > warp_first_pos) {
#pragma unroll
        for (int nt = 0; nt < NK; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int key = k0 + nt * 8 + 2 * tq + (c & 1);
            if (key > (c < 2 ? pos0 : pos1)) s[nt][c] = -INFINITY;
          }
      }

      // Online softmax in f32. A row's 64 scores lie in the four lanes of a quad.
      float mx0 = m0, mx1 = m1;
#pragma unroll
      for (int nt = 0; nt < NK; ++nt) {
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(k_full_mask, mx0, offset));
        mx1 = fmaxf(mx1, __shfl_xor_sync(k_full_mask, mx1, offset));
      }
      // exp(scale (s - m)) as exp2(s scale log2(e) - m scale log2(e)); 0 on the first block (m = -inf).
      const float corr0 = exp2f((m0 - mx0) * scale_log2), corr1 = exp2f((m1 - mx1) * scale_log2);
      const float base0 = mx0 * scale_log2, base1 = mx1 * scale_log2;
      float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NK; ++nt) {
        const float p0 = exp2f(fmaf(s[nt][0], scale_log2, -base0)), p1 = exp2f(fmaf(s[nt][1], scale_log2, -base0));
        const float p2 = exp2f(fmaf(s[nt][2], scale_log2, -base1)), p3 = exp2f(fmaf(s[nt][3], scale_log2, -base1));
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        pf[nt / 2][2 * (nt & 1)] = pack_bf16x2(p0, p1);      // row g: a0 (keys +0..7) or a2 (keys +8..15)
        pf[nt / 2][2 * (nt & 1) + 1] = pack_bf16x2(p2, p3);  // row g + 8: a1 or a3
      }
      l0 = l0 * corr0 + sum0;
      l1 = l1 * corr1 + sum1;
      m0 = mx0;
      m1 = mx1;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        o[4 * nd + 0] *= corr0;
        o[4 * nd + 1] *= corr0;
        o[4 * nd + 2] *= corr1;
        o[4 * nd + 3] *= corr1;
      }

      // O += P V, 16 keys per step.
      if constexpr (!WG_PV) {
        const bf16* vt = vs + (kb & 1) * stage_elems;
#pragma unroll
        for (int kc = 0; kc < NK / 2; ++kc)
#pragma unroll
          for (int nd = 0; nd < ND; nd += 2) {
            if (8 * nd >= hd) continue;
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, vt + v_lane + 16 * kc * pitch + 8 * nd);
            mma_bf16(*reinterpret_cast<float(*)[4]>(&o[4 * nd]), pf[kc], bv[0], bv[1]);
            mma_bf16(*reinterpret_cast<float(*)[4]>(&o[4 * nd + 4]), pf[kc], bv[2], bv[3]);
          }
      }
    }
    if constexpr (WG_PV) {  // the whole warpgroup, P = 0 for the rows of a warp that skipped the block
      const uint32_t vt = v_swizzled + (kb & 1) * K_STAGE_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kc = 0; kc < NK / 2; ++kc)
        wgmma_m64n128k16_rs_mn(o, pf[kc], wgmma_desc_mn(vt + kc * 16 * 128, k_key_chunk_bytes));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(o);
    }
    __syncthreads();  // the stage just read is the next one loaded
  }

#pragma unroll
  for (int offset = 1; offset < 4; offset <<= 1) {
    l0 += __shfl_xor_sync(k_full_mask, l0, offset);
    l1 += __shfl_xor_sync(k_full_mask, l1, offset);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half == 0 ? r0 : r1;
    if (r >= tile.num_rows) continue;
    const float l = half == 0 ? l0 : l1;
    const int64_t at = static_cast<int64_t>(tile.row + r) * q_size + h * hd;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      if (8 * nd >= hd) continue;
      const int d = 8 * nd + 2 * tq;
      const float v0 = o[4 * nd + 2 * half] / l, v1 = o[4 * nd + 2 * half + 1] / l;
      *reinterpret_cast<float2*>(out + at + d) = make_float2(v0, v1);
      if (out_bf16.hi != nullptr) {
        store_bf16(out_bf16, at + d, v0);
        store_bf16(out_bf16, at + d + 1, v1);
      }
    }
  }
}

void launch_prefill_mma(float* out, Bf16Pair out_bf16, const float* q, const bf16* k_cache, const bf16* v_cache,
                        const AttentionBatch& b, int num_heads, int num_kv_heads, int hd, cudaStream_t stream) {
  constexpr float k_log2e = 1.4426950408889634f;
  const float scale_log2 = k_log2e / sqrtf(static_cast<float>(hd));
  const bool wgmma = wgmma_allowed() && wgmma_available();
  auto run = [&](auto kernel, int hdmax, bool with_wgmma) {
    const size_t smem = mma_smem_bytes(hd, hdmax, with_wgmma);
    allow_dynamic_smem(kernel, smem);
    launch_kernel(kernel, dim3(num_heads, b.num_prefill_tiles), k_mma_threads, smem, stream, out, out_bf16, q, k_cache,
                  v_cache, b, num_heads, num_kv_heads, hd, scale_log2);
    CUDA_CHECK_LAUNCH();
  };
  auto run_hd = [&]<int HDMAX>() {
    if (wgmma) run(attention_prefill_mma_kernel<HDMAX, true>, HDMAX, true);
    else run(attention_prefill_mma_kernel<HDMAX, false>, HDMAX, false);
  };
  if (hd <= 32) run_hd.template operator()<32>();
  else if (hd <= 64) run_hd.template operator()<64>();
  else run_hd.template operator()<128>();
}

// ---- decode rows, vectorised: a group of lanes per cached row -------------------------------------------

// grid (num_decode, num_heads), k_threads threads. A cached row of head_dim elements is LPR lanes x 16
// bytes (LPR = head_dim x element size / 16, a power of two up to 32), so one warp reads 32 / LPR rows per
// load, all of a step's k and v loads in flight at once (k_vec_steps rows per lane group: 4 loads of 16
// bytes each for k and for v). Lane (group, chunk) holds dims chunk x VEC .. + VEC of q and of its output; a
// score is its group's partial dots added over the LPR lanes. Warp w takes the steps w, w + 8, ... of
// the positions 0..pos; the online softmax (running max and sum) is kept per warp, the eight merged at
// the end as in the kernel above. Compared with it, every load is 16 bytes and the values need no
// shuffles: the same f32 arithmetic in another order.
// chunk > 0 (flash-decoding, few rows): grid (num_decode, num_heads, splits), block z takes the positions
// z chunk .. z chunk + chunk - 1 (<= pos; a block past pos exits) and leaves its partial softmax (max,
// sum, unnormalised output) in b.split_partials; the last of a (row, head)'s blocks to finish (a ticket)
// merges them in split order (merge_splits), so the result does not depend on which block ends last.
// Occupancy over depth: 4 rows a step and at most 64 registers, so that 4 blocks share an SM. A decode
// block's life is mostly waiting on its loads, and more of them at once serve the bandwidth better than
// deeper steps (cuda_kernels_bench on the H100, batch 256 x 144 positions, 16 heads of 128: 8 rows a step
// and 127 registers, 2 blocks an SM, 208 us = 1.45 TB/s; 4 rows and 4 blocks, 132 us = 2.29 TB/s).
constexpr int k_vec_steps = 4;  // rows per lane group per step
constexpr int k_decode_split_chunk = 256;  // positions per block of a split decode row

template <typename CacheT, int LPR>
__global__ void __launch_bounds__(k_threads, 4)
    attention_decode_vec_kernel(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache,
                                const CacheT* v_cache, AttentionBatch b, int num_heads, int num_kv_heads, int hd,
                                float scale, int chunk) {
  constexpr int VEC = 16 / sizeof(CacheT);  // elements per 16-byte load
  constexpr int GROUPS = 32 / LPR;          // rows per warp and load
  constexpr int STEP = GROUPS * k_vec_steps;  // positions per warp and step
  __shared__ float part_m[k_warps], part_l[k_warps];
  __shared__ __align__(16) float part_acc[k_warps][LPR * VEC];
  wait_for_previous_kernel();
  const int row = b.decode_rows[blockIdx.x];
  const int seq = b.token_seq[row], pos = b.token_pos[row];
  const int h = blockIdx.y, kvh = h / (num_heads / num_kv_heads);
  // This block's positions first .. last, of the (row, head)'s parts.
  const int first = chunk > 0 ? static_cast<int>(blockIdx.z) * chunk : 0;
  const int last = chunk > 0 ? min(pos, first + chunk - 1) : pos, parts = chunk > 0 ? pos / chunk + 1 : 1;
  if (first > pos) return;
  const int q_size = num_heads * hd, kv_size = num_kv_heads * hd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = lane / LPR, piece = lane % LPR;
  const int32_t* block_table = b.block_tables + static_cast<int64_t>(seq) * b.max_blocks;

  float qv[VEC];
  {
    const float* qr = q + static_cast<int64_t>(row) * q_size + h * hd + piece * VEC;
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 v4 = __ldcg(reinterpret_cast<const float4*>(qr + i));
      qv[i] = v4.x * scale, qv[i + 1] = v4.y * scale, qv[i + 2] = v4.z * scale, qv[i + 3] = v4.w * scale;
    }
  }
  float m = -INFINITY, l = 0.0f, acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

  for (int base = first + warp * STEP; base <= last; base += k_warps * STEP) {
    uint4 kraw[k_vec_steps], vraw[k_vec_steps];
    bool valid[k_vec_steps];
#pragma unroll
    for (int u = 0; u < k_vec_steps; ++u) {  // every load of the step in flight
      const int key = base + u * GROUPS + group;
      valid[u] = key <= last;
      kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const int64_t at = cache_row(block_table, b.block_size, key) * kv_size + kvh * hd + piece * VEC;
        kraw[u] = __ldcg(reinterpret_cast<const uint4*>(k_cache + at));
        vraw[u] = __ldcg(reinterpret_cast<const uint4*>(v_cache + at));
      }
    }
    float s[k_vec_steps];
    float step_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < k_vec_steps; ++u) {
      float kf[VEC];
      unpack16(kraw[u], kf);
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot = fmaf(qv[i], kf[i], dot);
#pragma unroll
      for (int offset = LPR / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(k_full_mask, dot, offset);
      s[u] = valid[u] ? dot : -INFINITY;
      step_max = fmaxf(step_max, s[u]);
    }
#pragma unroll
    for (int offset = LPR; offset < 32; offset <<= 1) step_max = fmaxf(step_max, __shfl_xor_sync(k_full_mask, step_max, offset));
    const float m_new = fmaxf(m, step_max);  // finite: the warp's first position of the step is <= last
    const float correction = expf(m - m_new);  // 0 on the first step (m = -inf)
    float p_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= correction;
#pragma unroll
    for (int u = 0; u < k_vec_steps; ++u) {
      const float p = valid[u] ? expf(s[u] - m_new) : 0.0f;
      p_sum += p;
      float vf[VEC];
      unpack16(vraw[u], vf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
    }
#pragma unroll
    for (int offset = LPR; offset < 32; offset <<= 1) p_sum += __shfl_xor_sync(k_full_mask, p_sum, offset);
    l = l * correction + p_sum;
    m = m_new;
  }
  // The groups of a warp hold the same dims for different positions: add them.
#pragma unroll
  for (int i = 0; i < VEC; ++i)
#pragma unroll
    for (int offset = LPR; offset < 32; offset <<= 1) acc[i] += __shfl_xor_sync(k_full_mask, acc[i], offset);
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
  if (group == 0)
#pragma unroll
    for (int i = 0; i < VEC; ++i) part_acc[warp][piece * VEC + i] = acc[i];
  __syncthreads();
  const int64_t at = static_cast<int64_t>(row) * q_size + h * hd;
  if (parts == 1) {
    merge_warps(out, out_bf16, at, hd, part_m, part_l, part_acc);
    return;
  }
  const int pair = static_cast<int>(blockIdx.x) * num_heads + h;  // < decode_split_blocks()
  float* const partials = b.split_partials + static_cast<int64_t>(pair) * gridDim.z * (hd + 2);
  merge_warps(partials + blockIdx.z * (hd + 2), nullptr, hd, part_m, part_l, part_acc);
  __shared__ bool last_block;
  __threadfence();  // this block's partial, visible before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&b.split_tickets[pair], 1u) == static_cast<unsigned>(parts - 1);
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (threadIdx.x == 0) b.split_tickets[pair] = 0;  // for the next launch (launches on a stream run in order)
  merge_splits(out, out_bf16, at, hd, partials, parts);
}

// The vectorised decode kernel for this cache and head size, or nullptr where a row is not a power of two
// of 16-byte pieces up to 32 (the kernel above takes those).
template <typename CacheT>
using DecodeVecKernel = void (*)(float*, Bf16Pair, const float*, const CacheT*, const CacheT*, AttentionBatch, int, int,
                                 int, float, int);
template <typename CacheT>
DecodeVecKernel<CacheT> decode_vec_kernel(int hd) {
  const int bytes = hd * static_cast<int>(sizeof(CacheT));
  if (bytes % 16 != 0) return nullptr;
  switch (bytes / 16) {
    case 1: return attention_decode_vec_kernel<CacheT, 1>;
    case 2: return attention_decode_vec_kernel<CacheT, 2>;
    case 4: return attention_decode_vec_kernel<CacheT, 4>;
    case 8: return attention_decode_vec_kernel<CacheT, 8>;
    case 16: return attention_decode_vec_kernel<CacheT, 16>;
    case 32: return attention_decode_vec_kernel<CacheT, 32>;
    default: return nullptr;
  }
}

// The CUDA-core kernels: prefill tiles (when `prefill`) and decode rows.
template <int NCH, typename CacheT>
void launch(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
            const AttentionBatch& b, int num_heads, int num_kv_heads, int hd, bool prefill, cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  if (prefill && b.num_prefill_tiles > 0) {
    const size_t smem =
        (static_cast<size_t>(k_prefill_tile_rows) * hd + k_key_block * (hd + 1) + k_key_block * hd) * sizeof(float);
    allow_dynamic_smem(attention_prefill_kernel<NCH, CacheT>, smem);
    launch_kernel(attention_prefill_kernel<NCH, CacheT>, dim3(num_heads, b.num_prefill_tiles), k_threads, smem, stream,
                  out, out_bf16, q, k_cache, v_cache, b, num_heads, num_kv_heads, hd, scale);
    CUDA_CHECK_LAUNCH();
  }
  if (b.num_decode > 0) {
    if (const DecodeVecKernel<CacheT> vec = decode_vec_kernel<CacheT>(hd); vec != nullptr) {
      // Few (row, head) pairs leave most SMs idle: split the positions into chunks of 256 (more where the
      // block tables' widest row needs more than k_decode_max_splits of them), a block each. The chunks do
      // not depend on the tables' width up to 16384 positions, so a graph (widest tables) and an eager pass
      // give the same sums.
      const int pairs = b.num_decode * num_heads, widest = b.max_blocks * b.block_size;
      int splits = 1, chunk = 0;
      if (b.split_partials != nullptr && pairs < decode_split_blocks() && widest > k_decode_split_chunk) {
        chunk = std::max(k_decode_split_chunk, ceil_div(ceil_div(widest, k_decode_max_splits), 64) * 64);
        splits = ceil_div(widest, chunk);
      }
      launch_kernel(vec, dim3(b.num_decode, num_heads, splits), k_threads, 0, stream, out, out_bf16, q, k_cache,
                    v_cache, b, num_heads, num_kv_heads, hd, scale, splits > 1 ? chunk : 0);
    } else
      launch_kernel(attention_decode_kernel<NCH, CacheT>, dim3(b.num_decode, num_heads), k_threads, 0, stream, out,
                    out_bf16, q, k_cache, v_cache, b, num_heads, num_kv_heads, hd, scale);
    CUDA_CHECK_LAUNCH();
  }
}

template <typename CacheT>
void dispatch(float* out, Bf16Pair out_bf16, const float* q, const CacheT* k_cache, const CacheT* v_cache,
              const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  if (head_dim % 8 != 0 || head_dim > k_max_head_dim) argument_error("attention", "head_dim must be a multiple of 8, at most 256");
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) argument_error("attention", "num_heads must be a multiple of num_kv_heads");
  bool prefill = true;  // prefill tiles still to run, on the CUDA cores
  if constexpr (std::is_same_v<CacheT, bf16>) {  // the f32 cache keeps f32 attention throughout
    if (batch.num_prefill_tiles > 0 && head_dim % 16 == 0 && head_dim <= k_mma_max_head_dim) {
      launch_prefill_mma(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
      prefill = false;
    }
  }
  const int nch = (head_dim + 31) / 32;
  if (nch == 1) launch<1>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, prefill, stream);
  else if (nch == 2) launch<2>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, prefill, stream);
  else if (nch <= 4) launch<4>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, prefill, stream);
  else launch<8>(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, prefill, stream);
}

}  // namespace

int decode_split_blocks() { return 2 * multiprocessors(); }

void attention(float* out, Bf16Pair out_bf16, const float* q, const bf16* k_cache, const bf16* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  dispatch(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
}

void attention(float* out, Bf16Pair out_bf16, const float* q, const float* k_cache, const float* v_cache,
               const AttentionBatch& batch, int num_heads, int num_kv_heads, int head_dim, cudaStream_t stream) {
  dispatch(out, out_bf16, q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, stream);
}

}  // namespace moescope::cuda
