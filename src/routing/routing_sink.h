#pragma once
// The routing hook: the backend calls a RoutingSink once per forward pass and once per MoE layer with
// the top-k expert ids and weights exactly as the experts use them. The recorder, the route log and
// the per-pass JSONL are sinks; with no sink, or none that wants the pass, the backend does no routing
// work beyond the forward pass itself.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moescope {

enum class ForwardMode { Prefill, Decode, Mixed };

const char* to_string(ForwardMode mode);

// What one forward pass computes. Token t of the pass belongs to sequence token_seq[t] and sits at
// position token_pos[t] of that sequence.
struct PassInfo {
  int64_t forward_pass_id = 0;
  ForwardMode forward_mode = ForwardMode::Prefill;
  int batch_size = 0;                  // sequences in the pass
  int num_tokens = 0;                  // tokens in the pass
  int64_t seq_lens_sum = 0;            // sum over sequences of their length after the pass
  std::vector<std::string> req_ids;    // [batch_size]
  std::vector<int32_t> token_seq;      // [num_tokens] index into req_ids
  std::vector<int32_t> token_pos;      // [num_tokens] position in the sequence (token_idx)
};

// The routing geometry of a model, as the sinks need it (the routing module knows no ModelConfig).
struct RoutingShape {
  std::string model_id;           // for headers and reports
  int num_layers = 0;             // decoder layers
  std::vector<int> moe_layers;    // decoder-layer index of each MoE layer, ascending
  int num_experts = 0;
  int top_k = 0;
  // Position of a decoder layer in moe_layers, or -1 for a dense layer.
  int moe_index(int layer) const;
};

class RoutingSink {
 public:
  virtual ~RoutingSink() = default;
  // Asked once before each pass; false skips the pass (no PassInfo is built, no call follows).
  virtual bool wants_pass() { return true; }
  // Asked after a pass that wants_pass() took: true when per-expert totals of each MoE layer are all the
  // sink needs (on_counts), so a backend that keeps them on the device copies those instead of every
  // token's routes. A backend may still call on_layer (the CPU backend always does): such a sink takes
  // both.
  virtual bool counts_suffice() const { return false; }
  virtual void begin_pass(const PassInfo& pass) { (void)pass; }
  // topk_ids and topk_weights: [num_tokens, top_k], row-major; valid only during the call.
  // Called once per MoE layer of the pass, in layer order.
  virtual void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                        std::span<const float> topk_weights) = 0;
  // Instead of on_layer, when counts_suffice(): counts[e] is how many of the pass's tokens chose expert
  // e in this MoE layer, weight_sums[e] the sum of their routing weights. Once per MoE layer, in order.
  virtual void on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) {
    (void)layer;
    (void)counts;
    (void)weight_sums;
  }
  virtual void end_pass(const PassInfo& pass, double latency_seconds) {
    (void)pass;
    (void)latency_seconds;
  }
};

// Several sinks behind one: each pass goes to the sinks that want it.
class SinkFanout final : public RoutingSink {
 public:
  void add(RoutingSink* sink) { sinks_.push_back(sink); }
  bool empty() const { return sinks_.empty(); }
  bool wants_pass() override;
  bool counts_suffice() const override;  // when it suffices for every sink of the pass
  void begin_pass(const PassInfo& pass) override;
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                std::span<const float> topk_weights) override;
  void on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) override;
  void end_pass(const PassInfo& pass, double latency_seconds) override;

 private:
  std::vector<RoutingSink*> sinks_;
  std::vector<RoutingSink*> active_;  // the sinks that want the current pass
};

}  // namespace moescope
