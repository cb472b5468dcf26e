#include "routing/expert_recorder.h"

#include <fmt/format.h>

#include "util/error.h"

namespace moescope {

const char* to_string(RecordingMode mode) {
  switch (mode) {
    case RecordingMode::Stat: return "stat";
    case RecordingMode::PerPass: return "per_pass";
    case RecordingMode::PerToken: return "per_token";
  }
  return "?";
}

const char* to_string(RecorderState state) {
  switch (state) {
    case RecorderState::Idle: return "idle";
    case RecorderState::Configured: return "configured";
    case RecorderState::Recording: return "recording";
    case RecorderState::Stopped: return "stopped";
  }
  return "?";
}

std::optional<RecordingMode> parse_recording_mode(std::string_view text) {
  if (text == "stat") return RecordingMode::Stat;
  if (text == "per_pass") return RecordingMode::PerPass;
  if (text == "per_token") return RecordingMode::PerToken;
  return std::nullopt;
}

ExpertRecorder::ExpertRecorder(RoutingShape shape, int rank) : shape_(std::move(shape)), rank_(rank) {
  if (shape_.num_experts < 1 || shape_.top_k < 1 || shape_.moe_layers.empty())
    fail("expert recorder: the model has no MoE layers to record");
  const size_t cells = shape_.moe_layers.size() * static_cast<size_t>(shape_.num_experts);
  counts_.assign(cells, 0);
  weight_sums_.assign(cells, 0.0);
  pass_counts_.assign(cells, 0);
  pass_weight_sums_.assign(cells, 0.0);
}

void ExpertRecorder::configure(RecordingMode mode) {
  std::lock_guard lock(mutex_);
  if (state_ == RecorderState::Recording)
    throw RecorderStateError(fmt::format("cannot configure while recording (mode {}); stop recording first", to_string(mode_)));
  mode_ = mode;
  state_ = RecorderState::Configured;
}

void ExpertRecorder::start() {
  std::lock_guard lock(mutex_);
  if (state_ == RecorderState::Recording)
    throw RecorderStateError(fmt::format("already recording (mode {}); stop recording first", to_string(mode_)));
  clear_data();
  ++epoch_;
  ever_started_ = true;
  state_ = RecorderState::Recording;
  recording_.store(true, std::memory_order_release);
}

void ExpertRecorder::stop() {
  std::lock_guard lock(mutex_);
  if (state_ != RecorderState::Recording)
    throw RecorderStateError(fmt::format("not recording (state {}); start recording first", to_string(state_)));
  state_ = RecorderState::Stopped;
  recording_.store(false, std::memory_order_release);
  if (token_stream_) token_stream_->flush();
}

void ExpertRecorder::stream_per_token(std::shared_ptr<JsonlWriter> writer) {
  std::lock_guard lock(mutex_);
  token_stream_ = std::move(writer);
}

void ExpertRecorder::clear_data() {
  std::fill(counts_.begin(), counts_.end(), 0);
  std::fill(weight_sums_.begin(), weight_sums_.end(), 0.0);
  num_passes_ = num_tokens_ = num_token_records_ = 0;
  first_pass_.reset();
  pass_records_.clear();
  token_routes_.clear();
}

RecorderState ExpertRecorder::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

RecordingMode ExpertRecorder::mode() const {
  std::lock_guard lock(mutex_);
  return mode_;
}

int64_t ExpertRecorder::num_records() const {
  std::lock_guard lock(mutex_);
  return num_records_locked();
}

int64_t ExpertRecorder::num_records_locked() const {
  switch (mode_) {
    case RecordingMode::Stat: return num_passes_;
    case RecordingMode::PerPass: return static_cast<int64_t>(pass_records_.size());
    case RecordingMode::PerToken: return num_token_records_;
  }
  return 0;
}

// --- the engine thread ---------------------------------------------------------------------------

bool ExpertRecorder::wants_pass() {
  if (!recording_.load(std::memory_order_acquire)) return false;
  std::lock_guard lock(mutex_);
  pass_epoch_ = epoch_;
  pass_mode_ = mode_;
  pass_latched_ = true;
  return true;
}

void ExpertRecorder::begin_pass(const PassInfo& pass) {
  if (!pass_latched_) {  // a caller that did not ask wants_pass() first
    std::lock_guard lock(mutex_);
    pass_epoch_ = epoch_;
    pass_mode_ = mode_;
  }
  pass_latched_ = false;
  std::fill(pass_counts_.begin(), pass_counts_.end(), 0);
  std::fill(pass_weight_sums_.begin(), pass_weight_sums_.end(), 0.0);
  activation_.begin(static_cast<int>(shape_.moe_layers.size()), shape_.num_experts);
  if (pass_mode_ == RecordingMode::PerToken) pass_routes_.begin(pass, shape_.top_k);
}

void ExpertRecorder::on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                              std::span<const float> topk_weights) {
  const int m = shape_.moe_index(layer);
  if (m < 0 || top_k != shape_.top_k) return;  // not a layer of this model's shape
  const size_t n = static_cast<size_t>(num_tokens) * top_k;
  int64_t* counts = &pass_counts_[static_cast<size_t>(m) * shape_.num_experts];
  double* sums = &pass_weight_sums_[static_cast<size_t>(m) * shape_.num_experts];
  for (size_t i = 0; i < n; ++i) {
    ++counts[topk_ids[i]];
    sums[topk_ids[i]] += topk_weights[i];
  }
  activation_.add(m, topk_ids.first(n));
  if (pass_mode_ == RecordingMode::PerToken) pass_routes_.add_layer(layer, topk_ids.first(n), topk_weights.first(n));
}

void ExpertRecorder::on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) {
  const int m = shape_.moe_index(layer);
  if (m < 0 || counts.size() != static_cast<size_t>(shape_.num_experts) || weight_sums.size() != counts.size()) return;
  const size_t base = static_cast<size_t>(m) * shape_.num_experts;
  for (size_t e = 0; e < counts.size(); ++e) {
    pass_counts_[base + e] += counts[e];
    pass_weight_sums_[base + e] += weight_sums[e];
  }
  activation_.add_counts(m, counts);
}

namespace {

struct RoutesBlock final : JsonlWriter::Block {
  RoutesBlock(PassRoutes r, int rk) : routes(std::move(r)), rank(rk) {}
  void append_lines(std::string& out) const override { routes.append_jsonl(out, rank); }
  PassRoutes routes;
  int rank;
};

}  // namespace

void ExpertRecorder::end_pass(const PassInfo& pass, double latency_seconds) {
  PassRecord record{pass.forward_pass_id, rank_, pass.forward_mode, pass.batch_size, pass.num_tokens,
                    pass.seq_lens_sum, latency_seconds, activation_.activated()};
  std::shared_ptr<JsonlWriter> stream;
  {
    std::lock_guard lock(mutex_);
    if (epoch_ != pass_epoch_) return;  // a start() came during the pass: it belongs to no recording
    for (size_t i = 0; i < counts_.size(); ++i) {
      counts_[i] += pass_counts_[i];
      weight_sums_[i] += pass_weight_sums_[i];
    }
    ++num_passes_;
    num_tokens_ += pass.num_tokens;
    if (!first_pass_) first_pass_ = record;
    if (pass_mode_ == RecordingMode::PerPass) pass_records_.push_back(std::move(record));
    if (pass_mode_ == RecordingMode::PerToken) {
      num_token_records_ += pass_routes_.num_records();
      if (token_stream_) stream = token_stream_;
      else token_routes_.push_back(pass_routes_);
    }
  }
  // Outside the lock: a full queue waits here, and control calls must not wait on the disk.
  if (stream) stream->push(std::make_unique<RoutesBlock>(pass_routes_, rank_));
}

// --- views -----------------------------------------------------------------------------------------

Json ExpertRecorder::summary() const {
  std::lock_guard lock(mutex_);
  return summary_locked();
}

Json ExpertRecorder::summary_locked() const {
  if (!ever_started_) throw RecorderStateError("nothing recorded yet: start recording first");
  Json w = {{"rank", rank_},
            {"recording_mode", to_string(mode_)},
            {"num_layers", shape_.moe_layers.size()},
            {"num_experts", shape_.num_experts},
            {"num_records", num_records_locked()},
            {"num_passes", num_passes_},
            {"num_tokens", num_tokens_}};
  w["sample_record"] = first_pass_ ? first_pass_->sample_json(shape_.num_experts) : Json(nullptr);
  return w;
}

std::string ExpertRecorder::dump() const {
  // Copy under the lock, format outside it: the engine commits passes while a large dump is written.
  Json w;
  std::vector<int64_t> counts;
  std::vector<double> sums;
  std::vector<PassRecord> passes;
  std::vector<PassRoutes> routes;
  RecordingMode mode;
  std::string stream_path;
  {
    std::lock_guard lock(mutex_);
    w = summary_locked();
    w["state"] = to_string(state_);
    mode = mode_;
    counts = counts_;
    sums = weight_sums_;
    passes = pass_records_;
    routes = token_routes_;
    if (token_stream_) stream_path = token_stream_->path().string();
  }
  w["layers"] = shape_.moe_layers;
  w["top_k"] = shape_.top_k;
  const size_t experts = static_cast<size_t>(shape_.num_experts);
  Json count_rows = Json::array(), sum_rows = Json::array();
  for (size_t m = 0; m < shape_.moe_layers.size(); ++m) {
    count_rows.push_back(std::vector<int64_t>(counts.begin() + m * experts, counts.begin() + (m + 1) * experts));
    sum_rows.push_back(std::vector<double>(sums.begin() + m * experts, sums.begin() + (m + 1) * experts));
  }
  w["counts"] = std::move(count_rows);
  w["weight_sums"] = std::move(sum_rows);
  if (mode == RecordingMode::PerPass) {
    Json records = Json::array();
    for (const PassRecord& r : passes) records.push_back(r.to_json(shape_.num_experts));
    w["records"] = std::move(records);
  }
  if (mode == RecordingMode::PerToken && !stream_path.empty()) w["records_path"] = stream_path;
  std::string text = w.dump();
  if (mode == RecordingMode::PerToken && stream_path.empty()) {
    // The records as a JSON array of the per_token lines, written by hand: there can be millions.
    text.pop_back();  // the closing brace
    text += ",\"records\":[";
    std::string lines;
    for (const PassRoutes& r : routes) r.append_jsonl(lines, rank_);
    for (char& c : lines)
      if (c == '\n') c = ',';
    if (!lines.empty()) lines.pop_back();
    text += lines;
    text += "]}";
  }
  return text;
}

Json ExpertRecorder::status() const {
  std::lock_guard lock(mutex_);
  return {{"rank", rank_},
          {"state", to_string(state_)},
          {"recording_mode", to_string(mode_)},
          {"num_passes", num_passes_},
          {"num_tokens", num_tokens_},
          {"num_records", num_records_locked()}};
}

std::vector<std::vector<int64_t>> ExpertRecorder::counts() const {
  std::lock_guard lock(mutex_);
  const size_t experts = static_cast<size_t>(shape_.num_experts);
  std::vector<std::vector<int64_t>> rows;
  for (size_t m = 0; m < shape_.moe_layers.size(); ++m)
    rows.emplace_back(counts_.begin() + m * experts, counts_.begin() + (m + 1) * experts);
  return rows;
}

}  // namespace moescope
