#pragma once
// Whether this process can use a CUDA GPU, and which.
#include <string>

namespace moescope::cuda {

// True when the runtime finds at least one device; otherwise `why` (if given) says what it reported.
bool device_available(std::string* why = nullptr);

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for the current device.
std::string device_description();

}  // namespace moescope::cuda
