// moescope run [MODEL] --prompts FILE --timing timing.json [--label no_log|log] [sampling flags]: the
// study's timed batch run. Generates for every prompt in one engine run, shows progress on a terminal,
// and merges {"seconds", "prompts", "prompt_tokens", "generated_tokens", "tokens_per_s", "routing_log"}
// into timing.json under the label (default: "log" when the routing log is on, else "no_log").
#include <fmt/format.h>

#include "analysis/prompts_file.h"
#include "analysis/timing.h"
#include "cli/batch.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "util/error.h"

namespace moescope::cli {
namespace {

struct RunArgs {
  std::string model;
  std::string prompts_file;
  std::string timing;
  std::string label;
  std::string output;
  SamplingArgs sampling;
  std::string device = "auto";
  BackendOptions backend_options;
  RecordingArgs recording;
};

void run_run(const RunArgs& a) {
  check_sampling(a.sampling, "run");
  if (!a.label.empty() && a.label.find_first_of("\"\\") != std::string::npos) fail("run: --label must be a plain name");
  const std::string device = resolve_device(a.device);
  const LoadedModel m = load_model(a.model.empty() ? default_model_dir() : std::filesystem::path(a.model));
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& text : analysis::read_prompts_file(a.prompts_file)) prompts.push_back(encode_prompt(m, text, a.sampling.chat));
  if (prompts.empty()) fail("{}: no prompts (one per line)", a.prompts_file);

  Recording recording(a.recording, routing_shape(m.weights->config, m.name));
  const bool routing_log = recording.route_log_on();
  const std::string label = a.label.empty() ? (routing_log ? "log" : "no_log") : a.label;
  if (!a.timing.empty()) analysis::check_timing_file(a.timing);  // a bad timing file fails now, not after the run
  const BatchResult r = run_batch(m, prompts, a.sampling, device, a.backend_options, recording, /*progress=*/true);

  const double tokens_per_s = r.seconds > 0 ? static_cast<double>(r.generated_tokens) / r.seconds : 0.0;
  fmt::print("{} prompts, {} prompt tokens, {} generated tokens in {:.3f} s ({:.1f} tok/s) on {}; routing log {}\n", prompts.size(),
             r.prompt_tokens, r.generated_tokens, r.seconds, tokens_per_s, device, routing_log ? "on" : "off");
  if (!a.timing.empty()) {
    analysis::merge_timing_entry(a.timing, label,
                                 {r.seconds, static_cast<int64_t>(prompts.size()), r.prompt_tokens, r.generated_tokens, tokens_per_s, routing_log});
    fmt::print("timing: {} (label {})\n", a.timing, label);
  }
  if (!a.output.empty()) {
    std::string lines;
    for (const RequestOutput& out : r.outputs) {
      Json j = {{"req_id", out.req_id}, {"prompt_ids", out.prompt_ids}, {"output_ids", out.output_ids}, {"finish_reason", out.finish_reason}};
      if (m.tokenizer) j["text"] = m.tokenizer->decode(out.output_ids, /*skip_special_tokens=*/true);
      lines += j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
    }
    write_text_file(a.output, lines);
    fmt::print("outputs: {}\n", a.output);
  }
}

}  // namespace

void add_run(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  CLI::App* cmd = app.add_subcommand("run", "Timed batch generation over a prompts file, merged into timing.json");
  cmd->add_option("model", a->model, "Model directory (default: the model shipped in models/)");
  cmd->add_option("--prompts", a->prompts_file, "Prompts file, one prompt per line (moescope prompts writes one)")->required();
  cmd->add_option("--timing", a->timing, "Merge this run's figures into this JSON file under --label");
  cmd->add_option("--label", a->label, "Entry name in the timing file (default: log with the routing log on, else no_log)");
  cmd->add_option("--output", a->output, "Write each prompt's output as one JSON line here");
  add_sampling_options(cmd, a->sampling, 128);
  add_device_option(cmd, a->device);
  add_gpu_options(cmd, a->backend_options);
  add_recording_options(cmd, a->recording);
  cmd->callback([a] { run_run(*a); });
}

}  // namespace moescope::cli
