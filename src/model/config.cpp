#include "model/config.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "util/error.h"

namespace moescope {
namespace {

// Whether `value` converts to T without loss. nlohmann's get<int>() alone would turn 2.9 into 2, true
// into 1 and 1e10 into garbage, so a bad config would load with the wrong sizes instead of failing.
template <typename T>
bool holds(const Json& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value.is_boolean();
  } else if constexpr (std::is_integral_v<T>) {
    if (value.is_number_unsigned()) return value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    return value.is_number_integer() && value.get<int64_t>() >= std::numeric_limits<T>::min() &&
           value.get<int64_t>() <= std::numeric_limits<T>::max();
  } else if constexpr (std::is_floating_point_v<T>) {
    return value.is_number();
  } else if constexpr (std::is_same_v<T, std::vector<int>>) {
    return value.is_array() && std::all_of(value.begin(), value.end(), [](const Json& v) { return holds<int>(v); });
  } else {
    return true;  // strings: get<T>() checks them
  }
}

// Reads an optional key, trying each spelling in turn (old and new transformers key styles).
template <typename T>
bool read_key(const Json& json, std::initializer_list<const char*> keys, T* out, const std::string& source) {
  for (const char* key : keys) {
    auto it = json.find(key);
    if (it == json.end() || it->is_null()) continue;
    bool ok = holds<T>(*it);
    if (ok) {
      try {
        *out = it->get<T>();
      } catch (const Json::exception&) {
        ok = false;
      }
    }
    if (!ok) fail("{}: key \"{}\" has the wrong type or range ({} {})", source, key, it->type_name(), it->dump());
    return true;
  }
  return false;
}

template <typename T>
T require_key(const Json& json, std::initializer_list<const char*> keys, const std::string& source) {
  T value{};
  if (!read_key(json, keys, &value, source)) fail("{}: missing key \"{}\"", source, *keys.begin());
  return value;
}

std::vector<int> read_int_or_list(const Json& json, const char* key) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return {};
  if (it->is_number_integer()) return {it->get<int>()};
  std::vector<int> out;
  if (it->is_array())
    for (const auto& v : *it)
      if (v.is_number_integer()) out.push_back(v.get<int>());
  return out;
}

}  // namespace

std::string_view to_string(Architecture arch) {
  switch (arch) {
    case Architecture::Qwen2Moe: return "Qwen2MoeForCausalLM";
    case Architecture::Mixtral: return "MixtralForCausalLM";
    case Architecture::Olmoe: return "OlmoeForCausalLM";
    case Architecture::Qwen3Moe: return "Qwen3MoeForCausalLM";
  }
  return "?";
}

int ModelConfig::num_moe_layers() const {
  return static_cast<int>(std::count(layer_is_moe.begin(), layer_is_moe.end(), true));
}

ModelConfig ModelConfig::from_json(const Json& json, const std::string& source) {
  if (!json.is_object()) fail("{}: expected a JSON object", source);
  ModelConfig c;
  const auto architectures = json.value("architectures", Json::array());
  if (!architectures.is_array() || architectures.empty() || !architectures[0].is_string())
    fail("{}: missing \"architectures\"", source);
  c.architecture = architectures[0].get<std::string>();
  if (c.architecture == "Qwen2MoeForCausalLM") c.arch = Architecture::Qwen2Moe;
  else if (c.architecture == "MixtralForCausalLM") c.arch = Architecture::Mixtral;
  else if (c.architecture == "OlmoeForCausalLM") c.arch = Architecture::Olmoe;
  else if (c.architecture == "Qwen3MoeForCausalLM") c.arch = Architecture::Qwen3Moe;
  else
    fail("{}: unknown architecture \"{}\" (supported: Qwen2MoeForCausalLM, MixtralForCausalLM, "
         "OlmoeForCausalLM, Qwen3MoeForCausalLM)", source, c.architecture);
  read_key(json, {"model_type"}, &c.model_type, source);
  read_key(json, {"torch_dtype", "dtype"}, &c.dtype, source);

  c.vocab_size = require_key<int>(json, {"vocab_size"}, source);
  c.hidden_size = require_key<int>(json, {"hidden_size"}, source);
  c.num_hidden_layers = require_key<int>(json, {"num_hidden_layers"}, source);
  c.num_attention_heads = require_key<int>(json, {"num_attention_heads"}, source);
  c.num_key_value_heads = c.num_attention_heads;
  read_key(json, {"num_key_value_heads"}, &c.num_key_value_heads, source);
  if (c.num_attention_heads <= 0 || c.hidden_size <= 0)
    fail("{}: hidden_size and num_attention_heads must be positive", source);
  c.head_dim = c.hidden_size / c.num_attention_heads;
  read_key(json, {"head_dim"}, &c.head_dim, source);
  read_key(json, {"max_position_embeddings"}, &c.max_position_embeddings, source);
  read_key(json, {"rms_norm_eps"}, &c.rms_norm_eps, source);
  read_key(json, {"tie_word_embeddings"}, &c.tie_word_embeddings, source);

  // RoPE: transformers 4.x writes rope_theta (+ rope_scaling); 5.x writes rope_parameters.
  bool have_theta = read_key(json, {"rope_theta"}, &c.rope_theta, source);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = json.find(key);
    if (it == json.end() || it->is_null()) continue;
    if (!it->is_object()) fail("{}: \"{}\" must be an object", source, key);
    if (!have_theta) have_theta = read_key(*it, {"rope_theta"}, &c.rope_theta, source);
    std::string type = "default";
    read_key(*it, {"rope_type", "type"}, &type, source);
    if (type != "default")
      fail("{}: {}.rope_type \"{}\" is not supported (only the default RoPE)", source, key, type);
  }

  const bool qwen = c.arch == Architecture::Qwen2Moe || c.arch == Architecture::Qwen3Moe;
  c.attention_bias = c.arch == Architecture::Qwen2Moe;  // Qwen2-MoE always has q/k/v bias
  read_key(json, {"qkv_bias", "attention_bias"}, &c.attention_bias, source);
  if (c.arch == Architecture::Qwen3Moe) c.qk_norm = QkNorm::PerHead;
  if (c.arch == Architecture::Olmoe) {
    c.qk_norm = QkNorm::Full;
    read_key(json, {"clip_qkv"}, &c.clip_qkv, source);
  }

  c.num_experts = require_key<int>(json, {"num_experts", "num_local_experts"}, source);
  c.num_experts_per_tok = require_key<int>(json, {"num_experts_per_tok"}, source);
  read_key(json, {"intermediate_size"}, &c.intermediate_size, source);
  c.moe_intermediate_size = c.intermediate_size;  // Mixtral and OLMoE experts use intermediate_size
  read_key(json, {"moe_intermediate_size"}, &c.moe_intermediate_size, source);
  if (c.arch == Architecture::Qwen2Moe)
    read_key(json, {"shared_expert_intermediate_size"}, &c.shared_expert_intermediate_size, source);
  // Mixtral always renormalises its top-k weights; the others follow the config (HF default false).
  c.norm_topk_prob = c.arch == Architecture::Mixtral;
  if (c.arch != Architecture::Mixtral) read_key(json, {"norm_topk_prob"}, &c.norm_topk_prob, source);
  if (qwen) {
    read_key(json, {"decoder_sparse_step"}, &c.decoder_sparse_step, source);
    read_key(json, {"mlp_only_layers"}, &c.mlp_only_layers, source);
  }

  auto positive = [&](int value, const char* name) {
    if (value <= 0) fail("{}: {} must be positive (got {})", source, name, value);
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  positive(c.num_key_value_heads, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  positive(c.num_experts, "num_experts");
  positive(c.num_experts_per_tok, "num_experts_per_tok");
  positive(c.moe_intermediate_size, "moe_intermediate_size");
  positive(c.decoder_sparse_step, "decoder_sparse_step");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail("{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", source,
         c.num_attention_heads, c.num_key_value_heads);
  if (c.head_dim % 2 != 0) fail("{}: head_dim must be even for RoPE (got {})", source, c.head_dim);
  if (c.num_experts_per_tok > c.num_experts)
    fail("{}: num_experts_per_tok ({}) exceeds num_experts ({})", source, c.num_experts_per_tok, c.num_experts);

  // HF's rule (Qwen2-MoE, Qwen3-MoE): a layer is sparse unless listed in mlp_only_layers, and only every
  // decoder_sparse_step-th layer is; Mixtral and OLMoE have experts in every layer.
  c.layer_is_moe.assign(c.num_hidden_layers, true);
  if (qwen) {
    for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
      const bool listed = std::find(c.mlp_only_layers.begin(), c.mlp_only_layers.end(), layer) != c.mlp_only_layers.end();
      c.layer_is_moe[layer] = !listed && (layer + 1) % c.decoder_sparse_step == 0;
    }
  }
  if (c.num_moe_layers() < c.num_hidden_layers) positive(c.intermediate_size, "intermediate_size (dense layers)");

  c.eos_token_ids = read_int_or_list(json, "eos_token_id");
  const auto bos = read_int_or_list(json, "bos_token_id");
  if (!bos.empty()) c.bos_token_id = bos[0];
  return c;
}

ModelConfig ModelConfig::from_file(const std::filesystem::path& config_json) {
  return from_json(read_json_file(config_json), config_json.string());
}

}  // namespace moescope
