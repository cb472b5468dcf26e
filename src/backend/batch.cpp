#include "backend/backend.h"

#include <algorithm>

namespace moescope {

int Batch::num_tokens() const {
  int n = 0;
  for (const auto& s : sequences) n += static_cast<int>(s.tokens.size());
  return n;
}

void Backend::forward_greedy(const Batch& batch, RoutingSink* sink, std::vector<int32_t>& tokens) {
  std::vector<float> logits;
  forward(batch, sink, logits);
  const size_t vocab = static_cast<size_t>(config().vocab_size);
  tokens.resize(batch.sequences.size());
  for (size_t s = 0; s < tokens.size(); ++s) {
    const float* row = logits.data() + s * vocab;
    tokens[s] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  }
}

PassInfo make_pass_info(const Batch& batch) {
  PassInfo info;
  info.forward_pass_id = batch.forward_pass_id;
  info.batch_size = static_cast<int>(batch.sequences.size());
  bool any_prefill = false, any_decode = false;
  for (size_t s = 0; s < batch.sequences.size(); ++s) {
    const BatchSequence& seq = batch.sequences[s];
    info.req_ids.push_back(seq.req_id);
    // A decode is one new token after a non-empty cache; anything else computes a prompt chunk.
    const bool decode = seq.tokens.size() == 1 && seq.start_pos > 0;
    (decode ? any_decode : any_prefill) = true;
    for (size_t i = 0; i < seq.tokens.size(); ++i) {
      info.token_seq.push_back(static_cast<int32_t>(s));
      info.token_pos.push_back(seq.start_pos + static_cast<int32_t>(i));
    }
    info.seq_lens_sum += seq.start_pos + static_cast<int64_t>(seq.tokens.size());
  }
  info.num_tokens = static_cast<int>(info.token_seq.size());
  info.forward_mode = any_prefill && any_decode ? ForwardMode::Mixed : any_decode ? ForwardMode::Decode : ForwardMode::Prefill;
  return info;
}

}  // namespace moescope
