#pragma once
// --device cpu|cuda|auto, shared by every command that runs a model.
#include <CLI/CLI.hpp>
#include <string>

#include "util/error.h"

namespace moescope::cli {

inline void add_device_option(CLI::App* cmd, std::string& device) {
  cmd->add_option("--device", device, "cpu or cuda (auto: cuda when a GPU is present)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
}

// This build runs on the CPU only; the CUDA backend is a later module.
inline void require_cpu_device(const std::string& device) {
  if (device == "cuda") fail("--device cuda: this build has no CUDA backend; use --device cpu");
}

}  // namespace moescope::cli
