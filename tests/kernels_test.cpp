// The CPU kernels against plain scalar loops (double accumulation), and the property the engine relies
// on: a token's product does not depend on how many tokens or rows share the pass (batch invariance).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"

namespace moescope::cpu {
namespace {

// A [rows, cols] matrix in the given dtype, with values exactly representable in every dtype.
struct Matrix {
  std::vector<uint16_t> half;
  std::vector<float> full;
  TensorView view;
  Matrix(int64_t rows, int64_t cols, DType dtype, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> q(-64, 64);
    std::vector<float> values(static_cast<size_t>(rows * cols));
    for (float& v : values) v = static_cast<float>(q(rng)) / 64.0f;  // multiples of 1/64: exact in bf16 and f16
    const void* data = nullptr;
    if (dtype == DType::F32) {
      full = values;
      data = full.data();
    } else {
      for (float v : values) half.push_back(dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v));
      data = half.data();
    }
    view = {data, dtype, {rows, cols}, "w"};
  }
};

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& e : v) e = d(rng);
  return v;
}

// y[t, r] = sum_k x[t, k] w[r, k] + bias[r] in double.
std::vector<double> reference_matmul(const std::vector<float>& x, int tokens, const TensorView& w, const TensorView& bias) {
  std::vector<double> y(static_cast<size_t>(tokens * w.rows()));
  for (int t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < w.rows(); ++r) {
      double s = bias.empty() ? 0.0 : element(bias, r);
      for (int64_t i = 0; i < w.cols(); ++i) s += static_cast<double>(x[t * w.cols() + i]) * element(w, r * w.cols() + i);
      y[t * w.rows() + r] = s;
    }
  return y;
}

struct Shape {
  int64_t rows, cols;
  int tokens;
};

class MatmulTest : public ::testing::TestWithParam<DType> {};

TEST_P(MatmulTest, MatchesScalarLoopForEveryShape) {
  // Rows and columns that are and are not multiples of the tiles (8 rows, 4x3, eight lanes).
  const Shape shapes[] = {{1, 1, 1}, {3, 7, 1}, {8, 64, 1}, {13, 37, 1}, {64, 512, 1}, {5, 9, 2},
                          {12, 40, 3}, {17, 100, 4}, {33, 65, 7}, {256, 512, 16}, {9, 24, 130}};
  for (const Shape& s : shapes) {
    const Matrix w(s.rows, s.cols, GetParam(), static_cast<uint32_t>(s.rows * 131 + s.cols));
    const Matrix bias(1, s.rows, GetParam(), 7);
    TensorView b = bias.view;
    b.shape = {s.rows};
    const auto x = random_vector(static_cast<size_t>(s.tokens * s.cols), 3);
    std::vector<float> y(static_cast<size_t>(s.tokens * s.rows));
    matmul(y.data(), x.data(), s.tokens, w.view, b);
    const auto want = reference_matmul(x, s.tokens, w.view, b);
    double max_err = 0.0;
    for (size_t i = 0; i < y.size(); ++i) max_err = std::max(max_err, std::fabs(y[i] - want[i]) / (1.0 + std::fabs(want[i])));
    EXPECT_LT(max_err, 1e-5) << s.rows << "x" << s.cols << " tokens " << s.tokens;
    std::printf("  %s %ldx%ld x %d tokens: max rel err %.3g\n", std::string(dtype_name(GetParam())).c_str(), static_cast<long>(s.rows),
                static_cast<long>(s.cols), s.tokens, max_err);
  }
}

TEST_P(MatmulTest, TokenResultIsBitIdenticalWhateverTheBatch) {
  // Token 5 of a 16-token pass, the same token alone, and a row range that starts mid-tile.
  const int64_t rows = 45, cols = 83;
  const Matrix w(rows, cols, GetParam(), 99);
  const auto x = random_vector(16 * cols, 5);
  std::vector<float> batched(16 * rows), alone(rows), slice(rows - 11);
  matmul(batched.data(), x.data(), 16, w.view);
  matmul(alone.data(), x.data() + 5 * cols, 1, w.view);
  matmul_rows(slice.data(), x.data() + 5 * cols, 1, w.view, 11, rows);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(batched[5 * rows + r], alone[r]) << "row " << r;
    if (r >= 11) {
      EXPECT_EQ(slice[r - 11], alone[r]) << "row " << r;
    }
    EXPECT_EQ(dot_row(x.data() + 5 * cols, w.view, r), alone[r]) << "row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MatmulTest, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(Kernels, RmsNormSwigluSoftmaxMatchScalarFormulas) {
  const int n = 37;
  const auto x = random_vector(2 * n, 11);
  const Matrix weight(1, n, DType::F32, 4);
  TensorView wv = weight.view;
  wv.shape = {n};
  std::vector<float> out(2 * n);
  rms_norm(out.data(), x.data(), 2, n, wv, 1e-6f);
  for (int t = 0; t < 2; ++t) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += static_cast<double>(x[t * n + i]) * x[t * n + i];
    const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(out[t * n + i], element(wv, i) * x[t * n + i] * inv, 1e-5);
  }

  std::vector<float> act(n);
  swiglu(act.data(), x.data(), x.data() + n, n);
  for (int i = 0; i < n; ++i) EXPECT_NEAR(act[i], x[i] / (1.0 + std::exp(-static_cast<double>(x[i]))) * x[n + i], 1e-5);

  std::vector<float> p(x.begin(), x.begin() + n);
  softmax(p.data(), n);
  double z = 0.0;
  for (int i = 0; i < n; ++i) z += std::exp(static_cast<double>(x[i]));
  for (int i = 0; i < n; ++i) EXPECT_NEAR(p[i], std::exp(static_cast<double>(x[i])) / z, 1e-6);
}

TEST(Kernels, SelectExpertsFollowsTorchTopkOrderAndRenormalises) {
  // Ties keep the lower expert id first, as torch.topk does on CPU and CUDA.
  const float probs[] = {0.1f, 0.3f, 0.05f, 0.3f, 0.25f};
  int32_t ids[3];
  float weights[3];
  select_experts(probs, 5, 3, false, ids, weights);
  EXPECT_EQ(std::vector<int32_t>(ids, ids + 3), (std::vector<int32_t>{1, 3, 4}));
  EXPECT_EQ(std::vector<float>(weights, weights + 3), (std::vector<float>{0.3f, 0.3f, 0.25f}));
  select_experts(probs, 5, 2, true, ids, weights);
  EXPECT_EQ(std::vector<int32_t>(ids, ids + 2), (std::vector<int32_t>{1, 3}));
  EXPECT_FLOAT_EQ(weights[0], 0.5f);
  EXPECT_FLOAT_EQ(weights[1], 0.5f);
}

}  // namespace
}  // namespace moescope::cpu
