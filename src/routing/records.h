#pragma once
// What the sinks record, and how it is written: per-pass figures, one pass's routes, JSONL lines.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "routing/routing_sink.h"
#include "util/json.h"

namespace moescope {

// The figures of one forward pass (per_pass mode, the auto-recorded JSONL). docs/RECORDING.md
// defines each field.
struct PassRecord {
  int64_t forward_pass_id = 0;
  int rank = 0;
  ForwardMode forward_mode = ForwardMode::Prefill;
  int batch_size = 0;                  // sequences in the pass
  int num_tokens = 0;                  // tokens in the pass
  int64_t seq_lens_sum = 0;            // sum of the sequences' lengths after the pass
  double latency = 0.0;                // wall seconds of the forward pass
  std::vector<int> activated_experts;  // [num_moe_layers] distinct experts the pass routed to

  int total_activated_experts() const;
  double avg_activated_per_layer() const;
  // Every field, with expert_utilization = avg_activated_per_layer / num_experts.
  Json to_json(int num_experts) const;
  // The five fields of a summary's sample_record (SPEC §3).
  Json sample_json(int num_experts) const;
};

// Counts, over one pass, the distinct experts each MoE layer routed to.
class ActivationCounter {
 public:
  void begin(int num_moe_layers, int num_experts);
  void add(int moe_index, std::span<const int32_t> topk_ids);
  void add_counts(int moe_index, std::span<const int64_t> counts);  // per-expert counts of one MoE layer
  const std::vector<int>& activated() const { return activated_; }

 private:
  std::vector<uint32_t> seen_;  // [num_experts] the stamp of the last layer that routed to the expert
  uint32_t stamp_ = 0;
  std::vector<int> activated_;  // [num_moe_layers]
};

// One pass's routes for some layers, copied off the engine's buffers so they can be formatted later,
// on a writer thread or at dump time.
struct PassRoutes {
  int64_t forward_pass_id = 0;
  std::vector<std::string> req_ids;  // [batch_size]
  std::vector<int32_t> token_seq;    // [num_tokens] index into req_ids
  std::vector<int32_t> token_pos;    // [num_tokens] token_idx
  int top_k = 0;
  std::vector<int> layers;           // [stored layers] decoder-layer index
  std::vector<int32_t> ids;          // [stored layers, num_tokens, top_k]
  std::vector<float> weights;        // [stored layers, num_tokens, top_k]

  void begin(const PassInfo& pass, int top_k);
  void add_layer(int layer, std::span<const int32_t> topk_ids, std::span<const float> topk_weights);
  int num_tokens() const { return static_cast<int>(token_pos.size()); }
  int64_t num_records() const { return static_cast<int64_t>(layers.size()) * num_tokens(); }
  // One line per (token, stored layer), token-major. With a rank, each line also carries
  // forward_pass_id and rank (the per_token record); without, it is the routing log's route line.
  void append_jsonl(std::string& out, int rank = -1) const;
};

// A float as the double that prints as its shortest round-trip decimal (0.42, not 0.41999998688697815),
// for JSON built with nlohmann::json.
double json_float(float value);
std::vector<double> json_floats(std::span<const float> values);

// A JSON string literal (quotes and escapes included).
void append_json_string(std::string& out, const std::string& text);

}  // namespace moescope
