#include "analysis/timing.h"

#include <cmath>

#include "util/error.h"

namespace moescope::analysis {
namespace {

TimingRun parse_run(const std::filesystem::path& path, const std::string& label, const Json& j) {
  const std::string where = path.string() + ": \"" + label + "\"";
  if (!j.is_object()) fail("{} is not an object", where);
  TimingRun run;
  const auto seconds = j.find("seconds");
  if (seconds == j.end()) fail("{} has no \"seconds\"", where);
  if (!seconds->is_number() || !std::isfinite(seconds->get<double>()) || seconds->get<double>() < 0)
    fail("{}: \"seconds\" must be a non-negative number", where);
  run.seconds = seconds->get<double>();
  auto count = [&](const char* key, std::optional<int64_t>& out) {
    const auto it = j.find(key);
    if (it == j.end() || it->is_null()) return;
    if (!it->is_number_integer() || it->get<int64_t>() < 0) fail("{}: \"{}\" must be a non-negative integer", where, key);
    out = it->get<int64_t>();
  };
  count("prompts", run.prompts);
  count("prompt_tokens", run.prompt_tokens);
  count("generated_tokens", run.generated_tokens);
  if (const auto it = j.find("tokens_per_s"); it != j.end() && !it->is_null()) {
    if (!it->is_number() || !std::isfinite(it->get<double>())) fail("{}: \"tokens_per_s\" must be a number", where);
    run.tokens_per_s = it->get<double>();
  }
  if (const auto it = j.find("routing_log"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) fail("{}: \"routing_log\" must be true or false", where);
    run.routing_log = it->get<bool>();
  }
  return run;
}

}  // namespace

TimingFile read_timing_file(const std::filesystem::path& path) {
  const Json j = read_json_file(path);
  if (!j.is_object()) fail("{}: expected a JSON object with \"no_log\" and \"log\" entries", path.string());
  TimingFile t;
  if (j.contains("no_log")) t.no_log = parse_run(path, "no_log", j["no_log"]);
  if (j.contains("log")) t.log = parse_run(path, "log", j["log"]);
  return t;
}

namespace {

Json read_timing_object(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) return Json::object();
  Json all = read_json_file(path);
  if (!all.is_object()) fail("{}: timing file is not a JSON object; move it away or give another --timing", path.string());
  return all;
}

}  // namespace

void check_timing_file(const std::filesystem::path& path) {
  read_timing_object(path);
  const std::filesystem::path probe = path.string() + ".tmp";
  write_text_file(probe, "");  // the folder takes the file merge_timing_entry writes and renames
  std::filesystem::remove(probe);
}

void merge_timing_entry(const std::filesystem::path& path, const std::string& label, const TimingRun& run) {
  Json all = read_timing_object(path);
  Json entry = {{"seconds", run.seconds}};
  if (run.prompts) entry["prompts"] = *run.prompts;
  if (run.prompt_tokens) entry["prompt_tokens"] = *run.prompt_tokens;
  if (run.generated_tokens) entry["generated_tokens"] = *run.generated_tokens;
  if (run.tokens_per_s) entry["tokens_per_s"] = *run.tokens_per_s;
  if (run.routing_log) entry["routing_log"] = *run.routing_log;
  all[label] = entry;
  const std::filesystem::path tmp = path.string() + ".tmp";
  write_text_file(tmp, all.dump(2) + "\n");
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("{}: cannot replace the timing file: {}", path.string(), ec.message());
}

std::optional<Overhead> logging_overhead(const TimingFile& timing, std::vector<std::string>& notes) {
  if (!timing.no_log || !timing.log) {
    const char* missing = !timing.no_log && !timing.log ? "\"no_log\" and \"log\"" : !timing.no_log ? "\"no_log\"" : "\"log\"";
    notes.push_back(fmt::format("timing: no {} run in the timing file, so no overhead", missing));
    return std::nullopt;
  }
  const TimingRun& a = *timing.no_log;
  const TimingRun& b = *timing.log;
  if (a.seconds <= 0) {
    notes.push_back("timing: the no_log run took 0 s, so the overhead has no percentage");
    return std::nullopt;
  }
  auto differs = [&](const char* what, const std::optional<int64_t>& x, const std::optional<int64_t>& y) {
    if (x && y && *x != *y)
      notes.push_back(fmt::format("timing: the runs differ in {} ({} without the log, {} with it): the overhead "
                                  "compares different work",
                                  what, *x, *y));
  };
  differs("prompts", a.prompts, b.prompts);
  differs("prompt tokens", a.prompt_tokens, b.prompt_tokens);
  differs("generated tokens", a.generated_tokens, b.generated_tokens);
  if (a.routing_log.value_or(false)) notes.push_back("timing: the \"no_log\" run says the routing log was on");
  if (b.routing_log && !*b.routing_log) notes.push_back("timing: the \"log\" run says the routing log was off");
  Overhead o;
  o.no_log_seconds = a.seconds;
  o.log_seconds = b.seconds;
  o.difference_seconds = b.seconds - a.seconds;
  o.percent = 100.0 * o.difference_seconds / a.seconds;
  return o;
}

Json to_json(const Overhead& o, const TimingFile& timing) {
  Json j = {{"no_log_seconds", o.no_log_seconds},
            {"log_seconds", o.log_seconds},
            {"difference_seconds", o.difference_seconds},
            {"percent", o.percent}};
  if (timing.no_log && timing.no_log->tokens_per_s) j["no_log_tokens_per_s"] = *timing.no_log->tokens_per_s;
  if (timing.log && timing.log->tokens_per_s) j["log_tokens_per_s"] = *timing.log->tokens_per_s;
  return j;
}

}  // namespace moescope::analysis
