#pragma once
// /metrics in the Prometheus text format (version 0.0.4): request counts, tokens, latency histograms,
// running and waiting sequences, KV cache use, and while recording the recorder's per-layer, per-expert
// token counts (labels layer, expert).
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "routing/expert_recorder.h"
#include "server/engine_service.h"

namespace moescope::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  void render(std::string& out, const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // [bounds + 1], the last one +Inf
  double sum_ = 0.0;
  int64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();
  void request_finished(const std::string& reason, int prompt_tokens, int completion_tokens, double e2e_seconds,
                        double first_token_seconds);
  void request_refused(int status);
  std::string render(const ServiceStats& stats, const ExpertRecorder& recorder, const std::string& model_name) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, int64_t> finished_;  // finish reason -> requests
  std::map<int, int64_t> refused_;           // HTTP status -> requests
  int64_t prompt_tokens_ = 0, generation_tokens_ = 0;
  Histogram e2e_, ttft_, prompt_len_, output_len_;
};

}  // namespace moescope::server
