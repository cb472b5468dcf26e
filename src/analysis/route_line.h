#pragma once
// One route line of a routes file, checked against what the meta line (or --num-experts) says.
// Two parsers with one meaning: route_from_json is the reference, on a parsed JSON object;
// parse_route_fast scans the common well-formed line directly, about ten times faster than building
// a JSON object, and declines (nullopt) anything unusual or wrong, which then goes to the reference.
// It never accepts a line the reference would reject (tests/analysis_test.cpp compares them).
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/json.h"

namespace moescope::analysis {

struct Route {
  int layer = 0;
  std::vector<int> topk_ids;  // [top_k]
  std::optional<std::string> req_id;
  std::optional<int64_t> token_idx;
  std::optional<int> rank;
  std::optional<int64_t> forward_pass_id;
  bool operator==(const Route&) const = default;
};

struct RouteLimits {
  int expert_limit = 1 << 16;         // ids must be below this
  bool num_experts_known = false;     // false: expert_limit is only a plausibility cap
  std::optional<int> num_layers;      // layers must be below this
  std::optional<int> top_k;           // topk_ids must have exactly this many entries
};

// j is an object with "layer" and "topk_ids". On a bad field: nullopt and the reason.
std::optional<Route> route_from_json(const Json& j, const RouteLimits& limits, std::string& reason);

// The same result as route_from_json(Json::parse(line)) for a valid route line of the usual shape
// (flat object, ASCII strings without escapes, "type" absent or "route"); nullopt otherwise.
std::optional<Route> parse_route_fast(std::string_view line, const RouteLimits& limits);

// A JSON integer that is >= 0 and fits an int (int64_t), or nullopt.
std::optional<int> small_index(const Json& j);
std::optional<int64_t> index64(const Json& j);

}  // namespace moescope::analysis
