#include "cli/commands.h"
namespace moescope::cli {
void add_bench(CLI::App& app) { app.add_subcommand("bench", "Benchmark (not yet written)"); }
}  // namespace moescope::cli
