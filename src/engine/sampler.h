#pragma once
// Token sampling: greedy at temperature 0, else temperature, top-k and top-p (as HF's logits warpers,
// in that order) and a draw from a per-request seeded generator: the same seed gives the same output.
#include <cstdint>
#include <random>
#include <span>

namespace moescope {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0 or -1: off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest logit, the first on ties (as torch.argmax).
int32_t argmax(std::span<const float> logits);

}  // namespace moescope
