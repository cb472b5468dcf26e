// The device's memory bandwidth, measured by our own kernels in the same run as the benchmark: a
// streaming read (how decode reads weights; the floor uses it) and a copy (bytes read plus written).
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/timing.h"

namespace moescope::cuda {
namespace {

constexpr int k_unroll = 4;  // independent 16-byte loads in flight per thread

// Non-zero, position-dependent contents: never time on zeros.
__global__ void fill_kernel(uint4* data, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint32_t v = static_cast<uint32_t>(i) * 2654435761u;
    data[i] = make_uint4(v, v ^ 0x5bd1e995u, v + 1u, ~v);
  }
}

// XOR of everything read, written only if it matches an unlikely value so the loads stay live.
__global__ void read_kernel(const uint4* data, size_t n, uint32_t* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  for (; i + (k_unroll - 1) * stride < n; i += k_unroll * stride) {
    uint4 v[k_unroll];
#pragma unroll
    for (int u = 0; u < k_unroll; ++u) v[u] = load_stream(reinterpret_cast<const bf16*>(data + i + u * stride));
#pragma unroll
    for (int u = 0; u < k_unroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = data[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

__global__ void copy_kernel(uint4* dst, const uint4* src, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  for (; i + (k_unroll - 1) * stride < n; i += k_unroll * stride) {
    uint4 v[k_unroll];
#pragma unroll
    for (int u = 0; u < k_unroll; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < k_unroll; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// The rates of `repeats` runs of `launch` (on the default stream), each moving `bytes_moved` bytes.
template <typename Launch>
BandwidthSample time_kernel(size_t bytes_moved, int repeats, Launch&& launch) {
  const std::vector<double> ms = sorted_event_ms(nullptr, repeats, launch);  // fastest first
  auto rate = [&](double t) { return static_cast<double>(bytes_moved) / (t * 1e-3) / 1e9; };
  return {rate(ms.front()), rate(ms[ms.size() - 1 - ms.size() / 2]), rate(ms.back()), bytes_moved, repeats};
}

int stream_blocks() {
  int device = 0, sms = 0, threads_per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return sms * (threads_per_sm / 256);
}

}  // namespace

BandwidthSample measure_read_bandwidth(size_t bytes, int repeats) {
  const size_t n = bytes / sizeof(uint4);
  DeviceBuffer<uint4> data(n);
  DeviceBuffer<uint32_t> sink(1);
  const int blocks = stream_blocks();
  fill_kernel<<<blocks, 256>>>(data.data(), n);
  CUDA_CHECK_LAUNCH();
  auto sample = time_kernel(n * sizeof(uint4), repeats, [&] {
    read_kernel<<<blocks, 256>>>(data.data(), n, sink.data());
    CUDA_CHECK_LAUNCH();
  });
  return sample;
}

BandwidthSample measure_copy_bandwidth(size_t bytes, int repeats) {
  const size_t n = bytes / sizeof(uint4);
  DeviceBuffer<uint4> src(n), dst(n);
  const int blocks = stream_blocks();
  fill_kernel<<<blocks, 256>>>(src.data(), n);
  CUDA_CHECK_LAUNCH();
  return time_kernel(2 * n * sizeof(uint4), repeats, [&] {
    copy_kernel<<<blocks, 256>>>(dst.data(), src.data(), n);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace moescope::cuda
