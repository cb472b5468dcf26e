#pragma once
// Offline batch generation shared by `generate` and `run`: the sampling flags, prompts encoded the same
// way, and one engine run over all prompts that stops cleanly between passes on SIGINT/SIGTERM and can
// draw a progress bar.
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "backend/factory.h"
#include "cli/recording.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"

namespace moescope::cli {

struct SamplingArgs {
  int max_tokens = 16;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool chat = false;
};

void add_sampling_options(CLI::App* cmd, SamplingArgs& args, int default_max_tokens);
// Throws Error for an out-of-range value; `command` names the command in the message.
void check_sampling(const SamplingArgs& args, const char* command);

// A text prompt as ids, wrapped in the chat template when asked; throws Error without a tokenizer.
std::vector<int32_t> encode_prompt(const LoadedModel& m, const std::string& text, bool chat);

struct BatchResult {
  std::vector<RequestOutput> outputs;  // in prompt order
  EngineTiming timing;
  double seconds = 0.0;                // wall time of the engine run
  int64_t prompt_tokens = 0, generated_tokens = 0;
};

// Generates for every prompt (prompt i is request "r<i>" and samples with seed + i) in one engine run.
// On SIGINT/SIGTERM it stops between passes, finishes the recording files and throws ExitStatus.
BatchResult run_batch(const LoadedModel& m, const std::vector<std::vector<int32_t>>& prompts, const SamplingArgs& s,
                      const std::string& device, const BackendOptions& backend_options, Recording& recording, bool progress);

}  // namespace moescope::cli
