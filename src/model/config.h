#pragma once
// ModelConfig: config.json parsed and validated once, then read-only. One generic decoder reads these
// flags; there is no class per model family.
#include <filesystem>
#include <string>
#include <vector>

#include "util/json.h"

namespace moescope {

enum class Architecture { Qwen2Moe, Mixtral, Olmoe, Qwen3Moe };

// Where q/k RMSNorm applies: not at all, per head over head_dim (Qwen3-MoE), or over the whole
// projection before the heads are split (OLMoE).
enum class QkNorm { None, PerHead, Full };

struct ModelConfig {
  Architecture arch = Architecture::Qwen2Moe;
  std::string architecture;  // as in config.json, e.g. "Qwen2MoeForCausalLM"
  std::string model_type;    // e.g. "qwen2_moe"
  std::string dtype;         // "bfloat16", from torch_dtype or dtype ("" when absent)

  int vocab_size = 0;
  int hidden_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  double rope_theta = 10000.0;
  float rms_norm_eps = 1e-6f;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v projections (Qwen2-MoE)
  QkNorm qk_norm = QkNorm::None;
  float clip_qkv = 0.0f;        // OLMoE: clamp q/k/v to [-clip, clip] when > 0

  int intermediate_size = 0;               // dense MLP layers
  int num_experts = 0;                     // routed experts per MoE layer
  int num_experts_per_tok = 0;             // top_k
  int moe_intermediate_size = 0;           // each routed expert
  int shared_expert_intermediate_size = 0; // 0: no shared expert
  bool norm_topk_prob = false;             // renormalise the top-k weights to sum to 1
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;

  std::vector<bool> layer_is_moe;  // [num_hidden_layers], derived
  std::vector<int> eos_token_ids;  // from config.json (generation_config.json may add more)
  int bos_token_id = -1;

  int q_size() const { return num_attention_heads * head_dim; }
  int kv_size() const { return num_key_value_heads * head_dim; }
  int num_moe_layers() const;
  bool has_shared_expert() const { return shared_expert_intermediate_size > 0; }

  // Parses and validates; `source` names the file in errors.
  static ModelConfig from_json(const Json& json, const std::string& source);
  static ModelConfig from_file(const std::filesystem::path& config_json);
};

std::string_view to_string(Architecture arch);

}  // namespace moescope
