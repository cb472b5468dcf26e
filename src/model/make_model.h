#pragma once
// Random-weight checkpoints in Hugging Face layout (config.json + model.safetensors), for tests and
// benchmarks. Deterministic: the same arch, preset and seed give the same bytes.
#include <cstdint>
#include <filesystem>
#include <string>

#include "util/json.h"

namespace moescope {

// arch: qwen2_moe | mixtral | olmoe | qwen3_moe;  preset: tiny | small | qwen1.5-moe-a2.7b.
// vocab_size: the tokenizer's size (the preset's own when 0). Returns the config.json written.
Json make_model_config(const std::string& arch, const std::string& preset, int vocab_size = 0);

// Writes config.json and model.safetensors (bf16) under out_dir (created if needed).
void write_random_checkpoint(const std::filesystem::path& out_dir, const Json& config, uint64_t seed);

}  // namespace moescope
