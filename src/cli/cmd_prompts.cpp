// moescope prompts --gsm8k test.jsonl --n 25 [--offset 0] --out prompts.txt
#include <fmt/format.h>

#include <cstdio>

#include "analysis/prompts_file.h"
#include "cli/commands.h"
#include "util/error.h"

namespace moescope::cli {
namespace {

struct PromptsArgs {
  std::string gsm8k;
  int64_t n = 25;
  int64_t offset = 0;
  std::string out;
};

void run_prompts(const PromptsArgs& a) {
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
  CLI::App* cmd = app.add_subcommand("prompts", "Write a prompts file (one prompt per line) from GSM8K's JSONL");
  cmd->add_option("--gsm8k", args->gsm8k, "GSM8K JSONL, e.g. test.jsonl (the \"question\" field)")->required();
  // Ranges are checked by read_gsm8k_questions, whose messages are clearer than CLI11's.
  cmd->add_option("--n", args->n, "Number of questions")->capture_default_str();
  cmd->add_option("--offset", args->offset, "Records to skip first")->capture_default_str();
  cmd->add_option("--out", args->out, "Prompts file to write")->required();
  cmd->callback([args] { run_prompts(*args); });
}

}  // namespace moescope::cli
