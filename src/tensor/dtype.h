#pragma once
// Element types a checkpoint may store, and their widening to f32 (the CPU computes in f32).
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace moescope {

enum class DType : uint8_t { F32, F16, BF16 };

// Bytes per element.
constexpr size_t dtype_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

// The safetensors spelling: "F32", "F16", "BF16".
std::string_view dtype_name(DType dtype);

// Parses a safetensors dtype string; false when it is not one we support.
bool parse_dtype(std::string_view name, DType* out);

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

// Round to nearest even, as torch does when casting f32 -> bf16.
inline uint16_t f32_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);

// Widens n elements of `dtype` at `src` into f32 `dst`.
void to_f32(DType dtype, const void* src, float* dst, size_t n);

}  // namespace moescope
