#include "analysis/class_routing.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "analysis/metrics.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

void add_selections(std::vector<int64_t>& counts, const std::vector<int>& topk_ids) {
  for (int e : topk_ids) {
    if (static_cast<size_t>(e) >= counts.size()) counts.resize(static_cast<size_t>(e) + 1, 0);
    ++counts[static_cast<size_t>(e)];
  }
}

int64_t sum_of(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

ExpertRow make_row(int64_t tokens, const std::vector<int64_t>& counts, const std::vector<double>& layer_shares) {
  ExpertRow row;
  row.tokens = tokens;
  row.counts = counts;
  row.selections = sum_of(counts);
  row.shares.assign(counts.size(), 0.0);
  if (row.selections == 0) return row;
  for (size_t e = 0; e < counts.size(); ++e)
    row.shares[e] = static_cast<double>(counts[e]) / static_cast<double>(row.selections);
  // max_element returns the first of equal maxima: the lower id.
  const size_t top = static_cast<size_t>(std::max_element(counts.begin(), counts.end()) - counts.begin());
  // A row's selections are part of the layer's, so an expert the row picked has a layer share above 0.
  row.top = TopExpert{static_cast<int>(top), counts[top], row.shares[top], row.shares[top] / layer_shares[top]};
  return row;
}

Json to_json(const std::optional<TopExpert>& t) {
  if (!t) return nullptr;
  return {{"expert", t->expert}, {"count", t->count}, {"share", t->share}, {"lift", t->lift}};
}

}  // namespace

ClassRoutingJoin::ClassRoutingJoin(const OutputsFile& outputs, const std::function<TokenClass(int32_t)>& classify)
    : outputs_(outputs) {
  std::unordered_map<int32_t, TokenClass> known;
  for (const std::string& req_id : outputs.order) {
    const RequestTokens& tokens = outputs.requests.at(req_id);
    Request& r = requests_[req_id];
    r.tokens = &tokens;
    r.routed.assign(static_cast<size_t>(tokens.size()), false);
    r.classes.reserve(static_cast<size_t>(tokens.size()));
    for (int64_t i = 0; i < tokens.size(); ++i) {
      const int32_t id = tokens.id_at(i);
      auto it = known.find(id);
      if (it == known.end()) {
        try {
          it = known.emplace(id, classify(id)).first;
        } catch (const Error& e) {
          fail("{}:{}: request \"{}\": {}", outputs.path.string(), tokens.line, req_id, e.what());
        }
      }
      r.classes.push_back(it->second);
    }
  }
  result_.requests = static_cast<int64_t>(outputs.order.size());
}

void ClassRoutingJoin::add(const Route& route, int64_t line) {
  if (!route.req_id || !route.token_idx)
    fail("line {}: the route has no {}, so it cannot be joined with the tokens in {}", line,
         route.req_id ? "token_idx" : "req_id", outputs_.path.string());
  const auto it = requests_.find(*route.req_id);
  if (it == requests_.end())
    fail("line {}: req_id \"{}\" is not in the tokens file {} ({} requests)", line, *route.req_id,
         outputs_.path.string(), requests_.size());
  Request& r = it->second;
  const int64_t idx = *route.token_idx;
  if (idx >= r.tokens->size())
    fail("line {}: token_idx {} of request \"{}\" is beyond its {} tokens in {} ({} prompt + {} output)", line, idx,
         *route.req_id, r.tokens->size(), outputs_.path.string(), r.tokens->prompt_ids.size(),
         r.tokens->output_ids.size());
  const auto token_class = static_cast<size_t>(r.classes[static_cast<size_t>(idx)]);
  LayerClassCounts& c = result_.layers[route.layer];
  add_selections(c.class_counts[token_class], route.topk_ids);
  ++c.class_tokens[token_class];
  if (r.tokens->is_prompt(idx)) {
    add_selections(c.prompt_counts, route.topk_ids);
    ++c.prompt_tokens;
  } else {
    add_selections(c.generated_counts, route.topk_ids);
    ++c.generated_tokens;
  }
  r.routed[static_cast<size_t>(idx)] = true;
}

ClassRouting ClassRoutingJoin::finish(int num_experts) {
  ClassRouting out = std::move(result_);
  out.num_experts = num_experts;
  for (auto& [layer, c] : out.layers) {
    for (std::vector<int64_t>& counts : c.class_counts) counts.resize(static_cast<size_t>(num_experts), 0);
    c.prompt_counts.resize(static_cast<size_t>(num_experts), 0);
    c.generated_counts.resize(static_cast<size_t>(num_experts), 0);
  }
  int64_t unrouted_requests = 0, last_token_routes = 0;
  for (const std::string& req_id : outputs_.order) {
    const Request& r = requests_.at(req_id);
    const int64_t n = r.tokens->size();
    const int64_t prompt = static_cast<int64_t>(r.tokens->prompt_ids.size());
    int64_t routed = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!r.routed[static_cast<size_t>(i)]) continue;
      ++routed;
      ++(i < prompt ? out.prompt_tokens : out.generated_tokens);
    }
    out.routed_requests += routed > 0;
    unrouted_requests += routed == 0;
    // The model consumes every token but the sampled one that ended the request, which is never fed back
    // (RECORDING.md): the last output id after "length"; after "stop" the eos, which output_ids leaves out.
    // After anything else the last output id may have been fed back or not, and is not counted.
    const std::string& reason = r.tokens->finish_reason;
    int64_t consumed = n, consumed_routed = routed;
    if (!r.tokens->output_ids.empty() && reason != "stop") {
      --consumed;
      if (r.routed[static_cast<size_t>(n - 1)]) {
        --consumed_routed;
        last_token_routes += reason == "length";
      }
    }
    out.tokens_without_routes += consumed - consumed_routed;
  }
  if (unrouted_requests)
    out.notes.push_back(fmt::format("{} of the {} requests in {} have no routes", unrouted_requests, out.requests,
                                    outputs_.path.string()));
  if (out.tokens_without_routes)
    out.notes.push_back(
        fmt::format("{} tokens that the model consumed have no routes (the routes cover part of the "
                    "run, or the tokens file is from another run)",
                    out.tokens_without_routes));
  if (last_token_routes)
    out.notes.push_back(
        fmt::format("{} requests that ended by length have routes for their last output token, "
                    "which the model never consumes: is the tokens file from the run that wrote the "
                    "routes?",
                    last_token_routes));
  return out;
}

LayerClassMetrics compute_layer_class_metrics(int layer, const LayerClassCounts& c) {
  LayerClassMetrics m;
  m.layer = layer;
  const size_t num_experts = c.prompt_counts.size();
  std::vector<int64_t> layer_counts(num_experts, 0);
  for (const std::vector<int64_t>& counts : c.class_counts) {
    if (counts.size() != num_experts) fail("layer {}: class counts over different numbers of experts", layer);
    for (size_t e = 0; e < num_experts; ++e) layer_counts[e] += counts[e];
  }
  const int64_t tokens = std::accumulate(c.class_tokens.begin(), c.class_tokens.end(), int64_t{0});
  const int64_t selections = sum_of(layer_counts);
  std::vector<double> shares(num_experts, 0.0);
  for (size_t e = 0; e < num_experts && selections; ++e)
    shares[e] = static_cast<double>(layer_counts[e]) / static_cast<double>(selections);
  m.all = make_row(tokens, layer_counts, shares);

  std::vector<int64_t> class_selections;
  for (size_t k = 0; k < k_num_token_classes; ++k) {
    m.classes[k] = make_row(c.class_tokens[k], c.class_counts[k], m.all.shares);
    class_selections.push_back(m.classes[k].selections);
  }
  m.prompt = make_row(c.prompt_tokens, c.prompt_counts, m.all.shares);
  m.generated = make_row(c.generated_tokens, c.generated_counts, m.all.shares);

  const std::vector<std::vector<int64_t>> joint(c.class_counts.begin(), c.class_counts.end());
  m.mutual_information_bits = mutual_information_bits(joint);
  m.class_entropy_bits = shannon_entropy_bits(class_selections);
  m.normalized_mutual_information = m.class_entropy_bits > 0 ? m.mutual_information_bits / m.class_entropy_bits : 0.0;
  // The plug-in estimate of I is biased upwards: for independent class and expert it averages about
  // (R - 1)(C - 1) / (2 N ln 2) over samples of N selections, R classes and C experts in use (Miller 1955).
  // Only a value well above this says anything about the model.
  const auto used = [](const std::vector<int64_t>& v) {
    return std::count_if(v.begin(), v.end(), [](int64_t x) { return x > 0; });
  };
  const auto classes_used = used(class_selections), experts_used = used(layer_counts);
  if (selections > 0 && classes_used > 1 && experts_used > 1)
    m.mutual_information_chance_bits = static_cast<double>((classes_used - 1) * (experts_used - 1)) /
                                       (2.0 * static_cast<double>(selections) * std::log(2.0));

  // Strongest: the largest lift among the classes with enough tokens, else among all that were routed.
  for (const bool need_tokens : {true, false}) {
    for (size_t k = 0; k < k_num_token_classes; ++k) {
      const ExpertRow& row = m.classes[k];
      if (!row.top || (need_tokens && row.tokens < k_strongest_min_tokens)) continue;
      if (!m.strongest || row.top->lift > m.strongest->top.lift)
        m.strongest = StrongestClass{k_token_classes[k], *row.top};
    }
    if (m.strongest) break;
  }
  m.total_variation = total_variation_distance(c.prompt_counts, c.generated_counts);
  return m;
}

Json to_json(const ExpertRow& row) {
  return {{"tokens", row.tokens},
          {"selections", row.selections},
          {"counts", row.counts},
          {"shares", row.shares},
          {"top_expert", to_json(row.top)}};
}

Json to_json(const LayerClassMetrics& m) {
  Json classes = Json::array();
  for (size_t k = 0; k < k_num_token_classes; ++k) {
    Json row = to_json(m.classes[k]);
    row["class"] = to_string(k_token_classes[k]);
    classes.push_back(std::move(row));
  }
  Json strongest = nullptr;
  if (m.strongest) {
    strongest = to_json(std::optional<TopExpert>(m.strongest->top));
    strongest["class"] = to_string(m.strongest->token_class);
  }
  return {{"layer", m.layer},
          {"tokens", m.all.tokens},
          {"selections", m.all.selections},
          {"counts", m.all.counts},
          {"shares", m.all.shares},
          {"classes", classes},
          {"class_entropy_bits", m.class_entropy_bits},
          {"mutual_information_bits", m.mutual_information_bits},
          {"normalized_mutual_information", m.normalized_mutual_information},
          {"mutual_information_chance_bits", m.mutual_information_chance_bits},
          {"strongest", strongest},
          {"prompt_vs_generated",
           {{"prompt", to_json(m.prompt)},
            {"generated", to_json(m.generated)},
            {"total_variation", m.total_variation ? Json(*m.total_variation) : Json(nullptr)}}}};
}

}  // namespace moescope::analysis
