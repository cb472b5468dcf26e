#pragma once
// Writes a .safetensors file tensor by tensor, generating each in chunks, so that a checkpoint far
// larger than memory (the qwen1.5-moe-a2.7b preset is 28 GB) can be written.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace moescope {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::BF16;
  // Fills out[0..count) with the f32 values of elements [first, first + count) in row-major order.
  std::function<void(float* out, int64_t first, int64_t count)> fill;
};

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& tensors);

}  // namespace moescope
