#include "routing/route_log.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>

#include "util/error.h"

namespace moescope {
namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

struct RoutesBlock final : JsonlWriter::Block {
  explicit RoutesBlock(PassRoutes r) : routes(std::move(r)) {}
  void append_lines(std::string& out) const override { routes.append_jsonl(out); }
  PassRoutes routes;
};

struct RecordBlock final : JsonlWriter::Block {
  RecordBlock(PassRecord r, int e) : record(std::move(r)), num_experts(e) {}
  void append_lines(std::string& out) const override {
    out += record.to_json(num_experts).dump();
    out += '\n';
  }
  PassRecord record;
  int num_experts;
};

}  // namespace

std::optional<RouteLogConfig> route_log_config_from_env() {
  auto path = env("MOESCOPE_LOG_MOE");
  auto layers = env("MOESCOPE_LOG_MOE_LAYER");
  if (!path) path = env("VLLM_LOG_MOE");
  if (!layers) layers = env("VLLM_LOG_MOE_LAYER");
  if (!path) {
    if (layers) fail("MOESCOPE_LOG_MOE_LAYER is set but MOESCOPE_LOG_MOE (the log file) is not");
    return std::nullopt;
  }
  return RouteLogConfig{*path, layers.value_or("0")};
}

std::vector<int> parse_layer_selection(const std::string& text, const RoutingShape& shape) {
  if (text == "all") return shape.moe_layers;
  std::vector<int> layers;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(begin, end - begin);
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    int layer = -1;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), layer);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size())
      fail("routing log layers \"{}\": \"{}\" is not a layer index (give e.g. 0, 0,5,23 or all)", text, item);
    if (layer < 0 || layer >= shape.num_layers)
      fail("routing log layers \"{}\": layer {} is out of range (the model has {} layers)", text, layer, shape.num_layers);
    if (shape.moe_index(layer) < 0)
      fail("routing log layers \"{}\": layer {} is a dense layer (MoE layers: {})", text, layer, fmt::join(shape.moe_layers, ","));
    layers.push_back(layer);
    begin = end + 1;
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  return layers;
}

RouteLog::RouteLog(const RouteLogConfig& config, const RoutingShape& shape, size_t queue_capacity)
    : shape_(shape), layers_(parse_layer_selection(config.layers, shape)), logged_(static_cast<size_t>(shape.num_layers), false) {
  for (int l : layers_) logged_[static_cast<size_t>(l)] = true;
  writer_ = std::make_unique<JsonlWriter>(config.path, /*append=*/false, queue_capacity);
  writer_->push_line(route_log_meta(shape, layers_).dump());
}

Json route_log_meta(const RoutingShape& shape, const std::vector<int>& layers) {
  return {{"type", "meta"},
          {"model_id", shape.model_id},
          {"moescope_version", MOESCOPE_VERSION},
          {"num_layers", shape.num_layers},
          {"num_experts", shape.num_experts},
          {"top_k", shape.top_k},
          {"moe_layers", shape.moe_layers},
          {"layers", layers}};
}

void RouteLog::begin_pass(const PassInfo& pass) { pass_.begin(pass, shape_.top_k); }

void RouteLog::on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                        std::span<const float> topk_weights) {
  if (layer < 0 || layer >= shape_.num_layers || !logged_[static_cast<size_t>(layer)]) return;
  const size_t n = static_cast<size_t>(num_tokens) * top_k;
  pass_.add_layer(layer, topk_ids.first(n), topk_weights.first(n));
}

void RouteLog::end_pass(const PassInfo&, double) {
  if (!pass_.layers.empty()) writer_->push(std::make_unique<RoutesBlock>(std::move(pass_)));
  pass_ = PassRoutes{};
}

PassLog::PassLog(const std::filesystem::path& path, const RoutingShape& shape, int rank, size_t queue_capacity)
    : shape_(shape), rank_(rank), writer_(std::make_unique<JsonlWriter>(path, /*append=*/true, queue_capacity)) {}

void PassLog::begin_pass(const PassInfo&) { activation_.begin(static_cast<int>(shape_.moe_layers.size()), shape_.num_experts); }

void PassLog::on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids, std::span<const float>) {
  const int m = shape_.moe_index(layer);
  if (m >= 0) activation_.add(m, topk_ids.first(static_cast<size_t>(num_tokens) * top_k));
}

void PassLog::on_counts(int layer, std::span<const int64_t> counts, std::span<const double>) {
  const int m = shape_.moe_index(layer);
  if (m >= 0) activation_.add_counts(m, counts);
}

void PassLog::end_pass(const PassInfo& pass, double latency_seconds) {
  PassRecord record{pass.forward_pass_id, rank_, pass.forward_mode, pass.batch_size, pass.num_tokens,
                    pass.seq_lens_sum, latency_seconds, activation_.activated()};
  writer_->push(std::make_unique<RecordBlock>(std::move(record), shape_.num_experts));
}

}  // namespace moescope
