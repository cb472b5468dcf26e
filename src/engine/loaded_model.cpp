#include "engine/loaded_model.h"

#include <algorithm>
#include <charconv>

#include "util/error.h"
#include "util/json.h"

namespace moescope {

LoadedModel load_model(const std::filesystem::path& dir) {
  LoadedModel m;
  m.name = std::filesystem::absolute(dir).lexically_normal().filename().string();
  if (m.name.empty()) m.name = std::filesystem::absolute(dir).lexically_normal().parent_path().filename().string();
  m.weights = std::make_shared<const ModelWeights>(ModelWeights::load(dir));
  m.tokenizer = Tokenizer::from_model_dir(dir);
  m.chat_template = ChatTemplate::from_model_dir(dir);

  auto add_eos = [&](int32_t id) {
    if (id >= 0 && std::find(m.eos_token_ids.begin(), m.eos_token_ids.end(), id) == m.eos_token_ids.end())
      m.eos_token_ids.push_back(id);
  };
  for (int id : m.weights->config.eos_token_ids) add_eos(id);
  const auto generation_config = dir / "generation_config.json";
  if (std::filesystem::exists(generation_config)) {
    const Json g = read_json_file(generation_config);
    if (auto it = g.find("eos_token_id"); it != g.end()) {
      if (it->is_number_integer()) add_eos(it->get<int32_t>());
      else if (it->is_array())
        for (const auto& v : *it)
          if (v.is_number_integer()) add_eos(v.get<int32_t>());
    }
  }
  if (m.tokenizer && !m.chat_template.eos_token().empty())
    if (auto id = m.tokenizer->token_to_id(m.chat_template.eos_token())) add_eos(*id);
  return m;
}

RoutingShape routing_shape(const ModelConfig& config, const std::string& model_id) {
  RoutingShape shape{model_id, config.num_hidden_layers, {}, config.num_experts, config.num_experts_per_tok};
  for (int l = 0; l < config.num_hidden_layers; ++l)
    if (config.layer_is_moe[static_cast<size_t>(l)]) shape.moe_layers.push_back(l);
  return shape;
}

std::filesystem::path default_model_dir() {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  // MOESCOPE_SOURCE_DIR: the source tree this binary was built from (set by CMake).
  candidates.push_back(fs::path(MOESCOPE_SOURCE_DIR) / "models" / k_default_model_name);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path bin = exe.parent_path();
    for (const fs::path& base : {bin, bin.parent_path(), bin.parent_path() / "share" / "moescope"}) {
      const fs::path dir = base / "models" / k_default_model_name;
      if (std::find(candidates.begin(), candidates.end(), dir) == candidates.end()) candidates.push_back(dir);
    }
  }
  std::string looked;
  for (const fs::path& dir : candidates) {
    if (fs::is_regular_file(dir / "config.json", ec)) return dir;
    looked += (looked.empty() ? "" : ", ") + dir.string();
  }
  fail("no model named and the default model {} is not installed (looked in {}); give a model directory",
       k_default_model_name, looked);
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == ',' || text[i] == ' ' || text[i] == '\n' || text[i] == '\t' || text[i] == '[' || text[i] == ']') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] != ',' && text[j] != ' ' && text[j] != '\n' && text[j] != '\t' && text[j] != ']') ++j;
    int32_t id = 0;
    const auto [end, ec] = std::from_chars(text.data() + i, text.data() + j, id);
    if (ec != std::errc() || end != text.data() + j || id < 0)
      fail("bad token id \"{}\" (expected non-negative integers separated by commas)", text.substr(i, j - i));
    ids.push_back(id);
    i = j;
  }
  return ids;
}

}  // namespace moescope
