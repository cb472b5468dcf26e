#pragma once
// The routing hook: the backend calls a RoutingSink once per forward pass and once per MoE layer with
// the top-k expert ids and weights exactly as the experts use them. The recorder and the route log are
// sinks; with no sink the backend does no routing work beyond the forward pass itself.
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

class RoutingSink {
 public:
  virtual ~RoutingSink() = default;
  virtual void begin_pass(const PassInfo& pass) { (void)pass; }
  // topk_ids and topk_weights: [num_tokens, top_k], row-major; valid only during the call.
  virtual void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                        std::span<const float> topk_weights) = 0;
  virtual void end_pass(const PassInfo& pass, double latency_seconds) {
    (void)pass;
    (void)latency_seconds;
  }
};

}  // namespace moescope
