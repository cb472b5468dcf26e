#pragma once
// `moescope report`: routes file -> expert_metrics.json, expert_hist.png, expert_heatmap.png (several
// layers), with a tokens file token_classes.json and expert_token_classes.png, and a short text summary.
// Everything the command does lives here; cmd_report.cpp parses flags and finds the default model.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "util/json.h"

namespace moescope::analysis {

struct ReportOptions {
  std::filesystem::path routes;
  std::filesystem::path out_dir;
  std::string layer;  // "all", a layer number, or empty: the one layer logged, else "all"
  std::optional<std::filesystem::path> timing;
  std::optional<int> num_experts;
  std::optional<std::filesystem::path> tokens;  // `moescope run --output` file: the token-class analysis
  std::filesystem::path tokenizer;              // with tokens: a model directory with tokenizer.json, or the file
};

struct Report {
  Json metrics;                              // what expert_metrics.json holds
  std::string summary;                       // the text printed on stdout
  std::vector<std::filesystem::path> files;  // written, in order
};

// Throws Error (one line) on a missing or unreadable file, no route records, a layer not in the
// routes, an out-dir that cannot be written, or a bad timing file; with tokens, on a bad tokens file or
// tokenizer, a route without req_id/token_idx, a req_id not in the tokens file or a token_idx beyond
// its tokens. Malformed route lines are not errors: they are counted in the metrics and the summary.
Report write_report(const ReportOptions& options);

}  // namespace moescope::analysis
