#pragma once
// Helpers of the CUDA tests: skipping without a GPU, random bf16 weights the CPU kernels read in place,
// device copies, and the max error every comparison prints.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/device.h"
#include "backend/cuda/device_memory.h"
#include "tensor/tensor.h"

namespace moescope::test {

// Every GPU test derives from this: without a device (CI has none) it skips and says why.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << ")";
  }
};

// A bf16 tensor in host memory, with a TensorView the CPU kernels read (the CPU backend's dtype path).
struct Bf16Tensor {
  std::vector<uint16_t> bits;
  TensorView view;
  std::vector<float> widened() const {
    std::vector<float> out(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_f32(bits[i]);
    return out;
  }
};

// Uniform values of the given mean and standard deviation, fast enough for expert-sized matrices
// (a splitmix64 stream seeded from rng).
inline void fill_uniform(float* out, size_t n, std::mt19937& rng, float stddev, float mean) {
  uint64_t state = (static_cast<uint64_t>(rng()) << 32) ^ rng();
  const float half_width = stddev * std::sqrt(3.0f);
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = mean + (2.0f * u - 1.0f) * half_width;
  }
}

inline Bf16Tensor random_bf16(std::vector<int64_t> shape, std::mt19937& rng, float stddev, float mean = 0.0f) {
  Bf16Tensor t;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> values(static_cast<size_t>(n));
  fill_uniform(values.data(), values.size(), rng, stddev, mean);
  t.bits.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) t.bits[i] = f32_to_bf16(values[i]);
  t.view = {t.bits.data(), DType::BF16, std::move(shape), "random"};
  return t;
}

inline std::vector<float> random_f32(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::vector<float> v(n);
  fill_uniform(v.data(), n, rng, stddev, 0.0f);
  return v;
}

// Rounds every value to bf16 (what the large path's activations become).
inline std::vector<float> round_bf16(std::vector<float> v) {
  for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}
inline std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

// The lo term of --matmul-precision high: bf16(v - bf16(v)) for each value (the hi term is to_bf16_bits).
inline std::vector<uint16_t> to_bf16_lo_bits(const std::vector<float>& v) {
  const std::vector<float> hi = round_bf16(v);
  std::vector<float> rest(v.size());
  for (size_t i = 0; i < v.size(); ++i) rest[i] = v[i] - hi[i];
  return to_bf16_bits(rest);
}

template <typename T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> d(std::max<size_t>(host.size(), 1));
  if (!host.empty()) d.upload(host.data(), host.size());
  return d;
}

template <typename T>
std::vector<T> to_host(const cuda::DeviceBuffer<T>& d, size_t n) {
  std::vector<T> out(n);
  if (n > 0) d.download(out.data(), n);
  return out;
}

// Device buffer of n values set to NaN-like garbage first, so an element a kernel fails to write shows.
inline cuda::DeviceBuffer<float> poisoned(size_t n) {
  cuda::DeviceBuffer<float> d(std::max<size_t>(n, 1));
  CUDA_CHECK(cudaMemset(d.data(), 0xff, d.bytes()));  // 0xffffffff is a NaN
  return d;
}

struct Diff {
  double max_abs = 0.0, max_ref = 0.0;
  bool finite = true;
  double relative() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

inline Diff compare(const std::vector<float>& got, const std::vector<float>& ref) {
  Diff d;
  EXPECT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    if (!std::isfinite(got[i])) d.finite = false;
    d.max_abs = std::max(d.max_abs, static_cast<double>(std::fabs(got[i] - ref[i])));
    d.max_ref = std::max(d.max_ref, static_cast<double>(std::fabs(ref[i])));
  }
  return d;
}

// Prints the error and checks it: max |got - ref| / max |ref| <= tolerance, and no NaN or Inf.
inline void expect_close(const std::string& label, const std::vector<float>& got, const std::vector<float>& ref,
                         double tolerance) {
  const Diff d = compare(got, ref);
  std::printf("  %s: max |diff| %.3g, max |ref| %.3g, relative %.3g (tolerance %.1g)\n", label.c_str(), d.max_abs,
              d.max_ref, d.relative(), tolerance);
  EXPECT_TRUE(d.finite) << label << ": NaN or Inf in the output (an element not written?)";
  EXPECT_LE(d.relative(), tolerance) << label;
}

}  // namespace moescope::test
