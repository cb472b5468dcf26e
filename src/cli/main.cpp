// moescope: one binary, one subcommand per job. Errors are one line on stderr and a non-zero exit.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"moescope: an inference server for Mixture-of-Experts models that shows expert routing"};
  app.set_version_flag("--version", std::string("moescope ") + MOESCOPE_VERSION);
  app.require_subcommand(1);
  for (int i = 0; i < argc; ++i) moescope::cli::command_line += (i ? " " : "") + std::string(argv[i]);
  moescope::cli::add_generate(app);
  moescope::cli::add_tokenize(app);
  moescope::cli::add_make_model(app);
  moescope::cli::add_bench(app);
  moescope::cli::add_report(app);
  moescope::cli::add_prompts(app);
  moescope::cli::add_serve(app);
  moescope::cli::add_run(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moescope::cli::ExitStatus& e) {
    return e.code;
  } catch (const moescope::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
