#include "backend/cuda/device.h"

#include <fmt/format.h>

#include "backend/cuda/cuda_check.h"

namespace moescope::cuda {

namespace {
bool g_programmatic_launch = false;
bool g_wgmma_allowed = true;
bool g_expert_tails_allowed = true;
bool g_router_staged_allowed = true;
bool g_dense_norm_allowed = true;
bool g_down_fold_allowed = false;
}  // namespace

void set_programmatic_launch(bool on) { g_programmatic_launch = on; }
bool programmatic_launch() { return g_programmatic_launch; }
void set_wgmma_allowed(bool on) { g_wgmma_allowed = on; }
bool wgmma_allowed() { return g_wgmma_allowed; }
void set_expert_tails_allowed(bool on) { g_expert_tails_allowed = on; }
bool expert_tails_allowed() { return g_expert_tails_allowed; }
void set_router_staged_allowed(bool on) { g_router_staged_allowed = on; }
bool router_staged_allowed() { return g_router_staged_allowed; }
void set_dense_norm_allowed(bool on) { g_dense_norm_allowed = on; }
bool dense_norm_allowed() { return g_dense_norm_allowed; }
void set_down_fold_allowed(bool on) { g_down_fold_allowed = on; }
bool down_fold_allowed() { return g_down_fold_allowed; }

bool device_available(std::string* why) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    if (why != nullptr) *why = fmt::format("{}: {}", cudaGetErrorName(error), cudaGetErrorString(error));
    return false;
  }
  if (count == 0) {
    if (why != nullptr) *why = "the CUDA runtime reports no devices";
    return false;
  }
  return true;
}

int multiprocessors() {
  static PerDeviceCache cache{};
  return once_per_device(cache, [](int device) {
    int count = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  });
}

std::string device_description() {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return fmt::format("{} (sm_{}{}, {} SMs, {:.1f} GiB)", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                     static_cast<double>(prop.totalGlobalMem) / (1 << 30));
}

}  // namespace moescope::cuda
