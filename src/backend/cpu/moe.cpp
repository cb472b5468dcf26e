#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"

namespace moescope::cpu {

void mlp(float* out, const float* x, int num_tokens, const MlpWeights& w) {
  const int64_t inter = w.gate_proj.rows();
  std::vector<float> gate(static_cast<size_t>(num_tokens) * inter), up(gate.size());  // [T, intermediate]
  matmul(gate.data(), x, num_tokens, w.gate_proj);
  matmul(up.data(), x, num_tokens, w.up_proj);
  swiglu(gate.data(), gate.data(), up.data(), static_cast<int64_t>(gate.size()));
  matmul(out, gate.data(), num_tokens, w.down_proj);
}

void select_experts(const float* probs, int num_experts, int top_k, bool norm_topk_prob, int32_t* ids, float* weights) {
  // Partial selection sort: top_k is small (2-8) and this keeps torch.topk's order for ties.
  std::vector<int32_t> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  });
  float sum = 0.0f;
  for (int i = 0; i < top_k; ++i) {
    ids[i] = order[i];
    weights[i] = probs[order[i]];
    sum += weights[i];
  }
  if (norm_topk_prob)
    for (int i = 0; i < top_k; ++i) weights[i] /= sum;
}

void moe(float* out, const float* x, int num_tokens, int layer, const LayerWeights& w, const ModelConfig& c,
         RoutingSink* sink) {
  const int hidden = c.hidden_size, num_experts = c.num_experts, top_k = c.num_experts_per_tok;

  // Router: logits -> softmax in f32 -> top-k (-> renormalise), as HF computes it.
  std::vector<float> probs(static_cast<size_t>(num_tokens) * num_experts);  // [T, num_experts]
  matmul(probs.data(), x, num_tokens, w.router);
  std::vector<int32_t> topk_ids(static_cast<size_t>(num_tokens) * top_k);   // [T, top_k]
  std::vector<float> topk_weights(topk_ids.size());                         // [T, top_k]
  for (int t = 0; t < num_tokens; ++t) {
    float* p = &probs[static_cast<size_t>(t) * num_experts];
    softmax(p, num_experts);
    select_experts(p, num_experts, top_k, c.norm_topk_prob, &topk_ids[static_cast<size_t>(t) * top_k],
                   &topk_weights[static_cast<size_t>(t) * top_k]);
  }

  // The routing hook: exactly the ids and weights the experts below use.
  if (sink != nullptr) sink->on_layer(layer, num_tokens, top_k, topk_ids, topk_weights);

  // Group tokens by expert so each selected expert's weights are read once per pass; an expert no
  // token chose is never touched (a single-token decode reads top_k experts only).
  std::vector<std::vector<std::pair<int, float>>> routed(num_experts);  // expert -> (token, weight)
  for (int t = 0; t < num_tokens; ++t)
    for (int j = 0; j < top_k; ++j)
      routed[topk_ids[static_cast<size_t>(t) * top_k + j]].emplace_back(t, topk_weights[static_cast<size_t>(t) * top_k + j]);

  std::fill_n(out, static_cast<size_t>(num_tokens) * hidden, 0.0f);
  std::vector<float> xs, ys;
  for (int e = 0; e < num_experts; ++e) {
    const auto& tokens = routed[e];
    if (tokens.empty()) continue;
    const int n = static_cast<int>(tokens.size());
    xs.resize(static_cast<size_t>(n) * hidden);  // [n, hidden] gathered inputs
    ys.resize(xs.size());                        // [n, hidden] expert outputs
    for (int i = 0; i < n; ++i)
      std::copy_n(x + static_cast<size_t>(tokens[i].first) * hidden, hidden, xs.data() + static_cast<size_t>(i) * hidden);
    mlp(ys.data(), xs.data(), n, w.experts[e]);
    for (int i = 0; i < n; ++i) {  // weighted un-permute
      float* o = out + static_cast<size_t>(tokens[i].first) * hidden;
      const float* y = ys.data() + static_cast<size_t>(i) * hidden;
      const float weight = tokens[i].second;
      for (int d = 0; d < hidden; ++d) o[d] += weight * y[d];
    }
  }

  if (c.has_shared_expert()) {  // Qwen2-MoE: out += sigmoid(shared_expert_gate(x)) * shared_expert(x)
    ys.resize(static_cast<size_t>(num_tokens) * hidden);
    mlp(ys.data(), x, num_tokens, w.shared_expert);
    std::vector<float> gate(num_tokens);  // [T, 1]
    matmul(gate.data(), x, num_tokens, w.shared_expert_gate);
    for (int t = 0; t < num_tokens; ++t) {
      const float g = 1.0f / (1.0f + std::exp(-gate[t]));
      for (int d = 0; d < hidden; ++d) out[static_cast<size_t>(t) * hidden + d] += g * ys[static_cast<size_t>(t) * hidden + d];
    }
  }
}

}  // namespace moescope::cpu
