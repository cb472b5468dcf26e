#include "routing/records.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>

namespace moescope {

int PassRecord::total_activated_experts() const {
  return std::accumulate(activated_experts.begin(), activated_experts.end(), 0);
}

double PassRecord::avg_activated_per_layer() const {
  return activated_experts.empty() ? 0.0 : static_cast<double>(total_activated_experts()) / static_cast<double>(activated_experts.size());
}

Json PassRecord::to_json(int num_experts) const {
  const double avg = avg_activated_per_layer();
  return {{"forward_pass_id", forward_pass_id},
          {"rank", rank},
          {"forward_mode", to_string(forward_mode)},
          {"batch_size", batch_size},
          {"num_tokens", num_tokens},
          {"seq_lens_sum", seq_lens_sum},
          {"latency", latency},
          {"activated_experts", activated_experts},
          {"total_activated_experts", total_activated_experts()},
          {"avg_activated_per_layer", avg},
          {"expert_utilization", num_experts > 0 ? avg / num_experts : 0.0},
          {"expert_activation", avg}};
}

Json PassRecord::sample_json(int num_experts) const {
  const double avg = avg_activated_per_layer();
  return {{"forward_pass_id", forward_pass_id},
          {"rank", rank},
          {"total_activated_experts", static_cast<double>(total_activated_experts())},
          {"avg_activated_per_layer", avg},
          {"expert_utilization", num_experts > 0 ? avg / num_experts : 0.0}};
}

void ActivationCounter::begin(int num_moe_layers, int num_experts) {
  activated_.assign(static_cast<size_t>(num_moe_layers), 0);
  if (seen_.size() != static_cast<size_t>(num_experts)) {
    seen_.assign(static_cast<size_t>(num_experts), 0);
    stamp_ = 0;
  }
}

void ActivationCounter::add_counts(int moe_index, std::span<const int64_t> counts) {
  activated_[static_cast<size_t>(moe_index)] =
      static_cast<int>(std::count_if(counts.begin(), counts.end(), [](int64_t n) { return n > 0; }));
}

void ActivationCounter::add(int moe_index, std::span<const int32_t> topk_ids) {
  if (++stamp_ == 0) {  // wrapped: forget every old stamp
    std::fill(seen_.begin(), seen_.end(), 0);
    stamp_ = 1;
  }
  int distinct = 0;
  for (int32_t id : topk_ids) {
    if (seen_[static_cast<size_t>(id)] == stamp_) continue;
    seen_[static_cast<size_t>(id)] = stamp_;
    ++distinct;
  }
  activated_[static_cast<size_t>(moe_index)] = distinct;
}

void PassRoutes::begin(const PassInfo& pass, int k) {
  forward_pass_id = pass.forward_pass_id;
  req_ids = pass.req_ids;
  token_seq = pass.token_seq;
  token_pos = pass.token_pos;
  top_k = k;
  layers.clear();
  ids.clear();
  weights.clear();
  layers.reserve(8);
  ids.reserve(8 * token_pos.size() * static_cast<size_t>(k));  // most passes store a handful of layers
  weights.reserve(ids.capacity());
}

void PassRoutes::add_layer(int layer, std::span<const int32_t> topk_ids, std::span<const float> topk_weights) {
  layers.push_back(layer);
  ids.insert(ids.end(), topk_ids.begin(), topk_ids.end());
  weights.insert(weights.end(), topk_weights.begin(), topk_weights.end());
}

double json_float(float value) {
  if (!std::isfinite(value)) return static_cast<double>(value);
  char buffer[32];
  const auto end = fmt::format_to(buffer, "{}", value);
  return std::strtod(std::string(buffer, end).c_str(), nullptr);
}

std::vector<double> json_floats(std::span<const float> values) {
  std::vector<double> out;
  out.reserve(values.size());
  for (float v : values) out.push_back(json_float(v));
  return out;
}

void append_json_string(std::string& out, const std::string& text) {
  const bool plain = std::all_of(text.begin(), text.end(), [](char c) {
    return static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7f && c != '"' && c != '\\';
  });
  if (plain) {
    out += '"';
    out += text;
    out += '"';
  } else {
    out += Json(text).dump(-1, ' ', false, Json::error_handler_t::replace);
  }
}

void PassRoutes::append_jsonl(std::string& out, int rank) const {
  auto it = std::back_inserter(out);
  const int tokens = num_tokens();
  const size_t layer_stride = static_cast<size_t>(tokens) * top_k;
  for (int t = 0; t < tokens; ++t) {
    for (size_t l = 0; l < layers.size(); ++l) {
      const size_t at = l * layer_stride + static_cast<size_t>(t) * top_k;
      out += "{\"type\":\"route\",";
      if (rank >= 0) fmt::format_to(it, "\"forward_pass_id\":{},\"rank\":{},", forward_pass_id, rank);
      out += "\"req_id\":";
      append_json_string(out, req_ids[static_cast<size_t>(token_seq[static_cast<size_t>(t)])]);
      // Floats print as their shortest round-trip decimal: 0.42, not 0.41999998688697815.
      fmt::format_to(it, ",\"token_idx\":{},\"layer\":{},\"topk_ids\":[{}],\"topk_weights\":[{}]}}\n",
                     token_pos[static_cast<size_t>(t)], layers[l], fmt::join(ids.begin() + at, ids.begin() + at + top_k, ","),
                     fmt::join(weights.begin() + at, weights.begin() + at + top_k, ","));
    }
  }
}

}  // namespace moescope
