#pragma once
// --device cpu|cuda|auto and the GPU options, shared by every command that runs a model. The backend
// itself comes from make_backend (src/backend/factory.h), so every command chooses it the same way.
#include <CLI/CLI.hpp>
#include <string>

#include "backend/factory.h"
#include "util/error.h"

namespace moescope::cli {

inline void add_device_option(CLI::App* cmd, std::string& device) {
  cmd->add_option("--device", device, "cpu or cuda (auto: cuda when this build has CUDA and a GPU is present)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
}

// vLLM's names: --gpu-memory-utilization, --block-size, --enforce-eager, --kv-cache-dtype; PyTorch's for
// --matmul-precision (torch.set_float32_matmul_precision).
inline void add_gpu_options(CLI::App* cmd, BackendOptions& options) {
  cmd->add_option("--gpu-memory-utilization", options.gpu_memory_utilization,
                  "Share of the GPU's memory for weights, KV cache and workspace")
      ->check(CLI::Range(0.05, 1.0))
      ->capture_default_str();
  cmd->add_option("--block-size", options.block_size, "KV cache block size in tokens (GPU)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  cmd->add_flag("--enforce-eager", options.enforce_eager, "No CUDA graphs: launch every kernel of a decode pass");
  cmd->add_option("--kv-cache-dtype", options.kv_cache_dtype,
                  "KV cache element type on the GPU: auto (float32 with --matmul-precision high, else bfloat16), "
                  "bfloat16, or float32 (exact keys and values, twice the memory)")
      ->check(CLI::IsMember({"auto", "bfloat16", "float32"}))
      ->capture_default_str();
  cmd->add_option("--matmul-precision", options.matmul_precision,
                  "Activations of the GPU's tensor-core products (prefills, large batches): medium (bf16, as a bf16 "
                  "PyTorch model) or high (two bf16 terms, hi + lo: 2^-17 relative instead of 2^-9, about 2.6 times the "
                  "prefill time; routes that follow the float32 reference)")
      ->check(CLI::IsMember({"medium", "high"}))
      ->capture_default_str();
}

// For commands that run on the CPU only so far: an explicit --device cuda is an error, auto means cpu.
inline void require_cpu_device(const std::string& device) {
  if (device == "cuda") fail("--device cuda: this command runs on the CPU only so far; use --device cpu");
}

}  // namespace moescope::cli
