// moescope make-model --arch A --preset tiny|small|qwen1.5-moe-a2.7b --seed S --out DIR
#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/toy_tokenizer.h"
#include "model/make_model.h"

namespace moescope::cli {
namespace {

struct MakeModelArgs {
  std::string arch = "qwen2_moe";
  std::string preset = "tiny";
  uint64_t seed = 0;
  std::string out;
};

void run_make_model(const MakeModelArgs& a) {
  const Json config = make_model_config(a.arch, a.preset);
  write_random_checkpoint(a.out, config, a.seed);
  // The real-size preset has Qwen's 151936-id vocabulary, which a toy tokenizer cannot cover: it is
  // written without a tokenizer, and prompts and outputs are then token ids.
  const int vocab = config["vocab_size"].get<int>();
  if (vocab <= 4096) write_toy_tokenizer(a.out, vocab);
  fmt::print("wrote {} ({} preset, seed {}) to {}\n", config["architectures"][0].get<std::string>(), a.preset, a.seed, a.out);
}

}  // namespace

void add_make_model(CLI::App& app) {
  auto args = std::make_shared<MakeModelArgs>();
  CLI::App* cmd = app.add_subcommand("make-model", "Write a random-weight checkpoint in Hugging Face layout");
  cmd->add_option("--arch", args->arch, "qwen2_moe, mixtral, olmoe or qwen3_moe")
      ->check(CLI::IsMember({"qwen2_moe", "mixtral", "olmoe", "qwen3_moe"}))
      ->capture_default_str();
  cmd->add_option("--preset", args->preset, "tiny, small or qwen1.5-moe-a2.7b")
      ->check(CLI::IsMember({"tiny", "small", "qwen1.5-moe-a2.7b"}))
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Weights seed")->capture_default_str();
  cmd->add_option("--out", args->out, "Output directory")->required();
  cmd->callback([args] { run_make_model(*args); });
}

}  // namespace moescope::cli
