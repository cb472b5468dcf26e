#pragma once
// Reads routes from JSONL, streaming (files can be gigabytes): the routing log of SPEC §5 (a meta
// line, then {"type":"route","req_id","token_idx","layer","topk_ids","topk_weights"} per token and
// layer) and the recorder's per_token stream (the same fields plus "forward_pass_id" and "rank",
// "type" optional, the meta line optional). Any line with "layer" and "topk_ids" is a route.
// Bad lines are counted and described, never fatal: a half-written last line is normal after a crash.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <istream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace moescope::analysis {

struct RouteMeta {
  bool present = false;
  std::string model_id;
  std::string moescope_version;
  std::optional<int> num_layers;
  std::optional<int> num_experts;
  std::optional<int> top_k;
  std::vector<int> layers;  // the layers the logger was told to log
};

struct MalformedLine {
  int64_t line = 0;  // 1-based
  std::string reason;
};

enum class NumExpertsSource { kMeta, kFlag, kInferred };
const char* to_string(NumExpertsSource s);

struct RouteData {
  RouteMeta meta;
  int num_experts = 0;
  NumExpertsSource num_experts_source = NumExpertsSource::kInferred;
  std::optional<int> top_k;  // from meta, else the one length every record had
  std::map<int, std::vector<int64_t>> counts;  // layer -> selections per expert [num_experts]

  int64_t lines_read = 0;       // every line, blank ones included
  int64_t records_used = 0;     // route lines counted
  int64_t malformed_lines = 0;  // bad JSON, wrong types, out-of-range ids, truncated
  int64_t skipped_lines = 0;    // valid JSON that is not a route (other record kinds, repeated meta)
  std::vector<MalformedLine> malformed_examples;  // the first few

  int64_t requests = 0;                // distinct req_id
  int64_t tokens = 0;                  // distinct (req_id, token_idx)
  int64_t records_without_token = 0;   // routes lacking req_id or token_idx (not in `tokens`)
  std::set<int> ranks;                 // "rank" values seen (per_token stream)
  std::optional<int64_t> forward_passes;  // distinct forward_pass_id, when the records have them
  std::vector<std::string> notes;      // what the reader inferred or noticed, for the summary

  std::vector<int> layers() const;
};

struct Route;

struct RouteReadOptions {
  std::optional<int> num_experts;  // --num-experts: wins over the meta line
  size_t max_malformed_examples = 5;
  // Called with every route that is counted and its line number (1-based), in file order: for analyses
  // that need more than the counts, without a second pass over the file. An Error it throws ends the read.
  std::function<void(const Route& route, int64_t line)> on_route;
};

// Reads a routes file; throws Error when it cannot be opened or read. An empty result (no records)
// is returned, not thrown: the caller decides whether that is an error.
RouteData read_routes(const std::filesystem::path& path, const RouteReadOptions& options = {});
RouteData read_routes(std::istream& in, const RouteReadOptions& options = {});

}  // namespace moescope::analysis
