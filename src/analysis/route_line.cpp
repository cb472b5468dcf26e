#include "analysis/route_line.h"

#include <charconv>
#include <cmath>

#include "util/error.h"

namespace moescope::analysis {

std::optional<int> small_index(const Json& j) {
  if (!j.is_number_integer()) return std::nullopt;
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    return v <= static_cast<uint64_t>(INT32_MAX) ? std::optional<int>(static_cast<int>(v)) : std::nullopt;
  }
  const int64_t v = j.get<int64_t>();
  return v >= 0 && v <= INT32_MAX ? std::optional<int>(static_cast<int>(v)) : std::nullopt;
}

std::optional<int64_t> index64(const Json& j) {
  if (!j.is_number_integer()) return std::nullopt;
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    return v <= static_cast<uint64_t>(INT64_MAX) ? std::optional<int64_t>(static_cast<int64_t>(v)) : std::nullopt;
  }
  const int64_t v = j.get<int64_t>();
  return v >= 0 ? std::optional<int64_t>(v) : std::nullopt;
}

namespace {

// The checks both parsers share, on ids already read: nullopt when fine, else the reason.
std::optional<std::string> check_ids(const std::vector<int>& ids, const RouteLimits& limits) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] >= limits.expert_limit)
      return limits.num_experts_known
                 ? fmt::format("expert id {} out of range (num_experts {})", ids[i], limits.expert_limit)
                 : fmt::format("expert id {} is implausible", ids[i]);
    for (size_t j = 0; j < i; ++j)
      if (ids[j] == ids[i])  // a router picks k distinct experts; a repeat means the line is corrupt
        return fmt::format("expert id {} appears twice in \"topk_ids\"", ids[i]);
  }
  if (limits.top_k && static_cast<int>(ids.size()) != *limits.top_k)
    return fmt::format("\"topk_ids\" has {} entries, top_k is {}", ids.size(), *limits.top_k);
  return std::nullopt;
}

}  // namespace

std::optional<Route> route_from_json(const Json& j, const RouteLimits& limits, std::string& reason) {
  Route r;
  const std::optional<int> layer = small_index(j["layer"]);
  if (!layer) {
    reason = "\"layer\" is not a non-negative integer";
    return std::nullopt;
  }
  if (limits.num_layers && *layer >= *limits.num_layers) {
    reason = fmt::format("layer {} out of range (num_layers {})", *layer, *limits.num_layers);
    return std::nullopt;
  }
  r.layer = *layer;

  const Json& ids = j["topk_ids"];
  if (!ids.is_array() || ids.empty()) {
    reason = "\"topk_ids\" is not a non-empty list";
    return std::nullopt;
  }
  for (const Json& id : ids) {
    const std::optional<int> e = small_index(id);
    if (!e) {
      reason = "\"topk_ids\" holds something other than a non-negative integer";
      return std::nullopt;
    }
    r.topk_ids.push_back(*e);
  }
  if (std::optional<std::string> bad = check_ids(r.topk_ids, limits)) {
    reason = std::move(*bad);
    return std::nullopt;
  }
  if (const auto w = j.find("topk_weights"); w != j.end()) {
    bool ok = w->is_array() && w->size() == ids.size();
    if (ok)
      for (const Json& x : *w) ok = ok && x.is_number() && std::isfinite(x.get<double>());
    if (!ok) {
      reason = "\"topk_weights\" is not a list of numbers as long as \"topk_ids\"";
      return std::nullopt;
    }
  }
  if (const auto it = j.find("req_id"); it != j.end() && !it->is_null()) {
    if (it->is_string()) r.req_id = it->get<std::string>();
    else if (it->is_number_integer()) r.req_id = it->dump();
    else {
      reason = "\"req_id\" is neither a string nor an integer";
      return std::nullopt;
    }
  }
  if (const auto it = j.find("token_idx"); it != j.end() && !it->is_null()) {
    r.token_idx = index64(*it);
    if (!r.token_idx) {
      reason = "\"token_idx\" is not a non-negative integer";
      return std::nullopt;
    }
  }
  if (const auto it = j.find("rank"); it != j.end() && !it->is_null()) {
    r.rank = small_index(*it);
    if (!r.rank) {
      reason = "\"rank\" is not a non-negative integer";
      return std::nullopt;
    }
  }
  if (const auto it = j.find("forward_pass_id"); it != j.end() && !it->is_null()) {
    r.forward_pass_id = index64(*it);
    if (!r.forward_pass_id) {
      reason = "\"forward_pass_id\" is not a non-negative integer";
      return std::nullopt;
    }
  }
  return r;
}

namespace {

// A scanner over one line for the shape routes are written in. Every method returns false on
// anything it does not handle, and the caller gives the line to the reference parser.
class FastScanner {
 public:
  explicit FastScanner(std::string_view s) : s_(s) {}

  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  bool eat(char c) {
    skip_ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool at_end() {
    skip_ws();
    return i_ == s_.size();
  }
  char peek() {
    skip_ws();
    return i_ < s_.size() ? s_[i_] : '\0';
  }

  // A string of printable ASCII without escapes (anything else is left to the reference parser,
  // which knows escapes and checks UTF-8).
  bool string(std::string_view& out) {
    if (!eat('"')) return false;
    const size_t start = i_;
    while (i_ < s_.size() && s_[i_] != '"') {
      const auto c = static_cast<unsigned char>(s_[i_]);
      if (c < 0x20 || c >= 0x80 || c == '\\') return false;
      ++i_;
    }
    if (i_ == s_.size()) return false;
    out = s_.substr(start, i_ - start);
    ++i_;
    return true;
  }

  // The JSON number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?; `integer` tells whether
  // it had neither fraction nor exponent.
  bool number(std::string_view& text, bool& integer) {
    skip_ws();
    const size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ >= s_.size() || !isdigit(s_[i_])) return false;
    if (s_[i_] == '0') ++i_;
    else
      while (i_ < s_.size() && isdigit(s_[i_])) ++i_;
    integer = true;
    if (i_ < s_.size() && s_[i_] == '.') {
      integer = false;
      ++i_;
      if (i_ >= s_.size() || !isdigit(s_[i_])) return false;
      while (i_ < s_.size() && isdigit(s_[i_])) ++i_;
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      integer = false;
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (i_ >= s_.size() || !isdigit(s_[i_])) return false;
      while (i_ < s_.size() && isdigit(s_[i_])) ++i_;
    }
    text = s_.substr(start, i_ - start);
    return true;
  }

  // A non-negative integer no larger than max. Declines negatives and fractions (the reference
  // parser reports them) and more than 18 digits (where JSON integers turn into other types).
  bool index(int64_t max, int64_t& out) {
    std::string_view text;
    bool integer = false;
    if (!number(text, integer) || !integer || text[0] == '-' || text.size() > 18) return false;
    std::from_chars(text.data(), text.data() + text.size(), out);
    return out <= max;
  }

  bool finite_number() {
    std::string_view text;
    bool integer = false;
    if (!number(text, integer)) return false;
    double v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    return ec == std::errc() && end == text.data() + text.size() && std::isfinite(v);
  }

  // true, false or null: a value the shape does not use, skipped when under an unknown key.
  bool literal() {
    skip_ws();
    for (std::string_view word : {"true", "false", "null"})
      if (s_.substr(i_, word.size()) == word) {
        i_ += word.size();
        return true;
      }
    return false;
  }

  // A value under a key this parser does not know: a scalar, or a flat list of numbers.
  bool skip_value() {
    const char c = peek();
    if (c == '"') {
      std::string_view ignored;
      return string(ignored);
    }
    if (c == '[') {
      eat('[');
      if (eat(']')) return true;
      do {
        if (!finite_number()) return false;
      } while (eat(','));
      return eat(']');
    }
    if (c == '-' || isdigit(c)) {
      std::string_view ignored;
      bool integer = false;
      return number(ignored, integer);
    }
    return literal();
  }

 private:
  static bool isdigit(char c) { return c >= '0' && c <= '9'; }
  std::string_view s_;
  size_t i_ = 0;
};

}  // namespace

std::optional<Route> parse_route_fast(std::string_view line, const RouteLimits& limits) {
  FastScanner in(line);
  Route r;
  bool have_layer = false, have_ids = false;
  size_t num_weights = 0;
  bool have_weights = false;
  unsigned seen = 0;  // one bit per known key: a repeated key is left to the reference parser
  auto first_time = [&seen](unsigned bit) {
    if (seen & bit) return false;
    seen |= bit;
    return true;
  };
  if (!in.eat('{')) return std::nullopt;
  if (in.eat('}')) return std::nullopt;  // no layer, no topk_ids: not a route
  do {
    std::string_view key;
    if (!in.string(key) || !in.eat(':')) return std::nullopt;
    int64_t v = 0;
    if (key == "type") {
      std::string_view type;
      if (!first_time(1) || !in.string(type) || type != "route") return std::nullopt;
    } else if (key == "layer") {
      if (!first_time(2) || !in.index(INT32_MAX, v)) return std::nullopt;
      if (limits.num_layers && v >= *limits.num_layers) return std::nullopt;
      r.layer = static_cast<int>(v);
      have_layer = true;
    } else if (key == "topk_ids") {
      if (!first_time(4) || !in.eat('[')) return std::nullopt;
      do {
        if (!in.index(INT32_MAX, v)) return std::nullopt;
        r.topk_ids.push_back(static_cast<int>(v));
      } while (in.eat(','));
      if (!in.eat(']')) return std::nullopt;
      have_ids = true;
    } else if (key == "topk_weights") {
      if (!first_time(8) || !in.eat('[')) return std::nullopt;
      if (!in.eat(']')) {
        do {
          if (!in.finite_number()) return std::nullopt;
          ++num_weights;
        } while (in.eat(','));
        if (!in.eat(']')) return std::nullopt;
      }
      have_weights = true;
    } else if (key == "req_id") {
      std::string_view id;
      if (!first_time(16) || !in.string(id)) return std::nullopt;
      r.req_id = std::string(id);
    } else if (key == "token_idx") {
      if (!first_time(32) || !in.index(INT64_MAX, v)) return std::nullopt;
      r.token_idx = v;
    } else if (key == "rank") {
      if (!first_time(64) || !in.index(INT32_MAX, v)) return std::nullopt;
      r.rank = static_cast<int>(v);
    } else if (key == "forward_pass_id") {
      if (!first_time(128) || !in.index(INT64_MAX, v)) return std::nullopt;
      r.forward_pass_id = v;
    } else if (!in.skip_value()) {  // other keys are ignored by both parsers, whatever their value
      return std::nullopt;
    }
  } while (in.eat(','));
  if (!in.eat('}') || !in.at_end()) return std::nullopt;
  if (!have_layer || !have_ids || r.topk_ids.empty()) return std::nullopt;
  if (have_weights && num_weights != r.topk_ids.size()) return std::nullopt;
  if (check_ids(r.topk_ids, limits)) return std::nullopt;
  return r;
}

}  // namespace moescope::analysis
