#pragma once
// Device helpers shared by the kernels: bf16 widening, warp and block reductions, vector loads.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/kernels.h"

namespace moescope::cuda {

constexpr unsigned k_full_mask = 0xffffffffu;

__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_float(bf16 bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }

// Round to nearest even, as torch casts f32 to bf16.
__device__ __forceinline__ bf16 float_to_bf16(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// out.hi[i] = bf16(v) and, when out.lo is given, out.lo[i] = bf16(v - hi): the activation terms of a product.
__device__ __forceinline__ void store_bf16(const Bf16Pair& out, int64_t i, float v) {
  const bf16 hi = float_to_bf16(v);
  out.hi[i] = hi;
  if (out.lo != nullptr) out.lo[i] = float_to_bf16(v - bf16_to_float(hi));
}

// store_bf16 of four consecutive values from element i (i % 4 == 0): one 8-byte store per term.
__device__ __forceinline__ void store_bf16x4(const Bf16Pair& out, int64_t i, float a, float b, float c, float d) {
  const float v[4] = {a, b, c, d};
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bf16 h = float_to_bf16(v[j]);
    hi[j] = h;
    lo[j] = float_to_bf16(v[j] - bf16_to_float(h));
  }
  *reinterpret_cast<uint2*>(out.hi + i) = make_uint2(hi[0] | (hi[1] << 16), hi[2] | (hi[3] << 16));
  if (out.lo != nullptr) *reinterpret_cast<uint2*>(out.lo + i) = make_uint2(lo[0] | (lo[1] << 16), lo[2] | (lo[3] << 16));
}

// Eight bf16 values (one 16-byte load) dotted with eight f32 values.
__device__ __forceinline__ float dot8(uint4 w, float4 a, float4 b, float acc) {
  acc = fmaf(bf16_lo(w.x), a.x, acc);
  acc = fmaf(bf16_hi(w.x), a.y, acc);
  acc = fmaf(bf16_lo(w.y), a.z, acc);
  acc = fmaf(bf16_hi(w.y), a.w, acc);
  acc = fmaf(bf16_lo(w.z), b.x, acc);
  acc = fmaf(bf16_hi(w.z), b.y, acc);
  acc = fmaf(bf16_lo(w.w), b.z, acc);
  acc = fmaf(bf16_hi(w.w), b.w, acc);
  return acc;
}

// A weight row is read once: keep it out of L1 (ld.global.nc.L1::no_allocate).
__device__ __forceinline__ uint4 load_stream(const bf16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(k_full_mask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(k_full_mask, v, offset));
  return v;
}

// Sum over the block; every thread gets the result. scratch: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// dst[place(i)] = src[i] for i < n (then zeros up to n_fill >= n), by the block, src read through L2:
// each thread's loads all issued before its stores, so the copy costs about one round trip, not one a pass.
struct SamePlace {
  __device__ int operator()(int i) const { return i; }
};
template <int UNROLL = 8, class Place = SamePlace>
__device__ __forceinline__ void block_stage_l2(float4* dst, const float4* src, int n, int n_fill, Place place = {}) {
  for (int base = threadIdx.x; base < n_fill; base += UNROLL * blockDim.x) {
    float4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * blockDim.x;
      v[u] = i < n ? __ldcg(src + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n_fill) dst[place(i)] = v[u];
    }
  }
}

// An RMSNorm's sum of squares, eight values at a time added to acc, and the inverse RMS from a warp's
// lane sums: one order of operations for router_small and the small gate/up kernel's own norm of the
// shared expert's input, which must agree to the bit.
__device__ __forceinline__ float sum_squares8(float4 a, float4 b, float acc) {
  float s = a.x * a.x;
  s = fmaf(a.y, a.y, s);
  s = fmaf(a.z, a.z, s);
  s = fmaf(a.w, a.w, s);
  s = fmaf(b.x, b.x, s);
  s = fmaf(b.y, b.y, s);
  s = fmaf(b.z, b.z, s);
  s = fmaf(b.w, b.w, s);
  return acc + s;
}
__device__ __forceinline__ float warp_inv_rms(float lane_sum_sq, int n, float eps) {
  return 1.0f / sqrtf(warp_sum(lane_sum_sq) / static_cast<float>(n) + eps);
}

// The fold of the feed-forward slots into the residual, one element at a time: block_out starts at 0 and
// takes fold_slot(block_out, scale, slot) for each slot in order, then x + block_out. One order of
// operations (an fma per slot) for rms_norm's fold and experts_down_fold, which must agree to the bit.
__device__ __forceinline__ float fold_slot(float block_out, float scale, float slot) { return fmaf(scale, slot, block_out); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Programmatic dependent launch (device.h): wait until the previous kernel of the stream has completed
// and its writes are visible, then let the next kernel's blocks start. Every kernel launched with
// launch_kernel calls this before its first read or write of an activation (weights may come before).
// Without a programmatic launch (or before sm_90) the wait returns at once. Activations (and the KV
// cache) are never read through the read-only path (__ldg, ld.global.nc): a kernel now overlaps the one
// that writes them, and that path assumes data that no running kernel writes (with it the decode read
// stale activations on the H100). Plain or __ldca loads (L1, made coherent by the wait) or __ldcg (L2).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Lets the next kernel's blocks start without this block's waiting for the previous kernel first (a
// block that reads nothing the previous kernel writes; the next kernel still waits for all of this one).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Lets `kernel` take `bytes` of dynamic shared memory: above the default 48 KB the limit must be raised
// first (per launch, so that it holds on whichever device is current).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when that is on.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = programmatic_launch() ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace moescope::cuda
