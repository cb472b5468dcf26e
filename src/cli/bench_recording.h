#pragma once
// The recording-overhead benchmark (SPEC §6): one generation workload run with recording off and with
// each way of recording on, interleaved round by round in one process, so drift in the machine's speed
// falls on every configuration alike.
#include "backend/backend.h"
#include "engine/loaded_model.h"
#include "util/json.h"

namespace moescope::cli {

struct OverheadOptions {
  int prompts = 8;         // requests, all in flight together
  int prompt_tokens = 64;  // per request
  int max_tokens = 32;     // generated per request
  int rounds = 7;          // each configuration runs once per round
};

// Prints the table and returns it as JSON. Every run uses the same backend (on a GPU: weights uploaded
// once, decode graphs captured once); each run's engine frees its caches when it is done.
Json bench_recording_overhead(const LoadedModel& model, Backend& backend, const OverheadOptions& options);

}  // namespace moescope::cli
