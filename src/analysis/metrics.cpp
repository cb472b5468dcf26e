#include "analysis/metrics.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.h"

namespace moescope::analysis {
namespace {

int64_t total_of(std::span<const int64_t> counts) { return std::accumulate(counts.begin(), counts.end(), int64_t{0}); }

void check_counts(std::span<const int64_t> counts) {
  if (counts.empty()) fail("metrics: a distribution needs at least one expert");
  for (int64_t c : counts)
    if (c < 0) fail("metrics: negative selection count {}", c);
}

}  // namespace

double shannon_entropy_bits(std::span<const int64_t> counts) {
  const int64_t total = total_of(counts);
  if (total == 0) return 0.0;
  double h = 0.0;
  for (int64_t c : counts) {
    if (c == 0) continue;  // 0 * log 0 = 0 by continuity
    const double p = static_cast<double>(c) / static_cast<double>(total);
    h -= p * std::log2(p);
  }
  // Rounding can leave -0.0 or a hair above log2(n) for a uniform distribution; clamp to the range
  // the quantity lives in so that normalised entropy never reads 1.0000000002.
  return std::clamp(h, 0.0, std::log2(static_cast<double>(counts.size())));
}

double normalized_entropy(std::span<const int64_t> counts) {
  const int64_t total = total_of(counts);
  if (total == 0) return 0.0;          // no load at all: nothing is balanced (documented)
  if (counts.size() == 1) return 1.0;  // one expert takes all there is: as balanced as it can be
  return shannon_entropy_bits(counts) / std::log2(static_cast<double>(counts.size()));
}

double gini_coefficient(std::span<const int64_t> counts) {
  const int64_t total = total_of(counts);
  if (total == 0) return 0.0;
  std::vector<int64_t> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());
  // G = 2 * sum_i i * x_(i) / (n * sum x) - (n + 1) / n with x_(1) <= ... <= x_(n), i from 1:
  // the mean absolute difference over all pairs divided by twice the mean, without the O(n^2) loop.
  const double n = static_cast<double>(sorted.size());
  double weighted = 0.0;
  for (size_t i = 0; i < sorted.size(); ++i) weighted += static_cast<double>(i + 1) * static_cast<double>(sorted[i]);
  const double g = 2.0 * weighted / (n * static_cast<double>(total)) - (n + 1.0) / n;
  return std::max(g, 0.0);
}

double coefficient_of_variation(std::span<const int64_t> counts) {
  const int64_t total = total_of(counts);
  if (total == 0) return 0.0;
  const double n = static_cast<double>(counts.size());
  const double mean = static_cast<double>(total) / n;
  double sum_sq = 0.0;
  for (int64_t c : counts) sum_sq += (static_cast<double>(c) - mean) * (static_cast<double>(c) - mean);
  return std::sqrt(sum_sq / n) / mean;  // population standard deviation: the experts are all there is
}

double max_mean_ratio(std::span<const int64_t> counts) {
  const int64_t total = total_of(counts);
  if (total == 0) return 0.0;
  const double mean = static_cast<double>(total) / static_cast<double>(counts.size());
  return static_cast<double>(*std::max_element(counts.begin(), counts.end())) / mean;
}

std::vector<ExpertShare> top_experts(std::span<const int64_t> counts, int n) {
  const int64_t total = total_of(counts);
  std::vector<int> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t keep = std::min(order.size(), static_cast<size_t>(std::max(n, 0)));
  // stable_sort keeps lower ids first among equal counts.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return counts[a] > counts[b]; });
  std::vector<ExpertShare> top;
  for (size_t i = 0; i < keep; ++i) {
    const int e = order[i];
    top.push_back({e, counts[e], total ? static_cast<double>(counts[e]) / static_cast<double>(total) : 0.0});
  }
  return top;
}

DistributionMetrics compute_distribution_metrics(std::span<const int64_t> counts, int top_n) {
  check_counts(counts);
  DistributionMetrics m;
  m.num_experts = static_cast<int>(counts.size());
  m.selections = total_of(counts);
  m.counts.assign(counts.begin(), counts.end());
  m.shares.resize(counts.size(), 0.0);
  for (size_t e = 0; e < counts.size(); ++e) {
    if (m.selections) m.shares[e] = static_cast<double>(counts[e]) / static_cast<double>(m.selections);
    m.experts_used += counts[e] > 0;
  }
  m.top_experts = top_experts(counts, top_n);
  m.entropy_bits = shannon_entropy_bits(counts);
  m.max_entropy_bits = std::log2(static_cast<double>(counts.size()));
  m.normalized_entropy = normalized_entropy(counts);
  m.gini = gini_coefficient(counts);
  m.coefficient_of_variation = coefficient_of_variation(counts);
  m.max_mean_ratio = max_mean_ratio(counts);
  return m;
}

Json to_json(const DistributionMetrics& m) {
  Json top = Json::array();
  for (const ExpertShare& t : m.top_experts) top.push_back({{"expert", t.expert}, {"count", t.count}, {"share", t.share}});
  return {{"num_experts", m.num_experts},
          {"selections", m.selections},
          {"experts_used", m.experts_used},
          {"entropy_bits", m.entropy_bits},
          {"max_entropy_bits", m.max_entropy_bits},
          {"normalized_entropy", m.normalized_entropy},
          {"gini", m.gini},
          {"coefficient_of_variation", m.coefficient_of_variation},
          {"max_mean_ratio", m.max_mean_ratio},
          {"top_experts", top},
          {"counts", m.counts},
          {"shares", m.shares}};
}

double mutual_information_bits(const std::vector<std::vector<int64_t>>& joint) {
  if (joint.empty()) return 0.0;
  const size_t columns = joint[0].size();
  std::vector<int64_t> row_sums, column_sums(columns, 0);
  for (const std::vector<int64_t>& row : joint) {
    if (row.size() != columns) fail("metrics: rows of different lengths in a contingency table");
    check_counts(row);
    row_sums.push_back(total_of(row));
    for (size_t c = 0; c < columns; ++c) column_sums[c] += row[c];
  }
  const int64_t total = total_of(row_sums);
  if (total == 0) return 0.0;
  const double n = static_cast<double>(total);
  double mi = 0.0;
  for (size_t r = 0; r < joint.size(); ++r)
    for (size_t c = 0; c < columns; ++c) {
      const int64_t n_rc = joint[r][c];
      if (n_rc == 0) continue;  // 0 log 0 = 0
      const double p_rc = static_cast<double>(n_rc) / n;
      mi += p_rc * std::log2(static_cast<double>(n_rc) * n /
                             (static_cast<double>(row_sums[r]) * static_cast<double>(column_sums[c])));
    }
  // Rounding leaves a hair below 0 for independent variables, or above H for a one-to-one table.
  return std::clamp(mi, 0.0, std::min(shannon_entropy_bits(row_sums), shannon_entropy_bits(column_sums)));
}

std::optional<double> total_variation_distance(std::span<const int64_t> a, std::span<const int64_t> b) {
  if (a.size() != b.size()) fail("metrics: distributions over {} and {} experts", a.size(), b.size());
  const int64_t total_a = total_of(a), total_b = total_of(b);
  if (total_a == 0 || total_b == 0) return std::nullopt;
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i)
    sum += std::fabs(static_cast<double>(a[i]) / static_cast<double>(total_a) -
                     static_cast<double>(b[i]) / static_cast<double>(total_b));
  return std::min(sum / 2.0, 1.0);
}

}  // namespace moescope::analysis
