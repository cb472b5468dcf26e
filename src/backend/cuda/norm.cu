// Embedding lookup, RMSNorm (with the previous block's feed-forward output folded into the residual
// first) and the SwiGLU activation of the large-batch dense MLPs.
#include "backend/cuda/common.cuh"

namespace moescope::cuda {
namespace {

// One block per token.  x: [T, hidden] f32, table: [vocab, hidden] bf16, token_ids: [T].
__global__ void embed_kernel(float* x, const bf16* table, const int32_t* token_ids, int hidden) {
  wait_for_previous_kernel();
  const int t = blockIdx.x;
  const bf16* row = table + static_cast<int64_t>(token_ids[t]) * hidden;
  float* out = x + static_cast<int64_t>(t) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = bf16_to_float(row[i]);
}

constexpr int k_norm_vecs = 2;  // float4 per thread: hidden <= 8 * 1024

__device__ __forceinline__ void fold_slot4(float4& block_out, float scale, float4 slot) {
  block_out.x = fold_slot(block_out.x, scale, slot.x);
  block_out.y = fold_slot(block_out.y, scale, slot.y);
  block_out.z = fold_slot(block_out.z, scale, slot.z);
  block_out.w = fold_slot(block_out.w, scale, slot.w);
}

// One block per row; each thread keeps its (at most 2) float4 of the row in registers, so every load of a
// row is in flight at once (a decode's norm is one block: latency, not bandwidth, is what it costs).
// x: [T, hidden] residual (fold added in place); out: [num_rows, hidden] or null; out_bf16: [num_rows,
// hidden] (hi, and lo when given) or null; rows: [num_rows] or null; weight: [hidden]. hidden % 4 == 0.
__global__ void __launch_bounds__(1024) rms_norm_kernel(float* out, Bf16Pair out_bf16, float* x, const int32_t* rows, int hidden,
                                const float* weight, float eps, FfnFold fold) {
  __shared__ float scratch[32];
  wait_for_previous_kernel();
  const int r = blockIdx.x, tid = threadIdx.x, threads = blockDim.x, nv = hidden / 4;
  const int t = rows != nullptr ? rows[r] : r;
  float4* xt = reinterpret_cast<float4*>(x + static_cast<int64_t>(t) * hidden);
  float4 v[k_norm_vecs];
#pragma unroll
  for (int j = 0; j < k_norm_vecs; ++j) {
    const int i = tid + j * threads;
    v[j] = i < nv ? xt[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  if (fold.ffn_out != nullptr) {
    // As the CPU: the block's output (routed experts, then the gated shared expert) summed first,
    // then added to the residual.
    const float* f = fold.ffn_out + static_cast<int64_t>(t) * fold.num_slots * hidden;
    float4 block_out[k_norm_vecs] = {};
#pragma unroll 2
    for (int s = 0; s < fold.num_slots; ++s) {
      const bool gated = s == fold.num_slots - 1 && fold.last_slot_scale != nullptr;
      const float scale = gated ? fold.last_slot_scale[t] : 1.0f;  // * 1.0f is exact
      const float4* fs = reinterpret_cast<const float4*>(f + static_cast<int64_t>(s) * hidden);
#pragma unroll
      for (int j = 0; j < k_norm_vecs; ++j) {
        const int i = tid + j * threads;
        if (i < nv) fold_slot4(block_out[j], scale, fs[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < k_norm_vecs; ++j) {
      const int i = tid + j * threads;
      if (i < nv) {
        v[j] = make_float4(v[j].x + block_out[j].x, v[j].y + block_out[j].y, v[j].z + block_out[j].z, v[j].w + block_out[j].w);
        xt[i] = v[j];
      }
    }
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < k_norm_vecs; ++j) sum_sq += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  sum_sq = block_sum(sum_sq, scratch);
  // HF: hidden * torch.rsqrt(variance + eps), then weight * hidden.
  const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(hidden) + eps);
  float4* o = out != nullptr ? reinterpret_cast<float4*>(out + static_cast<int64_t>(r) * hidden) : nullptr;
  const float4* w4 = reinterpret_cast<const float4*>(weight);
#pragma unroll
  for (int j = 0; j < k_norm_vecs; ++j) {
    const int i = tid + j * threads;
    if (i >= nv) continue;
    const float4 wv = w4[i];
    const float4 y = make_float4(wv.x * (v[j].x * inv), wv.y * (v[j].y * inv), wv.z * (v[j].z * inv), wv.w * (v[j].w * inv));
    if (o != nullptr) o[i] = y;
    if (out_bf16.hi != nullptr) store_bf16x4(out_bf16, static_cast<int64_t>(r) * hidden + 4 * i, y.x, y.y, y.z, y.w);
  }
}

// gate_up: [T, 2 * inter] f32; out: [T, inter] bf16 (hi, and lo when given). Four columns a thread
// (inter % 4 == 0): a 2-D grid, blockIdx.y the token, so no division per element; the values are
// swiglu_bf16_kernel's.
__global__ void swiglu_bf16_vec4_kernel(Bf16Pair out, const float* gate_up, int inter) {
  wait_for_previous_kernel();
  const int c = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= inter) return;
  const int64_t t = blockIdx.y;
  const float4 g = *reinterpret_cast<const float4*>(gate_up + t * 2 * inter + c);
  const float4 u = *reinterpret_cast<const float4*>(gate_up + t * 2 * inter + inter + c);
  store_bf16x4(out, t * inter + c, silu(g.x) * u.x, silu(g.y) * u.y, silu(g.z) * u.z, silu(g.w) * u.w);
}

__global__ void swiglu_bf16_kernel(Bf16Pair out, const float* gate_up, int64_t total, int inter) {
  wait_for_previous_kernel();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / inter, c = i % inter;
    const float g = gate_up[t * 2 * inter + c], u = gate_up[t * 2 * inter + inter + c];
    store_bf16(out, i, silu(g) * u);
  }
}

}  // namespace

void embed(float* x, const bf16* table, const int32_t* token_ids, int num_tokens, int hidden, cudaStream_t stream) {
  if (num_tokens == 0) return;
  launch_kernel(embed_kernel, num_tokens, 256, 0, stream, x, table, token_ids, hidden);
  CUDA_CHECK_LAUNCH();
}

void rms_norm(float* out, Bf16Pair out_bf16, float* x, const int32_t* rows, int num_rows, int hidden, const float* weight,
              float eps, const FfnFold& fold, cudaStream_t stream) {
  if (num_rows == 0) return;
  if (hidden > 4 * k_norm_vecs * 1024 || hidden % 4 != 0)
    argument_error("rms_norm", "hidden must be a multiple of 4, at most 8192");
  if (out == nullptr && out_bf16.hi == nullptr) argument_error("rms_norm", "neither an f32 nor a bf16 output");
  // Two float4 per thread where the row allows it.
  const int threads = std::clamp((hidden / 4 / k_norm_vecs + 31) / 32 * 32, 32, 1024);
  launch_kernel(rms_norm_kernel, num_rows, threads, 0, stream, out, out_bf16, x, rows, hidden, weight, eps, fold);
  CUDA_CHECK_LAUNCH();
}

void swiglu_bf16(Bf16Pair out, const float* gate_up, int num_tokens, int inter, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(num_tokens) * inter;
  if (total == 0) return;
  if (inter % 4 == 0 && num_tokens <= 65535) {
    const dim3 grid(static_cast<unsigned>((inter / 4 + 255) / 256), static_cast<unsigned>(num_tokens));
    launch_kernel(swiglu_bf16_vec4_kernel, grid, 256, 0, stream, out, gate_up, inter);
    CUDA_CHECK_LAUNCH();
    return;
  }
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65536));
  launch_kernel(swiglu_bf16_kernel, blocks, 256, 0, stream, out, gate_up, total, inter);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moescope::cuda
