#pragma once
// Tensor-core building blocks shared by the grouped expert GEMM and prefill attention: 16-byte cp.async
// copies into shared memory, ldmatrix, and mma.sync m16n8k16 (bf16 in, f32 accumulate).
//
// Fragment layouts of m16n8k16 (PTX ISA), with g = lane / 4 and tq = lane % 4:
//   A (16x16, row-major), 4 registers of two bf16 each (low half = the lower column):
//     a0 = A[g][2tq, 2tq+1], a1 = A[g+8][2tq, 2tq+1], a2 = A[g][2tq+8, 2tq+9], a3 = A[g+8][2tq+8, 2tq+9]
//   B (16x8, k-major), 2 registers: b0 = B[2tq, 2tq+1][g], b1 = B[2tq+8, 2tq+9][g]
//   C/D (16x8) f32: c0, c1 = C[g][2tq, 2tq+1], c2, c3 = C[g+8][2tq, 2tq+1]
#include "backend/cuda/common.cuh"

namespace moescope::cuda {

// 16 bytes global -> shared at a shared-memory address (as __cvta_generic_to_shared gives it); !valid:
// zero-fill, nothing read.
__device__ __forceinline__ void cp_async16_shared(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16_shared(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// d += a * b for one 16x8x16 tile: a (row-major 16x16) in 4 registers, b (k-major 16x8) in 2.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory: lane 8 i + r gives the address of row r of matrix i (16
// bytes, 16-byte aligned), and register i receives matrix i in the layout of a C fragment's half:
// lane (g, tq) gets M_i[g][2tq, 2tq+1]. With .trans it gets M_i[2tq][g], M_i[2tq+1][g] instead, which
// turns a [k][n] row-major tile into the k-major B fragment.
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const bf16* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) { ldmatrix_x4(r[0], r[1], r[2], r[3], p); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Two f32 values rounded to bf16 (nearest even) in one register: lo in the low half, as a fragment wants.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace moescope::cuda
