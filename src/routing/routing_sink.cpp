#include "routing/routing_sink.h"

#include <algorithm>

namespace moescope {

const char* to_string(ForwardMode mode) {
  switch (mode) {
    case ForwardMode::Prefill: return "prefill";
    case ForwardMode::Decode: return "decode";
    case ForwardMode::Mixed: return "mixed";
  }
  return "?";
}

int RoutingShape::moe_index(int layer) const {
  const auto it = std::lower_bound(moe_layers.begin(), moe_layers.end(), layer);
  return it != moe_layers.end() && *it == layer ? static_cast<int>(it - moe_layers.begin()) : -1;
}

bool SinkFanout::wants_pass() {
  active_.clear();
  for (RoutingSink* s : sinks_)
    if (s->wants_pass()) active_.push_back(s);
  return !active_.empty();
}

bool SinkFanout::counts_suffice() const {
  return std::all_of(active_.begin(), active_.end(), [](const RoutingSink* s) { return s->counts_suffice(); });
}

void SinkFanout::on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) {
  for (RoutingSink* s : active_) s->on_counts(layer, counts, weight_sums);
}

void SinkFanout::begin_pass(const PassInfo& pass) {
  for (RoutingSink* s : active_) s->begin_pass(pass);
}

void SinkFanout::on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                          std::span<const float> topk_weights) {
  for (RoutingSink* s : active_) s->on_layer(layer, num_tokens, top_k, topk_ids, topk_weights);
}

void SinkFanout::end_pass(const PassInfo& pass, double latency_seconds) {
  for (RoutingSink* s : active_) s->end_pass(pass, latency_seconds);
}

}  // namespace moescope
