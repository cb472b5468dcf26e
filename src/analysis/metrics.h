#pragma once
// Load-balance metrics of one expert-selection distribution: how many times each expert of a layer
// (or of all logged layers, summed) was among a token's top-k. Formulas and edge cases: docs/ANALYSIS.md.
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "util/json.h"

namespace moescope::analysis {

struct ExpertShare {
  int expert = 0;
  int64_t count = 0;
  double share = 0.0;  // count / total selections
};

struct DistributionMetrics {
  int num_experts = 0;
  int64_t selections = 0;            // sum of counts
  std::vector<int64_t> counts;       // [num_experts]
  std::vector<double> shares;        // [num_experts], sum 1 (all 0 when selections == 0)
  std::vector<ExpertShare> top_experts;  // most selected first, ties by lower id
  int experts_used = 0;              // experts selected at least once
  double entropy_bits = 0.0;         // Shannon entropy of the shares, base 2
  double max_entropy_bits = 0.0;     // log2(num_experts)
  double normalized_entropy = 0.0;   // entropy / max: 1 is perfectly balanced ("load balance")
  double gini = 0.0;                 // 0 equal load .. (n-1)/n all on one expert
  double coefficient_of_variation = 0.0;  // population std / mean of the counts
  double max_mean_ratio = 0.0;       // busiest expert's count / mean count
};

// The metrics of counts [num_experts]; top_experts keeps min(top_n, num_experts) entries.
// num_experts must be at least 1; counts must be non-negative.
DistributionMetrics compute_distribution_metrics(std::span<const int64_t> counts, int top_n = 10);

double shannon_entropy_bits(std::span<const int64_t> counts);
double normalized_entropy(std::span<const int64_t> counts);
double gini_coefficient(std::span<const int64_t> counts);
double coefficient_of_variation(std::span<const int64_t> counts);
double max_mean_ratio(std::span<const int64_t> counts);
std::vector<ExpertShare> top_experts(std::span<const int64_t> counts, int n);

Json to_json(const DistributionMetrics& m);

// Mutual information in bits between the row variable and the column variable of a table of counts
// [rows][columns] (every row as long): I = sum over cells of n_rc/N log2(n_rc N / (n_r n_c)), N the
// total, n_r and n_c the row and column sums. 0 for an empty table; clamped to [0, min(H(row), H(column))].
double mutual_information_bits(const std::vector<std::vector<int64_t>>& joint);

// Total variation distance between the shares of two count distributions over the same experts:
// 1/2 sum_i |a_i / A - b_i / B|, 0 (same shares) .. 1 (no expert in common). nullopt when either is empty.
std::optional<double> total_variation_distance(std::span<const int64_t> a, std::span<const int64_t> b);

}  // namespace moescope::analysis
