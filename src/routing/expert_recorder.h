#pragma once
// The expert distribution recorder (SPEC §3-§4): one per worker (rank), a RoutingSink the engine
// feeds, controlled from other threads (the HTTP server).
//
// States: idle -> configured -> recording -> stopped. configure() is refused while recording; start()
// clears the previous data (from idle it records in the default mode, stat); stop() keeps the data.
// A control call only changes what the next pass sees: the engine thread reads the state once at the
// start of a pass and commits the pass's data at its end, under one lock, only if no start() came in
// between. So a pass is recorded whole or not at all, and recording costs one lock per pass.
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "routing/jsonl_writer.h"
#include "routing/records.h"
#include "routing/routing_sink.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {

enum class RecordingMode { Stat, PerPass, PerToken };
enum class RecorderState { Idle, Configured, Recording, Stopped };

const char* to_string(RecordingMode mode);
const char* to_string(RecorderState state);
std::optional<RecordingMode> parse_recording_mode(std::string_view text);

// A control call refused in the recorder's current state; changes nothing.
class RecorderStateError : public Error {
 public:
  using Error::Error;
};

class ExpertRecorder final : public RoutingSink {
 public:
  explicit ExpertRecorder(RoutingShape shape, int rank = 0);

  // Control, from any thread. Each throws RecorderStateError with the reason when refused.
  void configure(RecordingMode mode);
  void start();
  void stop();
  // per_token records go to this writer as JSONL as they are made, instead of being kept in memory
  // (for long runs). Set it before start(); nullptr keeps them in memory.
  void stream_per_token(std::shared_ptr<JsonlWriter> writer);

  RecorderState state() const;
  RecordingMode mode() const;
  int64_t num_records() const;
  // The worker's entry of a summary dump (SPEC §3). Throws RecorderStateError if never started.
  Json summary() const;
  // The worker's full data as JSON text (it can be large). Throws RecorderStateError if never started.
  std::string dump() const;
  // For /expert_distribution_status.
  Json status() const;
  // Token->expert assignments per [moe layer][expert] of the current recording (every mode keeps them).
  std::vector<std::vector<int64_t>> counts() const;
  const RoutingShape& shape() const { return shape_; }
  int rank() const { return rank_; }

  // RoutingSink, on the engine thread.
  // A pass takes the recording's mode and epoch when it is asked for (wants_pass), so that what the
  // backend copies for it (counts_suffice: stat and per_pass need only per-expert totals) is what the
  // mode records, whatever control calls come while it runs.
  bool wants_pass() override;
  bool counts_suffice() const override { return pass_mode_ != RecordingMode::PerToken; }
  void begin_pass(const PassInfo& pass) override;
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                std::span<const float> topk_weights) override;
  void on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) override;
  void end_pass(const PassInfo& pass, double latency_seconds) override;

 private:
  void clear_data();                  // the *_locked functions need mutex_ held
  int64_t num_records_locked() const;
  Json summary_locked() const;

  const RoutingShape shape_;
  const int rank_;
  std::atomic<bool> recording_{false};

  // Guarded by mutex_: the state and everything committed.
  mutable std::mutex mutex_;
  RecorderState state_ = RecorderState::Idle;
  RecordingMode mode_ = RecordingMode::Stat;
  uint64_t epoch_ = 0;                       // bumped by every start()
  bool ever_started_ = false;
  std::vector<int64_t> counts_;              // [moe layers, num_experts] assignments
  std::vector<double> weight_sums_;          // [moe layers, num_experts] sum of routing weights
  int64_t num_passes_ = 0, num_tokens_ = 0;
  std::optional<PassRecord> first_pass_;     // the summary's sample_record
  std::vector<PassRecord> pass_records_;     // per_pass
  std::vector<PassRoutes> token_routes_;     // per_token, kept in memory
  int64_t num_token_records_ = 0;            // per_token records made (kept or streamed)
  std::shared_ptr<JsonlWriter> token_stream_;

  // Engine thread only: the pass in flight.
  bool pass_latched_ = false;                // wants_pass() took the mode and epoch for the coming pass
  uint64_t pass_epoch_ = 0;
  RecordingMode pass_mode_ = RecordingMode::Stat;
  std::vector<int64_t> pass_counts_;         // [moe layers, num_experts]
  std::vector<double> pass_weight_sums_;     // [moe layers, num_experts]
  ActivationCounter activation_;
  PassRoutes pass_routes_;
};

}  // namespace moescope
