// What synchronisation costs on this GPU, for choosing between a decode pass's chain of kernels and one
// persistent kernel whose stages meet at grid-wide barriers (docs/CUDA.md, "What remains"). Each is
// measured the way it would run: the barriers inside one cooperative launch of a block per SM, the kernel
// boundaries as a CUDA graph of kernels launched as a pass launches its own (launch_kernel: programmatic
// dependent launch where that is on), each waiting for the one before.
#include "backend/cuda/common.cuh"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/timing.h"

namespace moescope::cuda {
namespace {

constexpr int k_probe_threads = 256;

// `rounds` grid-wide barriers, met as a persistent kernel's stages would meet them: the block's threads
// sync, thread 0 adds the block to the counter (after a fence: the block's writes before it) and spins
// with acquire loads until every block of the round has, the block syncs again. The counter starts at 0.
__global__ void __launch_bounds__(k_probe_threads) grid_barrier_kernel(unsigned* counter, int rounds) {
  for (int r = 1; r <= rounds; ++r) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(counter, 1u);
      const unsigned target = static_cast<unsigned>(r) * gridDim.x;
      unsigned seen = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
      } while (seen < target);
    }
    __syncthreads();
  }
}

// A link of a chain: waits for the previous kernel as every kernel of a pass does, then block 0 adds one
// to the value (what the links did is checked afterwards).
__global__ void __launch_bounds__(k_probe_threads) chain_link_kernel(unsigned* value) {
  wait_for_previous_kernel();
  if (blockIdx.x == 0 && threadIdx.x == 0) *value += 1u;
}

// Median over `repeats` timings (after two warm-up runs) of the milliseconds `run` takes on `stream`.
template <typename Run>
double median_ms(cudaStream_t stream, int repeats, Run&& run) {
  return sorted_event_ms(stream, repeats, run)[static_cast<size_t>(repeats) / 2];
}

}  // namespace

SyncCosts measure_sync_costs(int count, int repeats) {
  if (count < 2 || repeats < 1) argument_error("measure_sync_costs", "count must be 2 or more, repeats 1 or more");
  int device = 0, cooperative = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (cooperative == 0) argument_error("measure_sync_costs", "the device has no cooperative launch");
  SyncCosts costs;
  costs.blocks = multiprocessors();
  costs.programmatic = programmatic_launch();
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<unsigned> counter(1);

  // Barriers: `count` rounds against none, the counter reset before each launch in both.
  auto barrier_launch = [&](int rounds) {
    CUDA_CHECK(cudaMemsetAsync(counter.data(), 0, sizeof(unsigned), stream));
    unsigned* counter_arg = counter.data();
    void* args[] = {&counter_arg, &rounds};
    CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(grid_barrier_kernel), dim3(costs.blocks),
                                           dim3(k_probe_threads), args, 0, stream));
  };
  const double with_rounds = median_ms(stream, repeats, [&] { barrier_launch(count); });
  const double without = median_ms(stream, repeats, [&] { barrier_launch(0); });
  barrier_launch(count);
  unsigned seen = 0;
  CUDA_CHECK(cudaMemcpyAsync(&seen, counter.data(), sizeof(unsigned), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  costs.barriers_checked = seen == static_cast<unsigned>(count) * static_cast<unsigned>(costs.blocks);
  costs.barrier_us = (with_rounds - without) * 1e3 / count;

  // Kernel boundaries: a graph of `count` links against a graph of one.
  auto capture = [&](int links) {
    cudaGraph_t graph;
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < links; ++i)
      launch_kernel(chain_link_kernel, costs.blocks, k_probe_threads, 0, stream, counter.data());
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph));
    return exec;
  };
  cudaGraphExec_t many = capture(count), one = capture(1);
  CUDA_CHECK(cudaMemsetAsync(counter.data(), 0, sizeof(unsigned), stream));
  const double chain = median_ms(stream, repeats, [&] { CUDA_CHECK(cudaGraphLaunch(many, stream)); });
  const double single = median_ms(stream, repeats, [&] { CUDA_CHECK(cudaGraphLaunch(one, stream)); });
  CUDA_CHECK(cudaMemcpyAsync(&seen, counter.data(), sizeof(unsigned), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  costs.links_checked = seen == static_cast<unsigned>(repeats + 2) * static_cast<unsigned>(count + 1);
  costs.boundary_us = (chain - single) * 1e3 / (count - 1);
  CUDA_CHECK(cudaGraphExecDestroy(many));
  CUDA_CHECK(cudaGraphExecDestroy(one));
  CUDA_CHECK(cudaStreamDestroy(stream));
  return costs;
}

}  // namespace moescope::cuda
