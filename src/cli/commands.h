#pragma once
// Each subcommand lives in its own file and adds itself to the app here; main.cpp only wires them up.
#include <CLI/CLI.hpp>
#include <string>

namespace moescope::cli {

// Thrown by a command that ends early on purpose (a signal), with the process's exit status.
struct ExitStatus {
  int code;
};

// The command line as typed, for benchmark reports.
inline std::string command_line;

void add_generate(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_make_model(CLI::App& app);
void add_bench(CLI::App& app);
void add_report(CLI::App& app);
void add_prompts(CLI::App& app);
void add_serve(CLI::App& app);
void add_run(CLI::App& app);

}  // namespace moescope::cli
