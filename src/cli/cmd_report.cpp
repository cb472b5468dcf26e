// moescope report ROUTES.jsonl --out-dir DIR [--layer L|all] [--timing timing.json] [--num-experts E]
//                 [--tokens OUTPUTS.jsonl [--model MODEL]]
#include <fmt/format.h>

#include <optional>

#include "analysis/report.h"
#include "cli/commands.h"
#include "engine/loaded_model.h"

namespace moescope::cli {
namespace {

struct ReportArgs {
  std::string routes;
  std::string out_dir;
  std::string layer;
  std::string timing;
  std::optional<int> num_experts;  // set only when --num-experts is given
  std::string tokens;
  std::string model;
};

void run_report(const ReportArgs& a) {
  analysis::ReportOptions o;
  o.routes = a.routes;
  o.out_dir = a.out_dir;
  o.layer = a.layer;
  if (!a.timing.empty()) o.timing = a.timing;
  o.num_experts = a.num_experts;  // write_report refuses values below 1
  if (!a.tokens.empty()) {
    o.tokens = a.tokens;
    // Only the tokenizer is loaded from the model, not its weights.
    o.tokenizer = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  }
  const analysis::Report report = analysis::write_report(o);
  fmt::print("{}", report.summary);
}

}  // namespace

void add_report(CLI::App& app) {
  auto args = std::make_shared<ReportArgs>();
  CLI::App* cmd = app.add_subcommand(
      "report", "Expert histogram, heatmap and load-balance metrics from a routing log or a per_token dump; with "
                "--tokens, expert specialisation by token class and the prompt-vs-generated shift");
  cmd->add_option("routes", args->routes, "Routes JSONL (MOESCOPE_LOG_MOE log or per_token stream)")->required();
  cmd->add_option("--out-dir", args->out_dir,
                  "Directory for expert_hist.png, expert_heatmap.png, expert_metrics.json (and, with --tokens, "
                  "token_classes.json, expert_token_classes.png)")
      ->required();
  cmd->add_option("--layer", args->layer, "Layer for the histogram and summary, or \"all\" (default: the only "
                                          "logged layer, else all)");
  cmd->add_option("--timing", args->timing, "timing.json from `moescope run` (no_log and log): adds the overhead");
  CLI::Option* tokens = cmd->add_option(
      "--tokens", args->tokens,
      "The --output of the `moescope run` that wrote the routes (req_id, prompt_ids, output_ids per line): adds "
      "token_classes.json and expert_token_classes.png (routes by token class: digit, operator, punctuation, "
      "whitespace, word, special, other; and prompt vs generated tokens)");
  cmd->add_option("--model", args->model,
                  "With --tokens: the model directory whose tokenizer.json decodes the ids, or the tokenizer.json "
                  "itself (default: the model shipped in models/)")
      ->needs(tokens);
  cmd->add_option_function<int>(
      "--num-experts", [args](const int& n) { args->num_experts = n; },
      "Experts per layer (wins over the meta line; needed when there is none and high ids were never picked)");
  cmd->callback([args] { run_report(*args); });
}

}  // namespace moescope::cli
