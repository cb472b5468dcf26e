#pragma once
// cuBLAS for the dense products of large passes (q/k/v, o, shared expert, dense MLP, LM head):
// bf16 operands on the tensor cores, f32 accumulation and f32 output.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "backend/cuda/device_memory.h"
#include "backend/cuda/kernels.h"

namespace moescope::cuda {

class Blas {
 public:
  Blas();
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  void set_stream(cudaStream_t stream);
  // y[t, n] = x[t] . w[n] + beta * y[t, n].  x: [num_tokens, k] bf16 (with x.lo, a second product over
  // the lo term adds into the first); w: [n, k] bf16 (PyTorch's [out_features, in_features]); y:
  // [num_tokens, ldy] f32. beta = 1 adds into y (the residual).
  void gemm(float* y, int ldy, ConstBf16Pair x, const bf16* w, int num_tokens, int n, int k, float beta);

 private:
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer<char> workspace_;  // cuBLAS's own workspace, so that products captured in a graph allocate nothing
};

// The device's bf16 tensor-core rate as cuBLAS reaches it on a large square product (n x n x n, bf16 in,
// f32 out): the compute ceiling prefill figures are set against, measured in the same run.
struct GemmSample {
  double best_tflops = 0.0, median_tflops = 0.0;
  int n = 0, repeats = 0;
};
GemmSample measure_gemm_tflops(int n = 8192, int repeats = 10);

}  // namespace moescope::cuda
