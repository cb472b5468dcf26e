#include "cli/batch.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>

#include "cli/commands.h"
#include "util/error.h"
#include "util/shutdown.h"

namespace moescope::cli {

void add_sampling_options(CLI::App* cmd, SamplingArgs& a, int default_max_tokens) {
  a.max_tokens = default_max_tokens;
  cmd->add_option("--max-tokens", a.max_tokens, "Tokens to generate at most per prompt")->capture_default_str();
  cmd->add_option("--temperature", a.temperature, "0 is greedy")->capture_default_str();
  cmd->add_option("--top-p", a.top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", a.top_k, "Sample among the k most likely (0: off)")->capture_default_str();
  cmd->add_option("--seed", a.seed, "Sampling seed (prompt i uses seed + i)")->capture_default_str();
  cmd->add_flag("--chat", a.chat, "Wrap each prompt in the model's chat template");
  cmd->add_flag("--ignore-eos", a.ignore_eos, "Keep generating past end-of-sequence tokens");
}

void check_sampling(const SamplingArgs& a, const char* command) {
  if (a.max_tokens < 1) fail("{}: --max-tokens must be at least 1", command);
  if (!(a.temperature >= 0.0f) || !std::isfinite(a.temperature)) fail("{}: --temperature must be >= 0", command);
  if (!(a.top_p > 0.0f && a.top_p <= 1.0f)) fail("{}: --top-p must be in (0, 1]", command);
  if (a.top_k < -1) fail("{}: --top-k must be -1, 0 (off) or positive", command);
}

std::vector<int32_t> encode_prompt(const LoadedModel& m, const std::string& text, bool chat) {
  if (!m.tokenizer) fail("{}: the model has no tokenizer.json; give the prompt as ids with --prompt-ids", m.name);
  if (!chat) return m.tokenizer->encode(text);
  return m.tokenizer->encode(m.chat_template.apply({{"user", text}}, true));
}

namespace {

// One line redrawn in place on a terminal: [#####.....] 12/25 prompts  1234 tokens  56.7 tok/s
class ProgressBar {
 public:
  ProgressBar(bool on, size_t total) : on_(on && ::isatty(STDERR_FILENO)), total_(total), started_(clock::now()) {}
  void update(size_t done, int64_t tokens, bool force = false) {
    if (!on_) return;
    const auto now = clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - started_).count();
    const int width = 30, filled = total_ ? static_cast<int>(width * done / total_) : width;
    fmt::print(stderr, "\r[{}{}] {}/{} prompts  {} tokens  {:.1f} tok/s ", std::string(filled, '#'), std::string(width - filled, '.'),
               done, total_, tokens, seconds > 0 ? tokens / seconds : 0.0);
    if (force) fmt::print(stderr, "\n");
  }

 private:
  using clock = std::chrono::steady_clock;
  bool on_;
  size_t total_;
  clock::time_point started_, last_;
};

}  // namespace

BatchResult run_batch(const LoadedModel& m, const std::vector<std::vector<int32_t>>& prompts, const SamplingArgs& s,
                      const std::string& device, const BackendOptions& backend_options, Recording& recording, bool progress) {
  const std::unique_ptr<Backend> backend = make_backend(device, m.weights, backend_options);
  Engine engine(*backend, EngineOptions{256, m.eos_token_ids}, recording.sink());
  BatchResult result;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) fail("prompt {} encodes to no tokens", i);
    engine.add_request({fmt::format("r{}", i), prompts[i], {s.temperature, s.top_p, s.top_k, s.seed + i}, s.max_tokens, s.ignore_eos});
    result.prompt_tokens += static_cast<int64_t>(prompts[i].size());
  }
  install_shutdown_handlers();
  ProgressBar bar(progress, prompts.size());
  size_t done = 0;
  int64_t generated = 0;
  const auto started = std::chrono::steady_clock::now();
  result.outputs = engine.run_to_completion([&](const std::vector<RequestOutput>& finished) {
    done += finished.size();
    for (const TokenEvent& e : engine.step_tokens()) generated += e.token >= 0;
    bar.update(done, generated);
    return !shutdown_requested();
  });
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  bar.update(done, generated, /*force=*/true);
  result.timing = engine.timing();
  for (const auto& out : result.outputs) result.generated_tokens += static_cast<int64_t>(out.output_ids.size());
  recording.finish();
  if (shutdown_requested()) {
    fmt::print(stderr, "stopped by signal {} after {} of {} prompts; every file written is whole\n", shutdown_signal(),
               result.outputs.size(), prompts.size());
    throw ExitStatus{128 + shutdown_signal()};
  }
  return result;
}

}  // namespace moescope::cli
