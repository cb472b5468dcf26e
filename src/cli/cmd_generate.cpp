// moescope generate [MODEL] (--prompt T | --prompt-ids 1,2,3 | --prompts FILE) [sampling flags] [--chat] [--json]
#include <fmt/format.h>

#include "analysis/prompts_file.h"
#include "cli/batch.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::string prompts_file;
  SamplingArgs sampling;
  bool json = false;
  std::string device = "auto";
  BackendOptions backend_options;
  RecordingArgs recording;
};

void run_generate(const GenerateArgs& a) {
  const int given = !a.prompt.empty() + !a.prompt_ids.empty() + !a.prompts_file.empty();
  if (given != 1) fail("generate: give exactly one of --prompt, --prompt-ids or --prompts");
  check_sampling(a.sampling, "generate");
  const std::string device = resolve_device(a.device);

  const LoadedModel m = load_model(a.model.empty() ? default_model_dir() : std::filesystem::path(a.model));
  std::vector<std::vector<int32_t>> prompts;
  if (!a.prompt_ids.empty()) {
    if (a.sampling.chat) fail("generate: --chat needs a text prompt, not --prompt-ids");
    prompts.push_back(parse_ids(a.prompt_ids));
    if (prompts.back().empty()) fail("generate: --prompt-ids is empty");
  } else if (!a.prompt.empty()) {
    prompts.push_back(encode_prompt(m, a.prompt, a.sampling.chat));
  } else {
    for (const std::string& text : analysis::read_prompts_file(a.prompts_file)) prompts.push_back(encode_prompt(m, text, a.sampling.chat));
    if (prompts.empty()) fail("{}: no prompts (one per line)", a.prompts_file);
  }

  Recording recording(a.recording, routing_shape(m.weights->config, m.name));
  const BatchResult r = run_batch(m, prompts, a.sampling, device, a.backend_options, recording, /*progress=*/false);
  const EngineTiming& t = r.timing;
  for (const RequestOutput& out : r.outputs) {
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
    j["timing"] = {{"total_seconds", r.seconds},
                   {"prefill_seconds", t.prefill_seconds},
                   {"decode_seconds", t.decode_seconds},
                   {"prompt_tokens", r.prompt_tokens},
                   {"generated_tokens", r.generated_tokens},
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
  add_sampling_options(cmd, args->sampling, 16);
  cmd->add_flag("--json", args->json, "Print {prompt_ids, output_ids, text, timing} per prompt");
  add_device_option(cmd, args->device);
  add_gpu_options(cmd, args->backend_options);
  add_recording_options(cmd, args->recording);
  cmd->callback([args] { run_generate(*args); });
}

}  // namespace moescope::cli
