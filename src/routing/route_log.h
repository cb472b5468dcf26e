#pragma once
// Sinks that write JSONL as the engine runs:
// - RouteLog, the flag-gated routing log (SPEC §5): MOESCOPE_LOG_MOE=path turns it on for the process,
//   MOESCOPE_LOG_MOE_LAYER picks layers ("0", the default; "0,5,23"; "all"); VLLM_LOG_MOE and
//   VLLM_LOG_MOE_LAYER are aliases. A meta header, then one route line per token and logged layer.
// - PassLog, auto-recording (--expert-distribution-jsonl): one per_pass record per forward pass.
// Both copy what they need on the engine thread and leave the formatting to their writer thread.
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "routing/jsonl_writer.h"
#include "routing/records.h"
#include "routing/routing_sink.h"

namespace moescope {

struct RouteLogConfig {
  std::filesystem::path path;
  std::string layers = "0";  // as given: "0", "0,5,23" or "all"
};

// Reads the environment; nullopt when the log is off (variable unset or empty). The MOESCOPE_*
// variables win over their VLLM_* aliases.
std::optional<RouteLogConfig> route_log_config_from_env();

// "all", or a comma-separated list of decoder-layer indices, each an MoE layer of the model; sorted,
// without repeats. Throws Error naming the bad entry.
std::vector<int> parse_layer_selection(const std::string& text, const RoutingShape& shape);

// The meta header line of a route file: the model's routing shape and the layers that follow.
Json route_log_meta(const RoutingShape& shape, const std::vector<int>& layers);

class RouteLog final : public RoutingSink {
 public:
  // Opens the file (replacing it) and writes the meta header; throws Error on a bad path or layer list.
  RouteLog(const RouteLogConfig& config, const RoutingShape& shape, size_t queue_capacity = 256);
  const std::vector<int>& layers() const { return layers_; }
  JsonlWriter& writer() { return *writer_; }

  bool wants_pass() override { return !writer_->failed(); }
  void begin_pass(const PassInfo& pass) override;
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                std::span<const float> topk_weights) override;
  void end_pass(const PassInfo& pass, double latency_seconds) override;

 private:
  RoutingShape shape_;
  std::vector<int> layers_;
  std::vector<bool> logged_;  // [num_layers] whether a decoder layer is logged
  std::unique_ptr<JsonlWriter> writer_;
  PassRoutes pass_;
};

class PassLog final : public RoutingSink {
 public:
  // Opens the file for appending; throws Error naming it when it cannot be written.
  PassLog(const std::filesystem::path& path, const RoutingShape& shape, int rank = 0, size_t queue_capacity = 256);
  JsonlWriter& writer() { return *writer_; }

  bool wants_pass() override { return !writer_->failed(); }
  bool counts_suffice() const override { return true; }  // it writes per-layer activated experts only
  void begin_pass(const PassInfo& pass) override;
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                std::span<const float> topk_weights) override;
  void on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) override;
  void end_pass(const PassInfo& pass, double latency_seconds) override;

 private:
  RoutingShape shape_;
  int rank_;
  std::unique_ptr<JsonlWriter> writer_;
  ActivationCounter activation_;
};

}  // namespace moescope
