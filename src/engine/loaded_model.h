#pragma once
// Everything a command needs from a model directory: weights, tokenizer (optional), chat template,
// and the ids that end generation.
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model/weights.h"
#include "routing/routing_sink.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace moescope {

struct LoadedModel {
  std::string name;                        // directory name, for messages and the routing log
  std::shared_ptr<const ModelWeights> weights;
  std::optional<Tokenizer> tokenizer;      // absent: prompts and outputs are token ids
  ChatTemplate chat_template;
  std::vector<int32_t> eos_token_ids;      // config.json, generation_config.json and the tokenizer's eos
};

LoadedModel load_model(const std::filesystem::path& dir);

// The trained MoE that ships with moescope (models/moescope-tiny-gsm8k, docs/DEFAULT_MODEL.md): every
// command that runs a model uses it when none is named.
inline constexpr std::string_view k_default_model_name = "moescope-tiny-gsm8k";

// Where the default model is: models/<name> in the source tree the binary was built from, else beside the
// executable (<exe dir>/models, <exe dir>/../models, <exe dir>/../share/moescope/models). Throws an Error
// that names every place it looked when none holds a config.json.
std::filesystem::path default_model_dir();

// The routing geometry the recording sinks need, named after the model (model_id).
RoutingShape routing_shape(const ModelConfig& config, const std::string& model_id);

// "1,2,3" or "1 2 3" -> ids; throws Error naming the bad entry.
std::vector<int32_t> parse_ids(const std::string& text);

}  // namespace moescope
