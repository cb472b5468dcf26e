#include "model/weights.h"

#include <fmt/format.h>

#include "util/error.h"

namespace moescope {

ModelWeights ModelWeights::load(const std::filesystem::path& model_dir) {
  if (!std::filesystem::is_directory(model_dir)) fail("{}: model directory does not exist", model_dir.string());
  const auto config_path = model_dir / "config.json";
  if (!std::filesystem::exists(config_path)) fail("{}: missing config.json", model_dir.string());
  ModelWeights w{ModelConfig::from_file(config_path), WeightStore::open(model_dir), {}, {}, {}, {}};
  const ModelConfig& c = w.config;
  const WeightStore& s = w.store;
  const int64_t hidden = c.hidden_size, q = c.q_size(), kv = c.kv_size();

  w.embed_tokens = s.get("model.embed_tokens.weight", {c.vocab_size, hidden});
  w.norm = s.get("model.norm.weight", {hidden});
  if (c.tie_word_embeddings && !s.contains("lm_head.weight")) w.lm_head = w.embed_tokens;
  else w.lm_head = s.get("lm_head.weight", {c.vocab_size, hidden});

  auto mlp = [&](const std::string& prefix, const char* gate, const char* up, const char* down, int64_t inter) {
    return MlpWeights{s.get(prefix + gate + ".weight", {inter, hidden}), s.get(prefix + up + ".weight", {inter, hidden}),
                      s.get(prefix + down + ".weight", {hidden, inter})};
  };

  w.layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const std::string p = fmt::format("model.layers.{}.", i);
    l.input_layernorm = s.get(p + "input_layernorm.weight", {hidden});
    l.post_attention_layernorm = s.get(p + "post_attention_layernorm.weight", {hidden});
    l.q_proj = s.get(p + "self_attn.q_proj.weight", {q, hidden});
    l.k_proj = s.get(p + "self_attn.k_proj.weight", {kv, hidden});
    l.v_proj = s.get(p + "self_attn.v_proj.weight", {kv, hidden});
    l.o_proj = s.get(p + "self_attn.o_proj.weight", {hidden, q});
    if (c.attention_bias) {
      l.q_bias = s.get(p + "self_attn.q_proj.bias", {q});
      l.k_bias = s.get(p + "self_attn.k_proj.bias", {kv});
      l.v_bias = s.get(p + "self_attn.v_proj.bias", {kv});
    }
    if (c.qk_norm == QkNorm::PerHead) {
      l.q_norm = s.get(p + "self_attn.q_norm.weight", {c.head_dim});
      l.k_norm = s.get(p + "self_attn.k_norm.weight", {c.head_dim});
    } else if (c.qk_norm == QkNorm::Full) {
      l.q_norm = s.get(p + "self_attn.q_norm.weight", {q});
      l.k_norm = s.get(p + "self_attn.k_norm.weight", {kv});
    }

    l.is_moe = c.layer_is_moe[i];
    if (!l.is_moe) {
      l.mlp = mlp(p + "mlp.", "gate_proj", "up_proj", "down_proj", c.intermediate_size);
      continue;
    }
    // Mixtral names its block block_sparse_moe with w1 (gate), w3 (up), w2 (down).
    const bool mixtral = c.arch == Architecture::Mixtral;
    const std::string moe = p + (mixtral ? "block_sparse_moe." : "mlp.");
    l.router = s.get(moe + "gate.weight", {c.num_experts, hidden});
    l.experts.reserve(c.num_experts);
    for (int e = 0; e < c.num_experts; ++e) {
      const std::string ep = fmt::format("{}experts.{}.", moe, e);
      l.experts.push_back(mixtral ? mlp(ep, "w1", "w3", "w2", c.moe_intermediate_size)
                                  : mlp(ep, "gate_proj", "up_proj", "down_proj", c.moe_intermediate_size));
    }
    if (c.has_shared_expert()) {
      l.shared_expert = mlp(moe + "shared_expert.", "gate_proj", "up_proj", "down_proj", c.shared_expert_intermediate_size);
      l.shared_expert_gate = s.get(moe + "shared_expert_gate.weight", {1, hidden});
    }
  }
  return w;
}

size_t ModelWeights::total_bytes() const {
  size_t n = 0;
  for (const auto& [name, t] : store.tensors()) n += t.nbytes();
  return n;
}

}  // namespace moescope
