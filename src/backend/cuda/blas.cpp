#include "backend/cuda/blas.h"

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_check.h"

namespace moescope::cuda {

Blas::Blas() { CUBLAS_CHECK(cublasCreate(&handle_)); }

Blas::~Blas() { cublasDestroy(handle_); }

void Blas::set_stream(cudaStream_t stream) {
  CUBLAS_CHECK(cublasSetStream(handle_, stream));  // resets the workspace to cuBLAS's pool: set ours again
  if (workspace_.size() == 0) workspace_ = DeviceBuffer<char>(size_t{32} << 20);
  CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_.data(), workspace_.size()));
}

void Blas::gemm(float* y, int ldy, ConstBf16Pair x, const bf16* w, int num_tokens, int n, int k, float beta) {
  if (num_tokens == 0 || n == 0) return;
  const float alpha = 1.0f, one = 1.0f;
  // Column-major view: y^T [n, T] = w [k, n]^T . x^T [k, T]; the row-major [n, k] weight is a
  // column-major [k, n] matrix, so it enters transposed.
  CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, num_tokens, k, &alpha, w, CUDA_R_16BF, k, x.hi,
                            CUDA_R_16BF, k, &beta, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (x.lo != nullptr)  // the lo term's product, added in f32
    CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, num_tokens, k, &alpha, w, CUDA_R_16BF, k, x.lo,
                              CUDA_R_16BF, k, &one, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

GemmSample measure_gemm_tflops(int n, int repeats) {
  const size_t elements = static_cast<size_t>(n) * n;
  DeviceBuffer<bf16> a(elements), b(elements);
  DeviceBuffer<float> c(elements);
  CUDA_CHECK(cudaMemset(a.data(), 0x3c, a.bytes()));  // bf16 0x3c3c, about 0.0115: finite products
  CUDA_CHECK(cudaMemset(b.data(), 0x3c, b.bytes()));
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> rates;
  {
    Blas blas;
    blas.set_stream(stream);
    blas.gemm(c.data(), n, a.data(), b.data(), n, n, n, 0.0f);  // warm-up: picks the algorithm, loads the module
    for (int r = 0; r < repeats; ++r) {
      CUDA_CHECK(cudaEventRecord(start, stream));
      blas.gemm(c.data(), n, a.data(), b.data(), n, n, n, 0.0f);
      CUDA_CHECK(cudaEventRecord(stop, stream));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      rates.push_back(2.0 * n * static_cast<double>(n) * n / (ms * 1e-3) / 1e12);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2], n, repeats};
}

}  // namespace moescope::cuda
