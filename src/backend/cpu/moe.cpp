#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"

namespace moescope::cpu {

namespace {

// Buffers of one SwiGLU MLP applied to n rows: gate/up [n, intermediate], out [n, hidden].
struct MlpWork {
  const MlpWeights* w;
  const float* x;  // [n, hidden]
  int n;
  std::vector<float> gate, up, out;
};

// Runs several MLPs together: every gate and up product in one parallel region, then every down.
void run_mlps(std::vector<MlpWork>& work) {
  std::vector<MatmulJob> jobs;
  for (MlpWork& m : work) {
    const int64_t inter = m.w->gate_proj.rows();
    m.gate.resize(static_cast<size_t>(m.n) * inter);
    m.up.resize(m.gate.size());
    m.out.resize(static_cast<size_t>(m.n) * m.w->down_proj.rows());
    jobs.push_back({m.gate.data(), m.x, m.n, &m.w->gate_proj, 0, inter, nullptr});
    jobs.push_back({m.up.data(), m.x, m.n, &m.w->up_proj, 0, inter, nullptr});
  }
  matmul_jobs(jobs);
  jobs.clear();
  for (MlpWork& m : work) {
    swiglu(m.gate.data(), m.gate.data(), m.up.data(), static_cast<int64_t>(m.gate.size()));
    jobs.push_back({m.out.data(), m.gate.data(), m.n, &m.w->down_proj, 0, m.w->down_proj.rows(), nullptr});
  }
  matmul_jobs(jobs);
}

}  // namespace

void mlp(float* out, const float* x, int num_tokens, const MlpWeights& w) {
  std::vector<MlpWork> work(1);
  work[0].w = &w;
  work[0].x = x;
  work[0].n = num_tokens;
  run_mlps(work);
  std::copy(work[0].out.begin(), work[0].out.end(), out);
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

  // Every chosen expert (and the shared expert) in one batch of products: gate/up together, then down.
  std::vector<std::vector<float>> gathered(num_experts);  // expert -> [n, hidden] its tokens' inputs
  std::vector<MlpWork> work;
  std::vector<int> work_expert;
  for (int e = 0; e < num_experts; ++e) {
    const auto& tokens = routed[e];
    if (tokens.empty()) continue;
    const int n = static_cast<int>(tokens.size());
    gathered[e].resize(static_cast<size_t>(n) * hidden);
    for (int i = 0; i < n; ++i)
      std::copy_n(x + static_cast<size_t>(tokens[i].first) * hidden, hidden, gathered[e].data() + static_cast<size_t>(i) * hidden);
    work.push_back({&w.experts[e], gathered[e].data(), n, {}, {}, {}});
    work_expert.push_back(e);
  }
  if (c.has_shared_expert()) work.push_back({&w.shared_expert, x, num_tokens, {}, {}, {}});
  run_mlps(work);

  // Weighted un-permute, experts in id order as HF adds them.
  std::fill_n(out, static_cast<size_t>(num_tokens) * hidden, 0.0f);
  for (size_t i = 0; i < work_expert.size(); ++i) {
    const auto& tokens = routed[work_expert[i]];
    for (size_t j = 0; j < tokens.size(); ++j) {
      float* o = out + static_cast<size_t>(tokens[j].first) * hidden;
      const float* y = work[i].out.data() + j * hidden;
      const float weight = tokens[j].second;
      for (int d = 0; d < hidden; ++d) o[d] += weight * y[d];
    }
  }

  if (c.has_shared_expert()) {  // Qwen2-MoE: out += sigmoid(shared_expert_gate(x)) * shared_expert(x)
    const std::vector<float>& ys = work.back().out;
    std::vector<float> gate(num_tokens);  // [T, 1]
    matmul(gate.data(), x, num_tokens, w.shared_expert_gate);
    for (int t = 0; t < num_tokens; ++t) {
      const float g = 1.0f / (1.0f + std::exp(-gate[t]));
      for (int d = 0; d < hidden; ++d) out[static_cast<size_t>(t) * hidden + d] += g * ys[static_cast<size_t>(t) * hidden + d];
    }
  }
}

}  // namespace moescope::cpu
