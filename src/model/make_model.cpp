#include "model/make_model.h"

#include <fmt/format.h>

#include <cmath>

#include "model/checkpoint_writer.h"
#include "model/config.h"
#include "util/error.h"

namespace moescope {
namespace {

struct Preset {
  int hidden, layers, heads, kv_heads, head_dim, experts, top_k, moe_inter, shared_inter, dense_inter, vocab;
};

Preset find_preset(const std::string& preset) {
  if (preset == "tiny") return {64, 4, 4, 2, 16, 8, 2, 64, 128, 128, 512};
  if (preset == "small") return {512, 8, 8, 4, 64, 16, 2, 512, 1024, 1024, 512};
  // The published Qwen1.5-MoE-A2.7B shapes.
  if (preset == "qwen1.5-moe-a2.7b") return {2048, 24, 16, 16, 128, 60, 4, 1408, 5632, 5632, 151936};
  fail("unknown preset \"{}\" (tiny, small, qwen1.5-moe-a2.7b)", preset);
}

// splitmix64: a counter-based generator, so any element can be drawn independently and in parallel.
inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a: a name hash that is the same on every platform (std::hash is not).
inline uint64_t fnv1a(const std::string& text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : text) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Uniform values with mean `mean` and standard deviation `std`, element i of stream `stream`.
auto uniform_fill(uint64_t stream, float mean, float std) {
  const float half_width = std * std::sqrt(3.0f);
  return [=](float* out, int64_t first, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t r = mix(stream ^ mix(static_cast<uint64_t>(first + i)));
      const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      out[i] = mean + (2.0f * u - 1.0f) * half_width;
    }
  };
}

}  // namespace

Json make_model_config(const std::string& arch, const std::string& preset, int vocab_size) {
  const Preset p = find_preset(preset);
  const int vocab = vocab_size > 0 ? vocab_size : p.vocab;
  // The older key style, as the published checkpoints write it (rope_theta, num_experts, torch_dtype).
  Json c = {{"hidden_size", p.hidden},       {"num_hidden_layers", p.layers},  {"num_attention_heads", p.heads},
            {"num_key_value_heads", p.kv_heads}, {"vocab_size", vocab},          {"max_position_embeddings", 4096},
            {"rms_norm_eps", 1e-6},          {"rope_theta", 1000000.0},        {"torch_dtype", "bfloat16"},
            {"tie_word_embeddings", false},  {"num_experts_per_tok", p.top_k}, {"hidden_act", "silu"},
            {"bos_token_id", nullptr},       {"eos_token_id", vocab - 1},      {"initializer_range", 0.02}};
  if (arch == "qwen2_moe") {
    c.update({{"architectures", {"Qwen2MoeForCausalLM"}}, {"model_type", "qwen2_moe"}, {"num_experts", p.experts},
              {"moe_intermediate_size", p.moe_inter}, {"shared_expert_intermediate_size", p.shared_inter},
              {"intermediate_size", p.dense_inter}, {"norm_topk_prob", false}, {"decoder_sparse_step", 1},
              {"mlp_only_layers", Json::array()}});
  } else if (arch == "mixtral") {
    c.update({{"architectures", {"MixtralForCausalLM"}}, {"model_type", "mixtral"}, {"num_local_experts", p.experts},
              {"intermediate_size", p.moe_inter}, {"sliding_window", nullptr}});
  } else if (arch == "olmoe") {
    c.update({{"architectures", {"OlmoeForCausalLM"}}, {"model_type", "olmoe"}, {"num_experts", p.experts},
              {"intermediate_size", p.moe_inter}, {"norm_topk_prob", false}, {"clip_qkv", nullptr}});
  } else if (arch == "qwen3_moe") {
    c.update({{"architectures", {"Qwen3MoeForCausalLM"}}, {"model_type", "qwen3_moe"}, {"num_experts", p.experts},
              {"moe_intermediate_size", p.moe_inter}, {"intermediate_size", p.dense_inter}, {"head_dim", p.head_dim},
              {"norm_topk_prob", true}, {"decoder_sparse_step", 1}, {"mlp_only_layers", Json::array()}});
  } else {
    fail("unknown --arch \"{}\" (qwen2_moe, mixtral, olmoe, qwen3_moe)", arch);
  }
  return c;
}

void write_random_checkpoint(const std::filesystem::path& out_dir, const Json& config_json, uint64_t seed) {
  const ModelConfig c = ModelConfig::from_json(config_json, "generated config");
  std::filesystem::create_directories(out_dir);
  write_text_file(out_dir / "config.json", config_json.dump(2) + "\n");

  std::vector<TensorSpec> tensors;
  const int64_t hidden = c.hidden_size;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    const uint64_t stream = mix(seed ^ mix(fnv1a(name)));
    tensors.push_back({name, std::move(shape), DType::BF16, uniform_fill(stream, mean, std)});
  };
  // Projections scaled by 1/sqrt(fan_in) keep activations of order one through the layers.
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    add(name, {out, in}, 0.0f, 1.0f / std::sqrt(static_cast<float>(in)));
  };
  auto add_mlp = [&](const std::string& p, const char* g, const char* u, const char* d, int64_t inter) {
    linear(p + g + ".weight", inter, hidden);
    linear(p + u + ".weight", inter, hidden);
    linear(p + d + ".weight", hidden, inter);
  };

  add("model.embed_tokens.weight", {c.vocab_size, hidden}, 0.0f, 1.0f);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    add(p + "input_layernorm.weight", {hidden}, 1.0f, 0.05f);
    add(p + "post_attention_layernorm.weight", {hidden}, 1.0f, 0.05f);
    linear(p + "self_attn.q_proj.weight", c.q_size(), hidden);
    linear(p + "self_attn.k_proj.weight", c.kv_size(), hidden);
    linear(p + "self_attn.v_proj.weight", c.kv_size(), hidden);
    linear(p + "self_attn.o_proj.weight", hidden, c.q_size());
    if (c.attention_bias) {
      add(p + "self_attn.q_proj.bias", {c.q_size()}, 0.0f, 0.1f);
      add(p + "self_attn.k_proj.bias", {c.kv_size()}, 0.0f, 0.1f);
      add(p + "self_attn.v_proj.bias", {c.kv_size()}, 0.0f, 0.1f);
    }
    if (c.qk_norm == QkNorm::PerHead) {
      add(p + "self_attn.q_norm.weight", {c.head_dim}, 1.0f, 0.05f);
      add(p + "self_attn.k_norm.weight", {c.head_dim}, 1.0f, 0.05f);
    } else if (c.qk_norm == QkNorm::Full) {
      add(p + "self_attn.q_norm.weight", {c.q_size()}, 1.0f, 0.05f);
      add(p + "self_attn.k_norm.weight", {c.kv_size()}, 1.0f, 0.05f);
    }
    if (!c.layer_is_moe[i]) {
      add_mlp(p + "mlp.", "gate_proj", "up_proj", "down_proj", c.intermediate_size);
      continue;
    }
    const bool mixtral = c.arch == Architecture::Mixtral;
    const std::string moe = p + (mixtral ? "block_sparse_moe." : "mlp.");
    // A wider router spread makes routing decisive rather than a near-tie among all experts.
    add(moe + "gate.weight", {c.num_experts, hidden}, 0.0f, 4.0f / std::sqrt(static_cast<float>(hidden)));
    for (int e = 0; e < c.num_experts; ++e) {
      const std::string ep = fmt::format("{}experts.{}.", moe, e);
      if (mixtral) add_mlp(ep, "w1", "w3", "w2", c.moe_intermediate_size);
      else add_mlp(ep, "gate_proj", "up_proj", "down_proj", c.moe_intermediate_size);
    }
    if (c.has_shared_expert()) {
      add_mlp(moe + "shared_expert.", "gate_proj", "up_proj", "down_proj", c.shared_expert_intermediate_size);
      linear(moe + "shared_expert_gate.weight", 1, hidden);
    }
  }
  add("model.norm.weight", {hidden}, 1.0f, 0.05f);
  if (!c.tie_word_embeddings) linear("lm_head.weight", c.vocab_size, hidden);
  write_safetensors(out_dir / "model.safetensors", tensors);
}

}  // namespace moescope
