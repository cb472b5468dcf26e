#pragma once
// The CPU decoder's building blocks, one function per block, in the order the forward pass runs them.
#include <span>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace moescope::cpu {

// Flattened view of a batch: token t belongs to caches[token_seq[t]] at position token_pos[t].
struct TokenLayout {
  std::vector<int32_t> token_seq;          // [num_tokens]
  std::vector<int32_t> token_pos;          // [num_tokens]
  std::vector<SequenceCache*> caches;      // [num_sequences]
};

// Self-attention with RoPE, GQA, optional q/k/v bias, q/k norm and clip; appends k/v to the caches.
// x: [T, hidden] (already normed), out: [T, hidden].
void attention(float* out, const float* x, const TokenLayout& layout, int layer, const LayerWeights& w,
               const ModelConfig& config, std::span<const float> rope_inv_freq);

// SwiGLU MLP: out = down(silu(gate(x)) * up(x)).  x: [T, hidden], out: [T, hidden].
void mlp(float* out, const float* x, int num_tokens, const MlpWeights& w);

// MoE block: router -> softmax -> top-k (-> renormalise) -> sink -> experts (+ shared expert with its
// sigmoid gate). x: [T, hidden], out: [T, hidden].
void moe(float* out, const float* x, int num_tokens, int layer, const LayerWeights& w, const ModelConfig& config,
         RoutingSink* sink);

// Top-k selection of one token's router probabilities, as torch.topk: largest first, and on equal
// values the lower expert id first. probs: [num_experts]; ids, weights: [top_k].
void select_experts(const float* probs, int num_experts, int top_k, bool norm_topk_prob, int32_t* ids, float* weights);

}  // namespace moescope::cpu
