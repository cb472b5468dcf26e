#pragma once
// Whether this process can use a CUDA GPU, and which.
#include <array>
#include <atomic>
#include <string>

#include "backend/cuda/cuda_check.h"

namespace moescope::cuda {

// True when the runtime finds at least one device; otherwise `why` (if given) says what it reported.
bool device_available(std::string* why = nullptr);

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for the current device.
std::string device_description();

// A value of the current device that does not change while the process runs, asked once per device:
// cache[device] holds it (0: not asked yet), ask() gives it (never 0). Devices past the cache's size are
// asked every time.
using PerDeviceCache = std::array<std::atomic<int>, 64>;
template <typename Ask>
int once_per_device(PerDeviceCache& cache, Ask ask) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= static_cast<int>(cache.size())) return ask(device);
  int value = cache[static_cast<size_t>(device)].load();
  if (value == 0) {
    value = ask(device);
    cache[static_cast<size_t>(device)].store(value);
  }
  return value;
}

// Streaming multiprocessors of the current device.
int multiprocessors();

// Programmatic dependent launch (sm_90 and later): each kernel of a pass is launched so that it may start
// while the kernel before it on the stream finishes. Its threads first do what needs nothing from that
// kernel (addresses, weight loads), then wait for it to complete (griddepcontrol.wait) before they read or
// write any activation, and let the next kernel start early in turn. A kernel placed in a CUDA graph keeps
// the same programmatic edge. Off (every launch waits for the previous kernel as usual) until the backend
// turns it on for a GPU that has it; MOESCOPE_CUDA_PDL=0 keeps it off (a diagnostic).
void set_programmatic_launch(bool on);
bool programmatic_launch();

// Hopper's warpgroup MMA (wgmma, sm_90a) for the grouped expert GEMMs of large passes, where the GPU runs
// this build's sm_90a code (wgmma_available(), kernels.h). Allowed unless turned off:
// MOESCOPE_CUDA_WGMMA=0 keeps the mma.sync kernels (a diagnostic, and the tests' comparison).
void set_wgmma_allowed(bool on);
bool wgmma_allowed();

// The wgmma kernel's prefill tiles take an expert's last few rows along (WgmmaGemm::TAIL, experts.cu)
// unless turned off: MOESCOPE_CUDA_TAIL=0 gives those rows tiles of their own (a diagnostic, and the
// tests' comparison; read at each launch, so a captured graph keeps the setting it was captured with).
void set_expert_tails_allowed(bool on);
bool expert_tails_allowed();

// Large passes' router with its activation rows staged in shared memory (router.cu): the same logits to the
// bit as the unstaged kernel, which MOESCOPE_CUDA_ROUTER_STAGED=0 keeps (a diagnostic and a comparison).
void set_router_staged_allowed(bool on);
bool router_staged_allowed();

// A small pass's shared-expert gate/up norming its input itself beside router_small (DenseNorm, kernels.h):
// the same outputs to the bit as waiting for the router's normed rows, which MOESCOPE_CUDA_DENSE_NORM=0 keeps.
void set_dense_norm_allowed(bool on);
bool dense_norm_allowed();

// A decode step of one sequence folds the feed-forward output into the residual in the down kernel
// (experts_down_fold) and norms it inside the next q/k/v product (gemv_normed), so that no RMSNorm kernel
// runs before the product: MOESCOPE_CUDA_DOWN_FOLD=1 (off by default until measured on a GPU: 0 keeps the
// slots, the norm kernel and the plain product).
void set_down_fold_allowed(bool on);
bool down_fold_allowed();

}  // namespace moescope::cuda
