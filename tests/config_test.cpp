// ModelConfig::from_json / from_file: the published configs in both key styles, each family's
// defaults, and errors that name the file and the key.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

// Qwen/Qwen1.5-MoE-A2.7B config.json as published (transformers 4.x key style).
constexpr const char* k_qwen15_moe_config = R"json({
  "architectures": ["Qwen2MoeForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 8192,
  "max_window_layers": 21,
  "model_type": "qwen2_moe",
  "moe_intermediate_size": 1408,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts": 60,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 24,
  "num_key_value_heads": 16,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "shared_expert_intermediate_size": 5632,
  "sliding_window": 32768,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})json";

// The same model as transformers 5 writes it: rope_parameters instead of rope_theta, dtype instead of
// torch_dtype.
constexpr const char* k_qwen15_moe_config_v5 = R"json({
  "architectures": ["Qwen2MoeForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "dtype": "bfloat16",
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 8192,
  "max_window_layers": 21,
  "mlp_only_layers": [],
  "model_type": "qwen2_moe",
  "moe_intermediate_size": 1408,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts": 60,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 24,
  "num_key_value_heads": 16,
  "output_router_logits": false,
  "qkv_bias": true,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "router_aux_loss_coef": 0.001,
  "shared_expert_intermediate_size": 5632,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})json";

// A small Mixtral-style config (num_local_experts, no norm_topk_prob key).
constexpr const char* k_mixtral_config = R"json({
  "architectures": ["MixtralForCausalLM"],
  "model_type": "mixtral",
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 3,
  "num_attention_heads": 8,
  "num_key_value_heads": 2,
  "num_local_experts": 8,
  "num_experts_per_tok": 2,
  "vocab_size": 1000,
  "rope_theta": 1000000.0,
  "rms_norm_eps": 1e-05,
  "sliding_window": null,
  "torch_dtype": "bfloat16",
  "bos_token_id": 1,
  "eos_token_id": 2
})json";

constexpr const char* k_olmoe_config = R"json({
  "architectures": ["OlmoeForCausalLM"],
  "model_type": "olmoe",
  "hidden_size": 2048,
  "intermediate_size": 1024,
  "num_hidden_layers": 16,
  "num_attention_heads": 16,
  "num_key_value_heads": 16,
  "num_experts": 64,
  "num_experts_per_tok": 8,
  "vocab_size": 50304,
  "rope_theta": 10000.0,
  "rms_norm_eps": 1e-05,
  "clip_qkv": 8.0,
  "torch_dtype": "float32",
  "eos_token_id": 50279,
  "bos_token_id": null
})json";

// Qwen3-MoE with head_dim 128 while hidden / heads = 64, a dense layer forced by mlp_only_layers and
// only every second layer sparse.
constexpr const char* k_qwen3_moe_config = R"json({
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe",
  "hidden_size": 1024,
  "head_dim": 128,
  "intermediate_size": 3072,
  "moe_intermediate_size": 768,
  "num_hidden_layers": 8,
  "num_attention_heads": 16,
  "num_key_value_heads": 4,
  "num_experts": 32,
  "num_experts_per_tok": 4,
  "norm_topk_prob": true,
  "decoder_sparse_step": 2,
  "mlp_only_layers": [0, 3],
  "vocab_size": 151936,
  "rope_theta": 1000000.0,
  "dtype": "bfloat16",
  "eos_token_id": [151645, 151643]
})json";

ModelConfig parse(const char* text, const std::string& source = "test/config.json") {
  return ModelConfig::from_json(Json::parse(text), source);
}

// Parses `json` expecting an Error whose message contains every one of `needles`.
void expect_error(const Json& json, std::initializer_list<std::string> needles,
                  const std::string& source = "models/bad/config.json") {
  try {
    (void)ModelConfig::from_json(json, source);
    ADD_FAILURE() << "expected moescope::Error for " << json.dump();
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& needle : needles)
      EXPECT_NE(message.find(needle), std::string::npos) << "\"" << message << "\" does not mention \"" << needle << "\"";
  }
}

Json qwen15_json() { return Json::parse(k_qwen15_moe_config); }

void expect_qwen15_moe(const ModelConfig& c) {
  EXPECT_EQ(c.arch, Architecture::Qwen2Moe);
  EXPECT_EQ(c.architecture, "Qwen2MoeForCausalLM");
  EXPECT_EQ(c.model_type, "qwen2_moe");
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.num_attention_heads, 16);
  EXPECT_EQ(c.num_key_value_heads, 16);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_size(), 2048);
  EXPECT_EQ(c.kv_size(), 2048);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000000.0);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
  EXPECT_EQ(c.clip_qkv, 0.0f);
  EXPECT_EQ(c.intermediate_size, 5632);
  EXPECT_EQ(c.num_experts, 60);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.moe_intermediate_size, 1408);
  EXPECT_EQ(c.shared_expert_intermediate_size, 5632);
  EXPECT_TRUE(c.has_shared_expert());
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_EQ(c.layer_is_moe, std::vector<bool>(24, true));
  EXPECT_EQ(c.num_moe_layers(), 24);
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{151643});
  EXPECT_EQ(c.bos_token_id, 151643);
}

TEST(ModelConfig, ParsesPublishedQwen15MoeConfig) {
  expect_qwen15_moe(parse(k_qwen15_moe_config));
}

TEST(ModelConfig, Transformers5KeyStyleParsesToTheSameValues) {
  const ModelConfig v5 = parse(k_qwen15_moe_config_v5);
  expect_qwen15_moe(v5);
  const ModelConfig v4 = parse(k_qwen15_moe_config);
  EXPECT_EQ(v5.rope_theta, v4.rope_theta);
  EXPECT_EQ(v5.dtype, v4.dtype);
  EXPECT_EQ(v5.layer_is_moe, v4.layer_is_moe);
}

TEST(ModelConfig, TopLevelRopeThetaWinsOverRopeParameters) {
  Json j = qwen15_json();
  j["rope_parameters"] = {{"rope_theta", 5.0}, {"rope_type", "default"}};
  EXPECT_DOUBLE_EQ(ModelConfig::from_json(j, "c.json").rope_theta, 1000000.0);
}

TEST(ModelConfig, FromFileReadsAndNamesTheFile) {
  const auto dir = std::filesystem::temp_directory_path() / ("moescope_config_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  write_text_file(dir / "config.json", k_qwen15_moe_config);
  expect_qwen15_moe(ModelConfig::from_file(dir / "config.json"));

  Json bad = qwen15_json();
  bad.erase("num_experts");
  write_text_file(dir / "config.json", bad.dump());
  try {
    (void)ModelConfig::from_file(dir / "config.json");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find((dir / "config.json").string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("num_experts"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)ModelConfig::from_file(dir / "absent.json"), Error);
  std::filesystem::remove_all(dir);
}

TEST(ModelConfig, MixtralUsesLocalExpertsAndAlwaysRenormalises) {
  const ModelConfig c = parse(k_mixtral_config);
  EXPECT_EQ(c.arch, Architecture::Mixtral);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.kv_size(), 64);
  EXPECT_EQ(c.moe_intermediate_size, 512);  // Mixtral experts use intermediate_size
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
  EXPECT_EQ(c.layer_is_moe, std::vector<bool>(3, true));
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{2});
  EXPECT_EQ(c.bos_token_id, 1);

  // norm_topk_prob is not a Mixtral key: a stray false does not turn renormalisation off.
  Json j = Json::parse(k_mixtral_config);
  j["norm_topk_prob"] = false;
  j["shared_expert_intermediate_size"] = 1024;  // ignored outside Qwen2-MoE
  j["decoder_sparse_step"] = 2;                 // ignored outside the Qwen families
  const ModelConfig c2 = ModelConfig::from_json(j, "mixtral.json");
  EXPECT_TRUE(c2.norm_topk_prob);
  EXPECT_FALSE(c2.has_shared_expert());
  EXPECT_EQ(c2.layer_is_moe, std::vector<bool>(3, true));
}

TEST(ModelConfig, OlmoeHasFullQkNormAndReadsClipQkv) {
  const ModelConfig c = parse(k_olmoe_config);
  EXPECT_EQ(c.arch, Architecture::Olmoe);
  EXPECT_EQ(c.qk_norm, QkNorm::Full);
  EXPECT_FLOAT_EQ(c.clip_qkv, 8.0f);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_EQ(c.num_experts, 64);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_intermediate_size, 1024);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.dtype, "float32");
  EXPECT_EQ(c.layer_is_moe, std::vector<bool>(16, true));
  EXPECT_EQ(c.bos_token_id, -1);

  Json j = Json::parse(k_olmoe_config);
  j["norm_topk_prob"] = true;
  j["clip_qkv"] = nullptr;
  const ModelConfig c2 = ModelConfig::from_json(j, "olmoe.json");
  EXPECT_TRUE(c2.norm_topk_prob);
  EXPECT_EQ(c2.clip_qkv, 0.0f);
}

TEST(ModelConfig, Qwen3MoeHeadDimQkNormAndSparseLayers) {
  const ModelConfig c = parse(k_qwen3_moe_config);
  EXPECT_EQ(c.arch, Architecture::Qwen3Moe);
  EXPECT_EQ(c.head_dim, 128);  // explicit, not 1024 / 16
  EXPECT_EQ(c.q_size(), 16 * 128);
  EXPECT_EQ(c.kv_size(), 4 * 128);
  EXPECT_EQ(c.qk_norm, QkNorm::PerHead);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.has_shared_expert());
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 2);
  EXPECT_EQ(c.mlp_only_layers, (std::vector<int>{0, 3}));
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int>{151645, 151643}));
  // HF: layer i is sparse iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
  std::vector<bool> expected(8);
  for (int i = 0; i < 8; ++i) expected[i] = i != 0 && i != 3 && (i + 1) % 2 == 0;
  EXPECT_EQ(expected, (std::vector<bool>{false, true, false, false, false, true, false, true}));
  EXPECT_EQ(c.layer_is_moe, expected);
  EXPECT_EQ(c.num_moe_layers(), 3);
}

TEST(ModelConfig, DenseLayersNeedIntermediateSize) {
  Json j = Json::parse(k_qwen3_moe_config);
  j.erase("intermediate_size");
  expect_error(j, {"models/bad/config.json", "intermediate_size"});
  j["mlp_only_layers"] = Json::array();
  j["decoder_sparse_step"] = 1;  // every layer sparse: no dense MLP to size
  EXPECT_EQ(ModelConfig::from_json(j, "c.json").num_moe_layers(), 8);
}

TEST(ModelConfigErrors, UnknownArchitectureNamesItAndListsSupported) {
  Json j = qwen15_json();
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  expect_error(j, {"models/bad/config.json", "DeepseekV3ForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                   "OlmoeForCausalLM", "Qwen3MoeForCausalLM"});
}

TEST(ModelConfigErrors, MissingArchitectures) {
  Json j = qwen15_json();
  j.erase("architectures");
  expect_error(j, {"models/bad/config.json", "architectures"});
}

TEST(ModelConfigErrors, MissingNumExperts) {
  Json j = qwen15_json();
  j.erase("num_experts");
  EXPECT_THROW((void)ModelConfig::from_json(j, "c.json"), Error);
  expect_error(j, {"models/bad/config.json", "num_experts"});
}

TEST(ModelConfigErrors, MissingRequiredKeys) {
  for (const char* key : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok"}) {
    SCOPED_TRACE(key);
    Json j = qwen15_json();
    j.erase(key);
    expect_error(j, {"models/bad/config.json", key});
  }
}

TEST(ModelConfigErrors, WrongType) {
  Json j = qwen15_json();
  j["hidden_size"] = "big";
  EXPECT_THROW((void)ModelConfig::from_json(j, "c.json"), Error);
  expect_error(j, {"models/bad/config.json", "hidden_size", "string"});
}

// A number that only looks right must not be truncated into a size: 2.5 experts per token, true for
// hidden_size or 2^33 heads are all config errors, as they are for PyTorch.
TEST(ModelConfigErrors, LossyNumbersAreWrongTypes) {
  const std::vector<std::pair<const char*, Json>> cases = {
      {"hidden_size", 2048.5},        {"hidden_size", true},           {"num_attention_heads", 8589934592LL},
      {"num_experts_per_tok", 2.5},   {"num_experts", -8589934592LL},  {"norm_topk_prob", 1},
      {"mlp_only_layers", {0, 1.5}},  {"mlp_only_layers", "0,1"},      {"rope_theta", "1e6"},
      {"rms_norm_eps", false},        {"torch_dtype", 16},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(std::string(key) + " = " + value.dump());
    Json j = qwen15_json();
    j[key] = value;
    expect_error(j, {"models/bad/config.json", key, "wrong type", value.dump()});
  }
  // Integral floats are still numbers where a float is expected.
  Json j = qwen15_json();
  j["rope_theta"] = 10000;
  EXPECT_DOUBLE_EQ(ModelConfig::from_json(j, "c.json").rope_theta, 10000.0);
}

TEST(ModelConfigErrors, HeadsNotAMultipleOfKvHeads) {
  Json j = qwen15_json();
  j["num_key_value_heads"] = 6;
  EXPECT_THROW((void)ModelConfig::from_json(j, "c.json"), Error);
  expect_error(j, {"models/bad/config.json", "num_attention_heads", "num_key_value_heads"});
}

TEST(ModelConfigErrors, TopKExceedsExperts) {
  Json j = qwen15_json();
  j["num_experts_per_tok"] = 61;
  EXPECT_THROW((void)ModelConfig::from_json(j, "c.json"), Error);
  expect_error(j, {"models/bad/config.json", "num_experts_per_tok", "num_experts", "61", "60"});
}

TEST(ModelConfigErrors, NonPositiveSizes) {
  for (const char* key : {"vocab_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                          "moe_intermediate_size", "decoder_sparse_step", "num_key_value_heads"}) {
    SCOPED_TRACE(key);
    Json j = qwen15_json();
    j[key] = 0;
    expect_error(j, {"models/bad/config.json", key});
  }
}

TEST(ModelConfigErrors, UnsupportedRopeType) {
  Json j = Json::parse(k_qwen15_moe_config_v5);
  j["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_THROW((void)ModelConfig::from_json(j, "c.json"), Error);
  expect_error(j, {"models/bad/config.json", "rope_parameters", "rope_type", "yarn"});

  // The older spelling: rope_scaling {"type": ...}.
  Json old = qwen15_json();
  old["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  expect_error(old, {"models/bad/config.json", "rope_scaling", "yarn"});
}

TEST(ModelConfigErrors, RopeParametersNotAnObject) {
  Json j = qwen15_json();
  j["rope_parameters"] = 3;
  expect_error(j, {"models/bad/config.json", "rope_parameters"});
}

TEST(ModelConfigErrors, NotAJsonObject) {
  EXPECT_THROW((void)ModelConfig::from_json(Json::array({1, 2}), "c.json"), Error);
  expect_error(Json::array({1, 2}), {"models/bad/config.json", "object"});
  expect_error(Json("Qwen2MoeForCausalLM"), {"models/bad/config.json", "object"});
}

}  // namespace
}  // namespace moescope
