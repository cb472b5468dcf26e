#pragma once
// CUDA_CHECK / CUBLAS_CHECK around every runtime and cuBLAS call: a failure becomes a moescope::Error
// naming the call, the file and line, and the runtime's own message.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

namespace moescope::cuda {

[[noreturn]] void cuda_failure(cudaError_t error, const char* call, const char* file, int line);
[[noreturn]] void cublas_failure(cublasStatus_t status, const char* call, const char* file, int line);
// A launcher called with arguments its kernel cannot take (kept out of the .cu files, which do not
// include fmt).
[[noreturn]] void argument_error(const char* function, const char* what);

}  // namespace moescope::cuda

#define CUDA_CHECK(call)                                                                      \
  do {                                                                                        \
    const cudaError_t cuda_check_error_ = (call);                                             \
    if (cuda_check_error_ != cudaSuccess)                                                     \
      ::moescope::cuda::cuda_failure(cuda_check_error_, #call, __FILE__, __LINE__);           \
  } while (0)

#define CUBLAS_CHECK(call)                                                                    \
  do {                                                                                        \
    const cublasStatus_t cublas_check_status_ = (call);                                       \
    if (cublas_check_status_ != CUBLAS_STATUS_SUCCESS)                                        \
      ::moescope::cuda::cublas_failure(cublas_check_status_, #call, __FILE__, __LINE__);      \
  } while (0)

// After a kernel launch: a bad launch configuration (grid, shared memory) surfaces here, at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
