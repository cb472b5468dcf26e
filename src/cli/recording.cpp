#include "cli/recording.h"

#include <fmt/format.h>

#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {

void add_recording_options(CLI::App* cmd, RecordingArgs& args, bool recorder_flags) {
  cmd->add_option("--expert-distribution-jsonl", args.pass_jsonl,
                  "Append one JSON line of per-pass expert figures per forward pass to this file");
  if (!recorder_flags) return;
  cmd->add_option("--expert-distribution-recorder-mode", args.recorder_mode,
                  "Record the whole run's expert distribution in this mode (stat, per_pass, per_token)")
      ->check(CLI::IsMember({"stat", "per_pass", "per_token"}));
  cmd->add_option("--expert-distribution-dump", args.dump_path,
                  "Write that recording here: JSON (stat, per_pass), or JSONL streamed as it runs (per_token)");
}

Recording::Recording(const RecordingArgs& args, const RoutingShape& shape) : args_(args), recorder_(shape) {
  if (args.recorder_mode.empty() != args.dump_path.empty())
    fail("--expert-distribution-recorder-mode and --expert-distribution-dump go together");
  if (auto config = route_log_config_from_env()) {
    route_log_ = std::make_unique<RouteLog>(*config, shape);
    fanout_.add(route_log_.get());
  }
  if (!args.pass_jsonl.empty()) {
    pass_log_ = std::make_unique<PassLog>(args.pass_jsonl, shape);
    fanout_.add(pass_log_.get());
  }
  fanout_.add(&recorder_);
  if (!args.recorder_mode.empty()) {
    const RecordingMode mode = *parse_recording_mode(args.recorder_mode);
    if (mode == RecordingMode::PerToken) {
      token_stream_ = std::make_shared<JsonlWriter>(args.dump_path, /*append=*/false);
      token_stream_->push_line(route_log_meta(shape, shape.moe_layers).dump());
      recorder_.stream_per_token(token_stream_);
    } else {
      write_text_file(args.dump_path, "");  // fails now, not after the run, if the path is unwritable
    }
    recorder_.configure(mode);
    recorder_.start();
  }
}

void Recording::finish() {
  if (finished_) return;
  finished_ = true;
  auto report = [](JsonlWriter& w, const char* what) {
    w.close();
    if (w.failed()) fmt::print(stderr, "warning: {}\n", w.error());
    else fmt::print(stderr, "{}: {} ({} bytes)\n", what, w.path().string(), w.stats().bytes);
  };
  if (route_log_) report(route_log_->writer(), "routing log");
  if (pass_log_) report(pass_log_->writer(), "per-pass expert figures");
  if (args_.recorder_mode.empty()) return;
  if (recorder_.state() == RecorderState::Recording) recorder_.stop();
  if (token_stream_) {
    report(*token_stream_, fmt::format("expert distribution (per_token, {} records)", recorder_.num_records()).c_str());
  } else {
    write_text_file(args_.dump_path, recorder_.dump() + "\n");
    fmt::print(stderr, "expert distribution ({}, {} records): {}\n", args_.recorder_mode, recorder_.num_records(), args_.dump_path);
  }
}

}  // namespace moescope::cli
