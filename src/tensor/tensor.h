#pragma once
// A read-only view of a tensor stored in its file dtype (usually memory-mapped from safetensors).
#include <cstdint>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace moescope {

struct TensorView {
  const void* data = nullptr;   // not owned; lives as long as the mapping that holds it
  DType dtype = DType::F32;
  std::vector<int64_t> shape;   // row-major
  std::string name;             // checkpoint name, for error messages

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool empty() const { return data == nullptr; }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 1 : shape[1]; }
  // Pointer to row r of a 2-D tensor.
  const void* row(int64_t r) const {
    return static_cast<const char*>(data) + static_cast<size_t>(r) * static_cast<size_t>(cols()) * dtype_size(dtype);
  }
};

std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace moescope
