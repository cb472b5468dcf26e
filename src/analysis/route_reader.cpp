#include "analysis/route_reader.h"

#include <cmath>
#include <fstream>
#include <unordered_map>
#include <unordered_set>

#include "analysis/route_line.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::analysis {
namespace {

// Without a meta line or --num-experts the expert count is inferred from the ids, so one corrupt
// id such as 123456789 would otherwise size every count vector; no MoE model has more experts.
constexpr int k_max_inferred_experts = RouteLimits{}.expert_limit;
// Token positions below this are tracked in a bitmap per request; rarer larger ones in a hash set.
constexpr int64_t k_bitmap_tokens = 1 << 22;

class Accumulator {
 public:
  explicit Accumulator(const RouteReadOptions& options) : options_(options) {}

  void add_line(std::string_view text, int64_t line_no, bool unterminated) {
    ++data_.lines_read;
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);  // CRLF files
    if (text.find_first_not_of(" \t") == std::string_view::npos) return;
    const RouteLimits limits = this->limits();
    if (std::optional<Route> route = parse_route_fast(text, limits)) return add_route(*route, line_no);
    Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded())
      return malformed(line_no, unterminated ? "truncated last line (no newline at the end)" : "not valid JSON");
    if (!j.is_object()) return malformed(line_no, "not a JSON object");
    const auto type = j.find("type");
    if (type != j.end() && *type == "meta") return add_meta(j, line_no);
    if (!j.contains("layer") || !j.contains("topk_ids")) {
      ++data_.skipped_lines;
      return;
    }
    std::string reason;
    std::optional<Route> route = route_from_json(j, limits, reason);
    if (!route) return malformed(line_no, reason);
    add_route(*route, line_no);
  }

  RouteData finish() {
    if (options_.num_experts) {
      data_.num_experts = *options_.num_experts;
      data_.num_experts_source = NumExpertsSource::kFlag;
      if (data_.meta.num_experts && *data_.meta.num_experts != *options_.num_experts)
        data_.notes.push_back(fmt::format("the meta line says {} experts; --num-experts {} is used", *data_.meta.num_experts,
                                          *options_.num_experts));
    } else if (data_.meta.num_experts) {
      data_.num_experts = *data_.meta.num_experts;
      data_.num_experts_source = NumExpertsSource::kMeta;
    } else {
      data_.num_experts = max_id_ + 1;
      data_.num_experts_source = NumExpertsSource::kInferred;
      if (data_.records_used)
        data_.notes.push_back(fmt::format(
            "no meta line: num_experts inferred as the largest expert id + 1 = {} (experts above it that were never "
            "selected are not seen; give --num-experts to set it)",
            data_.num_experts));
    }
    for (auto& [layer, counts] : data_.counts) counts.resize(static_cast<size_t>(data_.num_experts), 0);

    if (data_.meta.top_k) {
      data_.top_k = data_.meta.top_k;
    } else if (observed_top_k_ > 0 && !top_k_varies_) {
      data_.top_k = observed_top_k_;
    } else if (top_k_varies_) {
      data_.notes.push_back("records select different numbers of experts; top_k is not reported");
    }

    data_.requests = static_cast<int64_t>(request_index_.size());
    int64_t tokens = static_cast<int64_t>(far_tokens_.size());
    for (const std::vector<bool>& seen : token_seen_)
      for (bool b : seen) tokens += b;
    data_.tokens = tokens;
    if (!pass_ids_.empty()) data_.forward_passes = static_cast<int64_t>(pass_ids_.size());
    if (data_.ranks.size() > 1)
      data_.notes.push_back(fmt::format("records from {} ranks are all counted (a token routed on several ranks counts "
                                        "once per rank)",
                                        data_.ranks.size()));
    if (!unlisted_layers_.empty())
      data_.notes.push_back(fmt::format("records for layers the meta line does not list: {}",
                                        fmt::join(unlisted_layers_, ", ")));
    if (ignored_meta_lines_)
      data_.notes.push_back(fmt::format("{} later meta line(s) ignored (only a meta line before the first route is "
                                        "the header)",
                                        ignored_meta_lines_));
    return std::move(data_);
  }

 private:
  void malformed(int64_t line_no, std::string reason) {
    ++data_.malformed_lines;
    if (data_.malformed_examples.size() < options_.max_malformed_examples)
      data_.malformed_examples.push_back({line_no, std::move(reason)});
  }

  void add_meta(const Json& j, int64_t line_no) {
    if (data_.meta.present || data_.records_used > 0) {
      ++ignored_meta_lines_;
      ++data_.skipped_lines;
      return;
    }
    RouteMeta meta;
    meta.present = true;
    auto positive = [&](const char* key, std::optional<int>& out) -> bool {
      const auto it = j.find(key);
      if (it == j.end() || it->is_null()) return true;
      const std::optional<int> v = small_index(*it);
      if (!v || *v < 1) return false;
      out = *v;
      return true;
    };
    const std::pair<const char*, std::optional<int>*> fields[] = {
        {"num_layers", &meta.num_layers}, {"num_experts", &meta.num_experts}, {"top_k", &meta.top_k}};
    for (const auto& [key, out] : fields)
      if (!positive(key, *out)) return malformed(line_no, fmt::format("meta line: \"{}\" is not a positive integer", key));
    if (meta.num_experts && *meta.num_experts > k_max_inferred_experts && !options_.num_experts)
      return malformed(line_no, fmt::format("meta line: num_experts {} is implausible", *meta.num_experts));
    if (const auto it = j.find("model_id"); it != j.end() && it->is_string()) meta.model_id = it->get<std::string>();
    if (const auto it = j.find("moescope_version"); it != j.end() && it->is_string())
      meta.moescope_version = it->get<std::string>();
    if (const auto it = j.find("layers"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) return malformed(line_no, "meta line: \"layers\" is not a list of layer numbers");
      for (const Json& l : *it) {
        const std::optional<int> v = small_index(l);
        if (!v) return malformed(line_no, "meta line: \"layers\" is not a list of layer numbers");
        meta.layers.push_back(*v);
      }
    }
    data_.meta = std::move(meta);
  }

  RouteLimits limits() const {
    RouteLimits l;
    if (options_.num_experts) l.expert_limit = *options_.num_experts;
    else if (data_.meta.num_experts) l.expert_limit = *data_.meta.num_experts;
    else l.expert_limit = k_max_inferred_experts;
    l.num_experts_known = options_.num_experts || data_.meta.num_experts;
    l.num_layers = data_.meta.num_layers;
    l.top_k = data_.meta.top_k;
    return l;
  }

  void add_route(const Route& r, int64_t line_no) {
    if (options_.on_route) options_.on_route(r, line_no);
    std::vector<int64_t>& counts = data_.counts[r.layer];
    for (int e : r.topk_ids) {
      if (static_cast<size_t>(e) >= counts.size()) counts.resize(static_cast<size_t>(e) + 1, 0);
      ++counts[static_cast<size_t>(e)];
      max_id_ = std::max(max_id_, e);
    }
    const int k = static_cast<int>(r.topk_ids.size());
    if (observed_top_k_ == 0) observed_top_k_ = k;
    else if (observed_top_k_ != k) top_k_varies_ = true;
    if (!data_.meta.layers.empty() && !unlisted_layers_.count(r.layer)) {
      bool listed = false;
      for (int l : data_.meta.layers) listed = listed || l == r.layer;
      if (!listed) unlisted_layers_.insert(r.layer);
    }
    if (r.rank) data_.ranks.insert(*r.rank);
    if (r.forward_pass_id) pass_ids_.insert(*r.forward_pass_id);
    if (r.req_id) {
      const auto [it, inserted] = request_index_.try_emplace(*r.req_id, static_cast<uint32_t>(request_index_.size()));
      if (inserted) token_seen_.emplace_back();
      if (r.token_idx) mark_token(it->second, *r.token_idx);
      else ++data_.records_without_token;
    } else {
      ++data_.records_without_token;
    }
    ++data_.records_used;
  }

  // Distinct (request, position) pairs: every logged layer, and every rank, repeats a token.
  void mark_token(uint32_t request, int64_t token_idx) {
    if (token_idx < k_bitmap_tokens) {
      std::vector<bool>& seen = token_seen_[request];
      if (static_cast<size_t>(token_idx) >= seen.size()) seen.resize(static_cast<size_t>(token_idx) + 1, false);
      seen[static_cast<size_t>(token_idx)] = true;
    } else {
      far_tokens_.insert({request, token_idx});
    }
  }

  struct PairHash {
    size_t operator()(const std::pair<uint32_t, int64_t>& p) const {
      return std::hash<int64_t>()(p.second) ^ (static_cast<size_t>(p.first) * 0x9E3779B97F4A7C15ull);
    }
  };

  const RouteReadOptions& options_;
  RouteData data_;
  int max_id_ = -1;
  int observed_top_k_ = 0;
  bool top_k_varies_ = false;
  int64_t ignored_meta_lines_ = 0;
  std::set<int> unlisted_layers_;
  std::unordered_map<std::string, uint32_t> request_index_;  // req_id -> dense index
  std::vector<std::vector<bool>> token_seen_;                 // [request][token_idx]
  std::unordered_set<std::pair<uint32_t, int64_t>, PairHash> far_tokens_;
  std::unordered_set<int64_t> pass_ids_;
};

}  // namespace

const char* to_string(NumExpertsSource s) {
  switch (s) {
    case NumExpertsSource::kMeta: return "meta";
    case NumExpertsSource::kFlag: return "flag";
    case NumExpertsSource::kInferred: return "inferred";
  }
  return "inferred";
}

std::vector<int> RouteData::layers() const {
  std::vector<int> out;
  for (const auto& [layer, c] : counts) out.push_back(layer);
  return out;
}

RouteData read_routes(std::istream& in, const RouteReadOptions& options) {
  if (options.num_experts && *options.num_experts < 1) fail("--num-experts must be at least 1");
  Accumulator acc(options);
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    // getline sets eof only when the line ended at the end of the stream without a newline.
    acc.add_line(line, line_no, in.eof());
  }
  if (in.bad()) fail("read error after line {}", line_no);
  return acc.finish();
}

RouteData read_routes(const std::filesystem::path& path, const RouteReadOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open routes file", path.string());
  if (std::filesystem::is_directory(path)) fail("{}: is a directory, not a routes file", path.string());
  try {
    return read_routes(in, options);
  } catch (const Error& e) {
    fail("{}: {}", path.string(), e.what());
  }
}

}  // namespace moescope::analysis
