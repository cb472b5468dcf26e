#pragma once
// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a): four consecutive warps (a warpgroup,
// starting at a warp index divisible by 4) multiply a 64-row A tile by an N-column B tile, both read
// from shared memory through matrix descriptors, into f32 accumulators spread over the warpgroup's
// registers. Only the sm_90a build has the instructions (MOESCOPE_WGMMA below); elsewhere the helpers
// compile to nothing and the host does not launch the kernels that use them (wgmma_available()).
//
// Shared-memory layout the descriptors describe (K-major, 128-byte swizzle): an operand of R rows by 64
// bf16 of k is R rows of 128 bytes, 8-row groups 1024 bytes apart, the group's base 1024-byte aligned;
// the 16-byte chunk c of row r is stored at chunk c ^ (r % 8) of that row (the order a TMA copy with
// CU_TENSOR_MAP_SWIZZLE_128B writes, here written by cp.async). A k16 step inside the 64 is the start
// address plus 32 bytes: the hardware applies the swizzle to the address bits.
//
// Accumulators of m64nNk16 (f32): thread t of the warpgroup (warp w = t / 32, g = lane / 4, tq = lane % 4)
// holds, for each n8 column block i, d[4i + c] = D[16w + g + 8 (c / 2)][8i + 2tq + c % 2].
#include "backend/cuda/mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOESCOPE_WGMMA 1
#else
#define MOESCOPE_WGMMA 0
#endif

namespace moescope::cuda {

// Offset of chunk `chunk` (16 bytes) of row `row` in a 128-byte-swizzled operand, in bytes.
__device__ __forceinline__ int swizzle128(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Descriptor of a K-major, 128-byte-swizzled operand starting at shared address `addr` (1024-aligned,
// or advanced by k16 steps of 32 bytes from such an address): start address, leading byte offset 16
// (unused with this swizzle), stride byte offset 1024 (one 8-row group), swizzle mode 1 (128 bytes).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// Descriptor of an MN-major, 128-byte-swizzled operand (a B of 16 k-rows of N columns, N contiguous): the
// columns in atoms of 64 (128 bytes), each atom 8 k-rows of 128 bytes per 1024-byte group, swizzled as
// above; `atom_bytes` from one atom of 64 columns to the next, 1024 from one group of 8 k-rows to the next.
__device__ __forceinline__ uint64_t wgmma_desc_mn(uint32_t addr, uint32_t atom_bytes) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(atom_bytes >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// Shared memory written by this thread's ordinary (or cp.async) stores becomes visible to the tensor
// cores' reads (the async proxy); each writing thread fences before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async() {
#if MOESCOPE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Orders the accumulators' earlier register accesses before the next wgmma reads or writes them.
__device__ __forceinline__ void wgmma_fence() {
#if MOESCOPE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MOESCOPE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if MOESCOPE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving reads or writes of an accumulator across a wgmma issue or wait: the
// instruction writes the registers asynchronously, which the asm statement that issues it cannot say.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The accumulators of the wrappers below, as inline-asm operands: the instruction's register list
// (%0 .. %N-1) and the matching read-write constraints on d[0] .. d[N-1].
#define MOESCOPE_WGMMA_D4_REGS "%0, %1, %2, %3"
#define MOESCOPE_WGMMA_D8_REGS MOESCOPE_WGMMA_D4_REGS ", %4, %5, %6, %7"
#define MOESCOPE_WGMMA_D12_REGS MOESCOPE_WGMMA_D8_REGS ", %8, %9, %10, %11"
#define MOESCOPE_WGMMA_D16_REGS MOESCOPE_WGMMA_D12_REGS ", %12, %13, %14, %15"
#define MOESCOPE_WGMMA_D32_REGS \
  MOESCOPE_WGMMA_D16_REGS ", " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MOESCOPE_WGMMA_D64_REGS \
  MOESCOPE_WGMMA_D32_REGS ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" ", " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MOESCOPE_WGMMA_D4_OUT(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define MOESCOPE_WGMMA_D8_OUT(d) MOESCOPE_WGMMA_D4_OUT(d), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define MOESCOPE_WGMMA_D12_OUT(d) MOESCOPE_WGMMA_D8_OUT(d), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
#define MOESCOPE_WGMMA_D16_OUT(d) MOESCOPE_WGMMA_D12_OUT(d), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define MOESCOPE_WGMMA_D32_OUT(d) \
  MOESCOPE_WGMMA_D16_OUT(d), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MOESCOPE_WGMMA_D64_OUT(d) \
  MOESCOPE_WGMMA_D32_OUT(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (64 x 128 per warpgroup, f32) += A (64 x 16, descriptor a) . B (128 x 16, descriptor b)^T.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
#if MOESCOPE_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      MOESCOPE_WGMMA_D64_REGS
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : MOESCOPE_WGMMA_D64_OUT(d)
      : "l"(a), "l"(b), "r"(1));
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}

// d (64 x 64 per warpgroup, f32) += A (64 x 16, bf16 in registers) . B (64 x 16, descriptor b)^T. The
// warp w of the warpgroup holds A's rows 16w .. 16w + 15 as the A fragment of mma.sync m16n8k16 (mma.cuh).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
#if MOESCOPE_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      MOESCOPE_WGMMA_D32_REGS
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : MOESCOPE_WGMMA_D32_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}

// d (64 x 128 per warpgroup, f32) += A (64 x 16, bf16 in registers, as wgmma_m64n64k16_rs's) . B (16 x 128,
// descriptor b of an MN-major operand: B's 128 columns contiguous in shared memory, wgmma_desc_mn).
__device__ __forceinline__ void wgmma_m64n128k16_rs_mn(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
#if MOESCOPE_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      MOESCOPE_WGMMA_D64_REGS
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : MOESCOPE_WGMMA_D64_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}

// d (64 x N per warpgroup, f32; N = 8, 16, 24 or 32: d[0 .. N/2 - 1]) += A (64 x 16, descriptor a) .
// B (N x 16, descriptor b)^T, both operands K-major in shared memory as wgmma_m64n128k16's. The grouped
// GEMM multiplies a tile's few extra rows with it, the weights as A (wgmma has no M below 64).
#define MOESCOPE_WGMMA_NARROW(N, REGS, OUT, A, B, P)                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                             \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" REGS "}, " A ", " B            \
               ", p, 1, 1, 0, 0;\n}\n"                                                                     \
               : OUT                                                                                       \
               : "l"(a), "l"(b), "r"(1))
template <int N>
__device__ __forceinline__ void wgmma_m64nNk16(float (&d)[16], uint64_t a, uint64_t b) {
  static_assert(N == 8 || N == 16 || N == 24 || N == 32, "n8, n16, n24 or n32");
#if MOESCOPE_WGMMA
  if constexpr (N == 8)
    MOESCOPE_WGMMA_NARROW(8, MOESCOPE_WGMMA_D4_REGS, MOESCOPE_WGMMA_D4_OUT(d), "%4", "%5", "%6");
  else if constexpr (N == 16)
    MOESCOPE_WGMMA_NARROW(16, MOESCOPE_WGMMA_D8_REGS, MOESCOPE_WGMMA_D8_OUT(d), "%8", "%9", "%10");
  else if constexpr (N == 24)
    MOESCOPE_WGMMA_NARROW(24, MOESCOPE_WGMMA_D12_REGS, MOESCOPE_WGMMA_D12_OUT(d), "%12", "%13", "%14");
  else
    MOESCOPE_WGMMA_NARROW(32, MOESCOPE_WGMMA_D16_REGS, MOESCOPE_WGMMA_D16_OUT(d), "%16", "%17", "%18");
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}

}  // namespace moescope::cuda
