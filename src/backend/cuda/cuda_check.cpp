#include "backend/cuda/cuda_check.h"

#include "util/error.h"

namespace moescope::cuda {

void cuda_failure(cudaError_t error, const char* call, const char* file, int line) {
  fail("CUDA error {} ({}: {}) in {} at {}:{}", static_cast<int>(error), cudaGetErrorName(error),
       cudaGetErrorString(error), call, file, line);
}

void cublas_failure(cublasStatus_t status, const char* call, const char* file, int line) {
  fail("cuBLAS error {} ({}) in {} at {}:{}", static_cast<int>(status), cublasGetStatusString(status), call, file,
       line);
}

void argument_error(const char* function, const char* what) { fail("{}: {}", function, what); }

}  // namespace moescope::cuda
