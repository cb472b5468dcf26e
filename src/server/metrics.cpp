#include "server/metrics.h"

#include <fmt/format.h>

#include <algorithm>

namespace moescope::server {

void Histogram::observe(double v) {
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  auto it = std::back_inserter(out);
  fmt::format_to(it, "# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  int64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    fmt::format_to(it, "{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cumulative);
  }
  fmt::format_to(it, "{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, count_, name, sum_, name, count_);
}

Metrics::Metrics()
    : e2e_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}),
      ttft_({0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}),
      prompt_len_({8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192}),
      output_len_({8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}) {}

void Metrics::request_finished(const std::string& reason, int prompt_tokens, int completion_tokens, double e2e_seconds,
                               double first_token_seconds) {
  std::lock_guard lock(mutex_);
  ++finished_[reason];
  prompt_tokens_ += prompt_tokens;
  generation_tokens_ += completion_tokens;
  e2e_.observe(e2e_seconds);
  if (first_token_seconds >= 0) ttft_.observe(first_token_seconds);
  prompt_len_.observe(prompt_tokens);
  output_len_.observe(completion_tokens);
}

void Metrics::request_refused(int status) {
  std::lock_guard lock(mutex_);
  ++refused_[status];
}

namespace {

// A label value as the Prometheus text format escapes it: backslash, double quote and newline.
std::string label_value(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

std::string Metrics::render(const ServiceStats& s, const ExpertRecorder& recorder, const std::string& model_name) const {
  std::string out;
  auto it = std::back_inserter(out);
  auto gauge = [&](const char* name, const char* help, double v) {
    fmt::format_to(it, "# HELP {} {}\n# TYPE {} gauge\n{} {}\n", name, help, name, name, v);
  };
  {
    std::lock_guard lock(mutex_);
    fmt::format_to(it, "# HELP moescope_request_success_total Requests finished, by reason.\n# TYPE moescope_request_success_total counter\n");
    for (const auto& [reason, n] : finished_) fmt::format_to(it, "moescope_request_success_total{{finished_reason=\"{}\"}} {}\n", reason, n);
    fmt::format_to(it, "# HELP moescope_request_refused_total Requests answered with an error status.\n# TYPE moescope_request_refused_total counter\n");
    for (const auto& [status, n] : refused_) fmt::format_to(it, "moescope_request_refused_total{{status=\"{}\"}} {}\n", status, n);
    fmt::format_to(it, "# HELP moescope_prompt_tokens_total Prompt tokens of finished requests.\n# TYPE moescope_prompt_tokens_total counter\nmoescope_prompt_tokens_total {}\n", prompt_tokens_);
    fmt::format_to(it, "# HELP moescope_generation_tokens_total Generated tokens of finished requests.\n# TYPE moescope_generation_tokens_total counter\nmoescope_generation_tokens_total {}\n", generation_tokens_);
    e2e_.render(out, "moescope_e2e_request_latency_seconds", "Seconds from arrival to the last token.");
    ttft_.render(out, "moescope_time_to_first_token_seconds", "Seconds from arrival to the first token.");
    prompt_len_.render(out, "moescope_request_prompt_tokens", "Prompt tokens per request.");
    output_len_.render(out, "moescope_request_generation_tokens", "Generated tokens per request.");
  }
  gauge("moescope_num_requests_running", "Sequences in the running batch.", s.running);
  gauge("moescope_num_requests_waiting", "Requests waiting for the batch or the KV cache.", s.waiting);
  gauge("moescope_kv_cache_usage_perc", "Share of the KV cache blocks in use (0 when unbounded).",
        s.kv_blocks_total > 0 ? static_cast<double>(s.kv_blocks_used) / static_cast<double>(s.kv_blocks_total) : 0.0);
  fmt::format_to(it, "# HELP moescope_num_preemptions_total Sequences preempted for KV cache room.\n# TYPE moescope_num_preemptions_total counter\nmoescope_num_preemptions_total {}\n", s.preemptions);
  fmt::format_to(it, "# HELP moescope_forward_passes_total Forward passes run.\n# TYPE moescope_forward_passes_total counter\nmoescope_forward_passes_total {}\n", s.passes);
  const RecorderState state = recorder.state();
  gauge("moescope_expert_recording", "1 while the expert recorder records.", state == RecorderState::Recording ? 1 : 0);
  if (state == RecorderState::Recording) {
    const auto counts = recorder.counts();
    const auto& layers = recorder.shape().moe_layers;
    const std::string label = label_value(model_name);
    fmt::format_to(it, "# HELP moescope_expert_tokens_total Token-to-expert assignments in the current recording.\n# TYPE moescope_expert_tokens_total counter\n");
    for (size_t m = 0; m < counts.size(); ++m)
      for (size_t e = 0; e < counts[m].size(); ++e)
        fmt::format_to(it, "moescope_expert_tokens_total{{model_name=\"{}\",layer=\"{}\",expert=\"{}\"}} {}\n", label, layers[m], e, counts[m][e]);
  }
  return out;
}

}  // namespace moescope::server
