#include "backend/cuda/blas.h"

#include "backend/cuda/cuda_check.h"

namespace moescope::cuda {

Blas::Blas() { CUBLAS_CHECK(cublasCreate(&handle_)); }

Blas::~Blas() { cublasDestroy(handle_); }

void Blas::set_stream(cudaStream_t stream) {
  CUBLAS_CHECK(cublasSetStream(handle_, stream));  // resets the workspace to cuBLAS's pool: set ours again
  if (workspace_.size() == 0) workspace_ = DeviceBuffer<char>(size_t{32} << 20);
  CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_.data(), workspace_.size()));
}

void Blas::gemm(float* y, int ldy, const bf16* x, const bf16* w, int num_tokens, int n, int k, float beta) {
  if (num_tokens == 0 || n == 0) return;
  const float alpha = 1.0f;
  // Column-major view: y^T [n, T] = w [k, n]^T . x^T [k, T]; the row-major [n, k] weight is a
  // column-major [k, n] matrix, so it enters transposed.
  CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, num_tokens, k, &alpha, w, CUDA_R_16BF, k, x,
                            CUDA_R_16BF, k, &beta, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace moescope::cuda
