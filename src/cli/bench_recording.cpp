#include "cli/bench_recording.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <random>
#include <unistd.h>

#include "engine/engine.h"
#include "routing/expert_recorder.h"
#include "routing/route_log.h"
#include "util/error.h"

namespace moescope::cli {
namespace {

struct Config {
  const char* name;
  std::optional<RecordingMode> mode;  // the recorder's mode, if it records
  const char* log_layers;             // the routing log's layers, if it logs
  bool pass_jsonl;                    // --expert-distribution-jsonl
};

const Config k_configs[] = {
    {"off", std::nullopt, nullptr, false},
    {"stat", RecordingMode::Stat, nullptr, false},
    {"per_pass", RecordingMode::PerPass, nullptr, false},
    {"per_token (all layers, in memory)", RecordingMode::PerToken, nullptr, false},
    {"routing log, layer 0", std::nullopt, "first", false},
    {"routing log, all layers", std::nullopt, "all", false},
    {"per-pass JSONL", std::nullopt, nullptr, true},
};

struct RunResult {
  double seconds = 0.0;        // wall time of the run, files closed
  double pass_seconds = 0.0;   // the engine's forward passes
  double hook_seconds = 0.0;   // engine-thread time in the routing hook (sinks and PassInfo)
  double writer_cpu = 0.0;     // CPU time of the JSONL writer threads
  std::vector<std::vector<int32_t>> outputs;
};

// Times what recording costs the engine thread directly: every sink call, and the building of the
// PassInfo where it is on the engine's path. The CPU backend builds it between wants_pass() and
// begin_pass(); the CUDA backend asks counts_suffice() first and builds it while the GPU runs the pass,
// so there the gap to begin_pass() is the pass itself and is not counted. Unlike the wall-clock
// comparison, this does not drown in the noise of a shared machine.
class TimedSink final : public RoutingSink {
 public:
  explicit TimedSink(RoutingSink* inner) : inner_(inner) {}
  mutable double seconds = 0.0;  // engine-thread time in the hook (counts_suffice() is const)
  bool wants_pass() override {
    const auto t0 = clock::now();
    const bool wanted = inner_->wants_pass();
    wanted_at_ = clock::now();
    asked_counts_ = false;
    seconds += since(t0, wanted_at_);
    return wanted;
  }
  bool counts_suffice() const override {
    const auto t0 = clock::now();
    const bool suffice = inner_->counts_suffice();
    asked_counts_ = true;
    seconds += since(t0, clock::now());
    return suffice;
  }
  void begin_pass(const PassInfo& pass) override {
    const auto t0 = clock::now();
    inner_->begin_pass(pass);
    seconds += since(asked_counts_ ? t0 : wanted_at_, clock::now());
  }
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> ids, std::span<const float> weights) override {
    const auto t0 = clock::now();
    inner_->on_layer(layer, num_tokens, top_k, ids, weights);
    seconds += since(t0, clock::now());
  }
  void on_counts(int layer, std::span<const int64_t> counts, std::span<const double> weight_sums) override {
    const auto t0 = clock::now();
    inner_->on_counts(layer, counts, weight_sums);
    seconds += since(t0, clock::now());
  }
  void end_pass(const PassInfo& pass, double latency) override {
    const auto t0 = clock::now();
    inner_->end_pass(pass, latency);
    seconds += since(t0, clock::now());
  }

 private:
  using clock = std::chrono::steady_clock;
  static double since(clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
  RoutingSink* inner_;
  clock::time_point wanted_at_;
  mutable bool asked_counts_ = false;
};

}  // namespace

Json bench_recording_overhead(const LoadedModel& model, Backend& backend, const OverheadOptions& o) {
  const ModelConfig& c = model.weights->config;
  const RoutingShape shape = routing_shape(c, model.name);
  const auto tmp = std::filesystem::temp_directory_path() / fmt::format("moescope-overhead-{}", ::getpid());
  std::filesystem::create_directories(tmp);
  std::mt19937 rng(99);
  std::uniform_int_distribution<int32_t> token(0, c.vocab_size - 1);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(o.prompts));
  for (auto& p : prompts)
    for (int i = 0; i < o.prompt_tokens; ++i) p.push_back(token(rng));

  auto run_once = [&](const Config& cfg) {
    std::unique_ptr<ExpertRecorder> recorder;
    std::unique_ptr<RouteLog> log;
    std::unique_ptr<PassLog> pass_log;
    SinkFanout sinks;
    if (cfg.mode) {
      recorder = std::make_unique<ExpertRecorder>(shape);
      recorder->configure(*cfg.mode);
      recorder->start();
      sinks.add(recorder.get());
    }
    if (cfg.log_layers) {
      const std::string layers = std::string(cfg.log_layers) == "first" ? std::to_string(shape.moe_layers[0]) : "all";
      log = std::make_unique<RouteLog>(RouteLogConfig{tmp / "routes.jsonl", layers}, shape);
      sinks.add(log.get());
    }
    if (cfg.pass_jsonl) {
      std::filesystem::remove(tmp / "passes.jsonl");
      pass_log = std::make_unique<PassLog>(tmp / "passes.jsonl", shape);
      sinks.add(pass_log.get());
    }
    TimedSink timed(&sinks);
    Engine engine(backend, EngineOptions{o.prompts, {}}, sinks.empty() ? nullptr : &timed);
    for (size_t i = 0; i < prompts.size(); ++i)
      engine.add_request({fmt::format("r{}", i), prompts[i], SamplingParams{}, o.max_tokens, true});
    RunResult result;
    const auto started = std::chrono::steady_clock::now();
    for (auto& out : engine.run_to_completion()) result.outputs.push_back(std::move(out.output_ids));
    // The files are part of the cost: the time runs until the last line is written.
    if (log) log->writer().close();
    if (pass_log) pass_log->writer().close();
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    result.pass_seconds = engine.timing().prefill_seconds + engine.timing().decode_seconds;
    result.hook_seconds = timed.seconds;
    if (log) result.writer_cpu += log->writer().stats().cpu_seconds;
    if (pass_log) result.writer_cpu += pass_log->writer().stats().cpu_seconds;
    return result;
  };

  run_once(k_configs[0]);  // warm-up: page in the weights
  const size_t n = std::size(k_configs);
  std::vector<std::vector<double>> seconds(n), ratios(n), hook_share(n), writer_share(n);
  std::vector<std::vector<int32_t>> reference;
  bool same_tokens = true;
  for (int r = 0; r < o.rounds; ++r) {
    std::vector<double> round(n);
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (k + static_cast<size_t>(r)) % n;  // rotate the order from round to round
      RunResult res = run_once(k_configs[i]);
      round[i] = res.seconds;
      hook_share[i].push_back(res.hook_seconds / res.pass_seconds);
      writer_share[i].push_back(res.writer_cpu / res.pass_seconds);
      if (reference.empty()) reference = res.outputs;
      same_tokens &= res.outputs == reference;
    }
    for (size_t i = 0; i < n; ++i) {
      seconds[i].push_back(round[i]);
      ratios[i].push_back(round[i] / round[0] - 1.0);
    }
  }
  std::filesystem::remove_all(tmp);

  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  fmt::print("\n== recording overhead: {} requests x ({} prompt + {} generated tokens), {} rounds interleaved ==\n", o.prompts,
             o.prompt_tokens, o.max_tokens, o.rounds);
  // Two measures. "wall": the median over rounds of each run's time against that round's "off" run, the
  // end-to-end figure, which interference on a shared machine blurs by several percent. "hook": the
  // engine-thread time spent in the routing hook (sink calls and PassInfo) over the forward passes'
  // time, measured inside the same runs: the direct cost on the critical path. "writer": CPU time of the
  // JSONL writer threads over the passes' time: work done beside the engine, on another core.
  fmt::print("{:<36} {:>10} {:>10} {:>22} {:>9} {:>9}\n", "configuration", "median s", "wall", "(min, max) per round", "hook",
             "writer");
  Json rows = Json::array();
  for (size_t i = 0; i < n; ++i) {
    const double med = median(seconds[i]);
    const double over = median(ratios[i]) * 100.0;
    const double hook = median(hook_share[i]) * 100.0, writer = median(writer_share[i]) * 100.0;
    const auto [lo, hi] = std::minmax_element(ratios[i].begin(), ratios[i].end());
    if (i == 0) fmt::print("{:<36} {:>10.4f} {:>10} {:>22} {:>8.3f}% {:>8.3f}%\n", k_configs[i].name, med, "-", "", hook, writer);
    else fmt::print("{:<36} {:>10.4f} {:>9.2f}% {:>22} {:>8.3f}% {:>8.3f}%\n", k_configs[i].name, med, over,
                    fmt::format("({:.2f}%, {:.2f}%)", *lo * 100.0, *hi * 100.0), hook, writer);
    rows.push_back({{"configuration", k_configs[i].name}, {"median_seconds", med}, {"overhead_percent_median", over},
                    {"overhead_percent_min", *lo * 100.0}, {"overhead_percent_max", *hi * 100.0},
                    {"hook_percent_of_pass_time", hook}, {"writer_cpu_percent_of_pass_time", writer}});
  }
  fmt::print("same tokens in every configuration: {}\n", same_tokens ? "yes" : "NO");
  if (!same_tokens) fail("recording changed the generated tokens");
  return {{"workload", {{"prompts", o.prompts}, {"prompt_tokens", o.prompt_tokens}, {"max_tokens", o.max_tokens}, {"rounds", o.rounds}}},
          {"rows", rows},
          {"same_tokens", same_tokens}};
}

}  // namespace moescope::cli
