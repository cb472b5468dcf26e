#pragma once
// Timing on the GPU with CUDA events: the device's own measurements (bandwidth.cu, sync_cost.cu) and the
// kernel benchmarks.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_check.h"

namespace moescope::cuda {

// Milliseconds the work `run` enqueues on `stream` takes on the GPU.
template <typename Run>
double event_ms(cudaStream_t stream, Run&& run) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(start, stream));
  run();
  CUDA_CHECK(cudaEventRecord(stop, stream));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return ms;
}

// event_ms of `repeats` runs after two warm-up runs, fastest first.
template <typename Run>
std::vector<double> sorted_event_ms(cudaStream_t stream, int repeats, Run&& run) {
  std::vector<double> ms;
  for (int r = 0; r < repeats + 2; ++r) {
    const double t = event_ms(stream, run);
    if (r >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

}  // namespace moescope::cuda
