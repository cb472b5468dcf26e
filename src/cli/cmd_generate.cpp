// moescope generate [MODEL] (--prompt T | --prompt-ids 1,2,3 | --prompts FILE) [sampling flags] [--chat] [--json]
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <iostream>

#include "analysis/prompts_file.h"
#include "backend/factory.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::string prompts_file;
  int max_tokens = 16;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool chat = false;
  bool json = false;
  bool ignore_eos = false;
  std::string device = "auto";
  BackendOptions backend_options;
};

std::vector<int32_t> encode_prompt(const LoadedModel& m, const std::string& text, bool chat) {
  if (!m.tokenizer) fail("{}: the model has no tokenizer.json; give the prompt as ids with --prompt-ids", m.name);
  if (!chat) return m.tokenizer->encode(text);
  return m.tokenizer->encode(m.chat_template.apply({{"user", text}}, true));
}

void run_generate(const GenerateArgs& a) {
  const int given = !a.prompt.empty() + !a.prompt_ids.empty() + !a.prompts_file.empty();
  if (given != 1) fail("generate: give exactly one of --prompt, --prompt-ids or --prompts");
  if (a.max_tokens < 1) fail("generate: --max-tokens must be at least 1");
  if (!(a.temperature >= 0.0f) || !std::isfinite(a.temperature)) fail("generate: --temperature must be >= 0");
  if (!(a.top_p > 0.0f && a.top_p <= 1.0f)) fail("generate: --top-p must be in (0, 1]");
  if (a.top_k < -1) fail("generate: --top-k must be -1, 0 (off) or positive");

  const LoadedModel m = load_model(a.model.empty() ? default_model_dir() : std::filesystem::path(a.model));
  std::vector<std::vector<int32_t>> prompts;
  if (!a.prompt_ids.empty()) {
    if (a.chat) fail("generate: --chat needs a text prompt, not --prompt-ids");
    prompts.push_back(parse_ids(a.prompt_ids));
    if (prompts.back().empty()) fail("generate: --prompt-ids is empty");
  } else if (!a.prompt.empty()) {
    prompts.push_back(encode_prompt(m, a.prompt, a.chat));
  } else {
    for (const std::string& text : analysis::read_prompts_file(a.prompts_file))
      prompts.push_back(encode_prompt(m, text, a.chat));
    if (prompts.empty()) fail("{}: no prompts (one per line)", a.prompts_file);
  }

  const std::unique_ptr<Backend> backend = make_backend(a.device, m.weights, a.backend_options);
  Engine engine(*backend, EngineOptions{256, m.eos_token_ids});
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) fail("generate: prompt {} encodes to no tokens", i);
    Request r;
    r.req_id = fmt::format("r{}", i);
    r.prompt_ids = prompts[i];
    r.max_tokens = a.max_tokens;
    r.ignore_eos = a.ignore_eos;
    r.sampling = {a.temperature, a.top_p, a.top_k, a.seed + i};
    engine.add_request(std::move(r));
  }
  const auto started = std::chrono::steady_clock::now();
  const auto outputs = engine.run_to_completion();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const EngineTiming& t = engine.timing();

  for (const RequestOutput& out : outputs) {
    std::string text;
    if (m.tokenizer) text = m.tokenizer->decode(out.output_ids, /*skip_special_tokens=*/true);
    if (!a.json) {
      if (m.tokenizer) fmt::print("{}\n", text);
      else fmt::print("{}\n", fmt::join(out.output_ids, " "));
      continue;
    }
    Json j = {{"prompt_ids", out.prompt_ids}, {"output_ids", out.output_ids}, {"finish_reason", out.finish_reason}};
    j["text"] = m.tokenizer ? Json(text) : Json(nullptr);
    auto per_s = [](double n, double s) { return s > 0 ? n / s : 0.0; };
    j["timing"] = {{"total_seconds", total},
                   {"prefill_seconds", t.prefill_seconds},
                   {"decode_seconds", t.decode_seconds},
                   {"prompt_tokens", t.prefill_tokens},
                   {"generated_tokens", t.decode_tokens + static_cast<int64_t>(outputs.size())},
                   {"prefill_tokens_per_s", per_s(static_cast<double>(t.prefill_tokens), t.prefill_seconds)},
                   {"decode_tokens_per_s", per_s(static_cast<double>(t.decode_tokens), t.decode_seconds)}};
    fmt::print("{}\n", j.dump(-1, ' ', false, Json::error_handler_t::replace));
  }
}

}  // namespace

void add_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text (or ids) from a prompt on the CPU or a GPU");
  cmd->add_option("model", args->model,
                  "Model directory in Hugging Face layout (default: models/moescope-tiny-gsm8k, shipped with moescope)");
  cmd->add_option("--prompt", args->prompt, "Prompt text");
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt as token ids, e.g. 1,2,3");
  cmd->add_option("--prompts", args->prompts_file, "File with one prompt per line (run as one batch)");
  cmd->add_option("--max-tokens", args->max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "0 is greedy")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "Sample among the k most likely (0: off)")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Sampling seed (prompt i uses seed + i)")->capture_default_str();
  cmd->add_flag("--chat", args->chat, "Wrap the prompt in the model's chat template");
  cmd->add_flag("--json", args->json, "Print {prompt_ids, output_ids, text, timing} per prompt");
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Keep generating past end-of-sequence tokens");
  add_device_option(cmd, args->device);
  add_gpu_options(cmd, args->backend_options);
  cmd->callback([args] { run_generate(*args); });
}

}  // namespace moescope::cli
