// moescope prompts (--gsm8k test.jsonl [--offset 0] | --synthetic [--seed S]) --n 25 --out prompts.txt
#include <fmt/format.h>

#include <cstdio>

#include "analysis/prompts_file.h"
#include "analysis/synthetic_prompts.h"
#include "cli/commands.h"
#include "util/error.h"

namespace moescope::cli {
namespace {

struct PromptsArgs {
  std::string gsm8k;
  int64_t n = 25;
  int64_t offset = 0;
  std::string out;
  bool synthetic = false;
  uint64_t seed = 0;
};

void run_prompts(const PromptsArgs& a) {
  if (a.synthetic == !a.gsm8k.empty()) fail("prompts: give exactly one of --gsm8k FILE or --synthetic");
  if (a.synthetic) {
    if (a.n < 1 || a.n > 1000000) fail("prompts: --n must be between 1 and 1000000");
    analysis::write_prompts_file(a.out, analysis::synthetic_math_prompts(static_cast<int>(a.n), a.seed));
    fmt::print("wrote {} synthetic math word problem{} (seed {}) to {}\n", a.n, a.n == 1 ? "" : "s", a.seed, a.out);
    return;
  }
  const analysis::Gsm8kQuestions q = analysis::read_gsm8k_questions(a.gsm8k, a.offset, a.n);
  if (q.questions.empty())
    fail("{}: no questions from offset {} (the file has {} records)", a.gsm8k, a.offset, q.records_seen);
  // Fewer than asked is not an error: the prompts there are are written, and stderr says so.
  if (static_cast<int64_t>(q.questions.size()) < a.n)
    fmt::print(stderr, "warning: {} has only {} question{} from offset {}; asked for {}\n", a.gsm8k, q.questions.size(),
               q.questions.size() == 1 ? "" : "s", a.offset, a.n);
  analysis::write_prompts_file(a.out, q.questions);
  fmt::print("wrote {} prompt{} (GSM8K records {}-{}) to {}\n", q.questions.size(), q.questions.size() == 1 ? "" : "s",
             a.offset, a.offset + static_cast<int64_t>(q.questions.size()) - 1, a.out);
}

}  // namespace

void add_prompts(CLI::App& app) {
  auto args = std::make_shared<PromptsArgs>();
  CLI::App* cmd = app.add_subcommand("prompts", "Write a prompts file (one prompt per line) from GSM8K's JSONL or synthetic problems");
  cmd->add_option("--gsm8k", args->gsm8k, "GSM8K JSONL, e.g. test.jsonl (the \"question\" field)");
  cmd->add_flag("--synthetic", args->synthetic, "Math word problems in GSM8K's style from moescope's own templates");
  cmd->add_option("--seed", args->seed, "Seed of the synthetic problems")->capture_default_str();
  // Ranges are checked by read_gsm8k_questions, whose messages are clearer than CLI11's.
  cmd->add_option("--n", args->n, "Number of questions")->capture_default_str();
  cmd->add_option("--offset", args->offset, "Records to skip first")->capture_default_str();
  cmd->add_option("--out", args->out, "Prompts file to write")->required();
  cmd->callback([args] { run_prompts(*args); });
}

}  // namespace moescope::cli
