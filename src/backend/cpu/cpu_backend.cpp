#include "backend/cpu/cpu_backend.h"

#include <chrono>
#include <cmath>

#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"
#include "util/error.h"

namespace moescope::cpu {

CpuBackend::CpuBackend(std::shared_ptr<const ModelWeights> weights) : weights_(std::move(weights)) {
  const ModelConfig& c = weights_->config;
  // As HF's default RoPE: inv_freq[i] = 1 / theta^(2i / head_dim), in f32.
  for (int i = 0; i < c.head_dim / 2; ++i)
    rope_inv_freq_.push_back(1.0f / std::pow(static_cast<float>(c.rope_theta), static_cast<float>(2 * i) / static_cast<float>(c.head_dim)));
}

int CpuBackend::create_cache() {
  const int id = next_cache_id_++;
  SequenceCache& cache = caches_[id];
  cache.k.resize(config().num_hidden_layers);
  cache.v.resize(config().num_hidden_layers);
  return id;
}

void CpuBackend::free_cache(int cache_id) { caches_.erase(cache_id); }

void CpuBackend::forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) {
  const auto started = std::chrono::steady_clock::now();
  const ModelWeights& w = *weights_;
  const ModelConfig& c = w.config;
  const int hidden = c.hidden_size;

  // Flatten the batch: token t of the pass, its sequence and position.
  TokenLayout layout;
  std::vector<int32_t> token_ids;
  std::vector<int> last_token;  // [num_sequences] row of each sequence's last new token
  for (const BatchSequence& seq : batch.sequences) {
    auto it = caches_.find(seq.cache_id);
    if (it == caches_.end()) fail("forward: unknown KV cache {}", seq.cache_id);
    if (it->second.length != seq.start_pos)
      fail("forward: sequence {} starts at {} but its cache holds {} positions", seq.req_id, seq.start_pos, it->second.length);
    if (seq.tokens.empty()) fail("forward: sequence {} has no tokens", seq.req_id);
    if (c.max_position_embeddings > 0 && seq.start_pos + static_cast<int64_t>(seq.tokens.size()) > c.max_position_embeddings)
      fail("forward: sequence {} would reach {} positions; the model allows {}", seq.req_id,
           seq.start_pos + seq.tokens.size(), c.max_position_embeddings);
    const int32_t s = static_cast<int32_t>(layout.caches.size());
    layout.caches.push_back(&it->second);
    for (size_t i = 0; i < seq.tokens.size(); ++i) {
      if (seq.tokens[i] < 0 || seq.tokens[i] >= c.vocab_size)
        fail("forward: token id {} out of range (vocab_size {})", seq.tokens[i], c.vocab_size);
      layout.token_seq.push_back(s);
      layout.token_pos.push_back(seq.start_pos + static_cast<int32_t>(i));
      token_ids.push_back(seq.tokens[i]);
    }
    last_token.push_back(static_cast<int>(token_ids.size()) - 1);
  }
  const int num_tokens = static_cast<int>(token_ids.size());

  PassInfo pass;
  if (sink != nullptr && !sink->wants_pass()) sink = nullptr;  // the one check a pass costs when nothing records
  if (sink != nullptr) {
    pass = make_pass_info(batch);
    sink->begin_pass(pass);
  }

  std::vector<float> x(static_cast<size_t>(num_tokens) * hidden);       // [T, hidden] residual stream
  std::vector<float> h(x.size()), block_out(x.size());                  // [T, hidden]
  const size_t row_bytes = static_cast<size_t>(hidden) * dtype_size(w.embed_tokens.dtype);
  for (int t = 0; t < num_tokens; ++t)  // embeddings
    to_f32(w.embed_tokens.dtype, static_cast<const char*>(w.embed_tokens.data) + token_ids[t] * row_bytes,
           x.data() + static_cast<size_t>(t) * hidden, hidden);

  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    rms_norm(h.data(), x.data(), num_tokens, hidden, lw.input_layernorm, c.rms_norm_eps);           // pre-norm
    attention(block_out.data(), h.data(), layout, l, lw, c, rope_inv_freq_);                         // self-attention
    for (size_t i = 0; i < x.size(); ++i) x[i] += block_out[i];                                      // residual
    rms_norm(h.data(), x.data(), num_tokens, hidden, lw.post_attention_layernorm, c.rms_norm_eps);   // pre-norm
    if (lw.is_moe) moe(block_out.data(), h.data(), num_tokens, l, lw, c, sink);                      // routed experts
    else mlp(block_out.data(), h.data(), num_tokens, lw.mlp);                                        // dense MLP
    for (size_t i = 0; i < x.size(); ++i) x[i] += block_out[i];                                      // residual
  }
  for (size_t s = 0; s < layout.caches.size(); ++s)
    layout.caches[s]->length = batch.sequences[s].start_pos + static_cast<int32_t>(batch.sequences[s].tokens.size());

  // Final norm and LM head for each sequence's last token only.
  const int num_seqs = static_cast<int>(last_token.size());
  std::vector<float> last(static_cast<size_t>(num_seqs) * hidden);
  for (int s = 0; s < num_seqs; ++s)
    std::copy_n(x.data() + static_cast<size_t>(last_token[s]) * hidden, hidden, last.data() + static_cast<size_t>(s) * hidden);
  rms_norm(last.data(), last.data(), num_seqs, hidden, w.norm, c.rms_norm_eps);
  logits.resize(static_cast<size_t>(num_seqs) * c.vocab_size);
  matmul(logits.data(), last.data(), num_seqs, w.lm_head);

  if (sink != nullptr)
    sink->end_pass(pass, std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
}

}  // namespace moescope::cpu
