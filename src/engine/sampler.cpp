#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moescope {

int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (params_.temperature <= 0.0f) return argmax(logits);
  const int n = static_cast<int>(logits.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Candidates sorted by logit, highest first (stable: lower id first on ties).
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int keep = n;
  if (params_.top_k > 0) keep = std::min(keep, params_.top_k);
  std::vector<double> probs(keep);
  const double max = logits[order[0]] / params_.temperature;
  double sum = 0.0;
  for (int i = 0; i < keep; ++i) sum += (probs[i] = std::exp(logits[order[i]] / params_.temperature - max));
  for (double& p : probs) p /= sum;
  if (params_.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p, at least one token
    double cumulative = 0.0;
    int cut = 0;
    while (cut < keep) {
      cumulative += probs[cut++];
      if (cumulative >= params_.top_p) break;
    }
    keep = cut;
    const double kept = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
    for (int i = 0; i < keep; ++i) probs[i] /= kept;
  }
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  double cumulative = 0.0;
  for (int i = 0; i < keep; ++i) {
    cumulative += probs[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

}  // namespace moescope
