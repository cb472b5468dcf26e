#pragma once
// timing.json, written by `moescope run`: one entry per label, e.g.
//   {"no_log": {"seconds": 12.34, "prompts": 25, "prompt_tokens": 2100, "generated_tokens": 3200,
//               "tokens_per_s": 259.3, "routing_log": false},
//    "log":    {..., "routing_log": true}}
// and the logging overhead the report derives from it.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "util/json.h"

namespace moescope::analysis {

struct TimingRun {
  double seconds = 0.0;  // wall time of the whole batch
  std::optional<int64_t> prompts;
  std::optional<int64_t> prompt_tokens;
  std::optional<int64_t> generated_tokens;
  std::optional<double> tokens_per_s;
  std::optional<bool> routing_log;
};

struct TimingFile {
  std::optional<TimingRun> no_log;
  std::optional<TimingRun> log;
};

// Reads and checks timing.json: a JSON object whose "no_log" and "log" entries, where present, are
// objects with a finite non-negative "seconds" and correctly typed optional fields. Other labels are
// ignored. Throws Error naming the file and the field.
TimingFile read_timing_file(const std::filesystem::path& path);

// Sets timing.json's entry `label` to `run` (every field present), keeping the other labels; creates the
// file when it does not exist. Throws Error naming the file when it is not a JSON object or cannot be
// written. The file is replaced whole (written beside it, then renamed): never half-written.
void merge_timing_entry(const std::filesystem::path& path, const std::string& label, const TimingRun& run);
// What merge_timing_entry will need, checked before a long run: the file, if it exists, is a JSON object,
// and its folder can be written. Throws Error naming the file.
void check_timing_file(const std::filesystem::path& path);

struct Overhead {
  double no_log_seconds = 0.0;
  double log_seconds = 0.0;
  double difference_seconds = 0.0;  // log - no_log (negative when the logged run was faster: noise)
  double percent = 0.0;             // 100 * difference / no_log
};

// The overhead of the logged run over the unlogged one; nullopt, with the reason appended to notes,
// when either run is missing or no_log took no time. Notes also say when the two runs did not do the
// same work (different prompt or token counts), which makes the comparison unfair.
std::optional<Overhead> logging_overhead(const TimingFile& timing, std::vector<std::string>& notes);

Json to_json(const Overhead& o, const TimingFile& timing);

}  // namespace moescope::analysis
