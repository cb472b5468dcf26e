#pragma once
// Model weights as views into the mapped checkpoint, one struct per layer, shapes checked at load.
// Linear weights are stored as in PyTorch: [out_features, in_features].
#include <filesystem>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"

namespace moescope {

struct MlpWeights {          // SwiGLU: down(silu(gate(x)) * up(x))
  TensorView gate_proj;      // [intermediate, hidden]
  TensorView up_proj;        // [intermediate, hidden]
  TensorView down_proj;      // [hidden, intermediate]
};

struct LayerWeights {
  TensorView input_layernorm;           // [hidden]
  TensorView q_proj;                    // [num_heads * head_dim, hidden]
  TensorView k_proj;                    // [num_kv_heads * head_dim, hidden]
  TensorView v_proj;                    // [num_kv_heads * head_dim, hidden]
  TensorView o_proj;                    // [hidden, num_heads * head_dim]
  TensorView q_bias, k_bias, v_bias;    // [q_size], [kv_size], [kv_size] when attention_bias
  TensorView q_norm, k_norm;            // [head_dim] (PerHead) or [q_size]/[kv_size] (Full)
  TensorView post_attention_layernorm;  // [hidden]

  bool is_moe = false;
  MlpWeights mlp;                       // dense layers
  TensorView router;                    // [num_experts, hidden]  (mlp.gate / block_sparse_moe.gate)
  std::vector<MlpWeights> experts;      // [num_experts], each [moe_intermediate, hidden] / [hidden, moe_intermediate]
  MlpWeights shared_expert;             // [shared_intermediate, hidden] ... when has_shared_expert()
  TensorView shared_expert_gate;        // [1, hidden]
};

struct ModelWeights {
  ModelConfig config;
  WeightStore store;                    // owns the mappings every view points into
  TensorView embed_tokens;              // [vocab, hidden]
  std::vector<LayerWeights> layers;     // [num_hidden_layers]
  TensorView norm;                      // [hidden]
  TensorView lm_head;                   // [vocab, hidden] (embed_tokens when tied)

  // Reads config.json and the safetensors of a model directory; throws Error naming file and tensor.
  static ModelWeights load(const std::filesystem::path& model_dir);
  // Bytes of all weights, and of the weights that one token reads besides its routed experts.
  size_t total_bytes() const;
};

}  // namespace moescope
