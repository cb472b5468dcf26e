#pragma once
// The routing sinks of a command that runs a model, set up the same way for generate, run and serve:
// the routing log (MOESCOPE_LOG_MOE, from the environment), auto-recording of every pass
// (--expert-distribution-jsonl) and the expert recorder (started at launch with
// --expert-distribution-recorder-mode, or over HTTP by the server). Every file is opened before any
// work starts, so a bad path is an error at once, not a failure mid-run.
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "routing/expert_recorder.h"
#include "routing/route_log.h"

namespace moescope::cli {

struct RecordingArgs {
  std::string pass_jsonl;      // --expert-distribution-jsonl: one per_pass line per forward pass (appended)
  std::string recorder_mode;   // --expert-distribution-recorder-mode: record the whole run in this mode
  std::string dump_path;       // --expert-distribution-dump: where that recording goes
};

void add_recording_options(CLI::App* cmd, RecordingArgs& args, bool recorder_flags = true);

class Recording {
 public:
  Recording(const RecordingArgs& args, const RoutingShape& shape);
  // The sink to give the engine: nullptr when nothing can record.
  RoutingSink* sink() { return fanout_.empty() ? nullptr : &fanout_; }
  ExpertRecorder& recorder() { return recorder_; }
  bool route_log_on() const { return route_log_ != nullptr; }
  // Stops the recorder, writes its dump, flushes and closes every file. Prints one line per file on
  // stderr (what was written, or why a file stopped). Safe to call twice.
  void finish();

 private:
  RecordingArgs args_;
  ExpertRecorder recorder_;
  std::unique_ptr<RouteLog> route_log_;
  std::unique_ptr<PassLog> pass_log_;
  std::shared_ptr<JsonlWriter> token_stream_;  // per_token records of --expert-distribution-dump
  SinkFanout fanout_;
  bool finished_ = false;
};

}  // namespace moescope::cli
