// The expert recorder, the routing log and the per-pass JSONL: the routes they record are the routes
// transformers computes (fidelity), nothing is lost or counted twice (conservation), the state machine
// refuses what it should, and the files end whole on a full disk or a signal.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <fstream>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "model/make_model.h"
#include "routing/expert_recorder.h"
#include "routing/route_log.h"
#include "test_util.h"
#include "util/error.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

std::vector<Json> read_jsonl(const fs::path& path) {
  std::ifstream in(path);
  std::vector<Json> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(Json::parse(line));
  return lines;
}

// Route records (per_token records or route lines) of one request, as layer -> [token_idx][top_k].
std::map<int, test::CaptureSink::LayerRoutes> routes_of(const std::vector<Json>& records, const std::string& req_id) {
  std::map<int, std::map<int, std::pair<std::vector<int32_t>, std::vector<float>>>> by_layer;  // layer -> token -> route
  for (const Json& r : records) {
    if (r.value("type", "route") != "route" || r["req_id"] != req_id) continue;
    auto& slot = by_layer[r["layer"].get<int>()][r["token_idx"].get<int>()];
    EXPECT_TRUE(slot.first.empty()) << "token " << r["token_idx"] << " layer " << r["layer"] << " recorded twice";
    slot = {r["topk_ids"].get<std::vector<int32_t>>(), r["topk_weights"].get<std::vector<float>>()};
  }
  std::map<int, test::CaptureSink::LayerRoutes> out;
  for (auto& [layer, tokens] : by_layer) {
    int expected = 0;
    for (auto& [t, route] : tokens) {
      EXPECT_EQ(t, expected++) << "layer " << layer << ": token_idx not contiguous";
      out[layer].ids.push_back(route.first);
      out[layer].weights.push_back(route.second);
    }
  }
  return out;
}

// --- fidelity: every architecture's reference fixture --------------------------------------------------

class RecorderFidelity : public ::testing::TestWithParam<std::string> {};

TEST_P(RecorderFidelity, PerTokenRecordsAndRouteLogEqualTransformers) {
  const fs::path dir = test::reference_fixtures_dir() / GetParam();
  ASSERT_TRUE(fs::exists(dir / "reference.json")) << "missing reference fixtures in " << dir;
  const Json reference = read_json_file(dir / "reference.json");
  const LoadedModel m = load_model(dir);
  const RoutingShape shape = routing_shape(m.weights->config, m.name);
  test::TempDir tmp;

  ExpertRecorder recorder(shape);
  recorder.configure(RecordingMode::PerToken);
  recorder.start();
  RouteLog log({tmp / "routes.jsonl", "all"}, shape);
  SinkFanout sinks;
  sinks.add(&recorder);
  sinks.add(&log);

  // All prompts in one engine run: they share passes, and each is told apart by its req_id.
  cpu::CpuBackend backend(m.weights);
  Engine engine(backend, EngineOptions{}, &sinks);
  const Json& prompts = reference["prompts"];
  for (size_t p = 0; p < prompts.size(); ++p)
    engine.add_request({"r" + std::to_string(p), prompts[p]["prompt_ids"].get<std::vector<int32_t>>(), SamplingParams{}, 4, true});
  engine.run_to_completion();
  recorder.stop();
  log.writer().close();

  const Json dump = Json::parse(recorder.dump());
  const std::vector<Json> records = dump["records"].get<std::vector<Json>>();
  const std::vector<Json> log_lines = read_jsonl(tmp / "routes.jsonl");
  ASSERT_FALSE(log_lines.empty());
  EXPECT_EQ(log_lines[0]["type"], "meta");
  EXPECT_EQ(log_lines[0]["layers"].get<std::vector<int>>(), shape.moe_layers);
  int near_ties = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::string req = "r" + std::to_string(p);
    const size_t n = prompts[p]["prompt_ids"].size();
    test::expect_routes_equal(routes_of(records, req), prompts[p]["routes"], 0, n, GetParam() + " per_token " + req, &near_ties);
    test::expect_routes_equal(routes_of(log_lines, req), prompts[p]["routes"], 0, n, GetParam() + " routing log " + req, &near_ties);
  }
  std::printf("  %s: %d near-ties reported\n", GetParam().c_str(), near_ties);
}

INSTANTIATE_TEST_SUITE_P(Transformers, RecorderFidelity, ::testing::ValuesIn(test::reference_case_names()),
                         [](const auto& info) { return info.param; });

// --- a model to run --------------------------------------------------------------------------------

class RecorderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    Json config = make_model_config("qwen2_moe", "tiny");
    config["mlp_only_layers"] = {1};  // a dense layer among the MoE layers
    write_random_checkpoint(dir_->path(), config, 5);
    weights_ = std::make_shared<const ModelWeights>(ModelWeights::load(dir_->path()));
    shape_ = routing_shape(weights_->config, "tiny");
  }
  static void TearDownTestSuite() {
    weights_.reset();
    delete dir_;
  }

  // Runs `num_requests` requests of different lengths through the engine with the sink; returns the
  // number of passes and of tokens the passes computed.
  static std::pair<int64_t, int64_t> run(RoutingSink* sink, int num_requests, int max_tokens, int max_num_seqs = 4) {
    cpu::CpuBackend backend(weights_);
    Engine engine(backend, EngineOptions{max_num_seqs, {}}, sink);
    int64_t tokens = 0;
    for (int i = 0; i < num_requests; ++i) {
      std::vector<int32_t> prompt;
      for (int j = 0; j < 3 + i % 5; ++j) prompt.push_back((i * 31 + j * 7) % 500);
      tokens += static_cast<int64_t>(prompt.size()) + max_tokens - 1;  // the last sampled token is never fed back
      engine.add_request({fmt::format("q{}", i), prompt, SamplingParams{}, max_tokens, true});
    }
    engine.run_to_completion();
    return {engine.timing().passes, tokens};
  }

  static test::TempDir* dir_;
  static std::shared_ptr<const ModelWeights> weights_;
  static RoutingShape shape_;
};
test::TempDir* RecorderTest::dir_ = nullptr;
std::shared_ptr<const ModelWeights> RecorderTest::weights_;
RoutingShape RecorderTest::shape_;

TEST_F(RecorderTest, ShapeSkipsTheDenseLayer) {
  EXPECT_EQ(shape_.moe_layers, (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(shape_.moe_index(1), -1);
  EXPECT_EQ(shape_.moe_index(2), 1);
}

// --- conservation ------------------------------------------------------------------------------------

TEST_F(RecorderTest, StatCountsEqualTokensTimesTopKInEveryLayer) {
  ExpertRecorder recorder(shape_);
  recorder.configure(RecordingMode::Stat);
  recorder.start();
  const auto [passes, tokens] = run(&recorder, 6, 5);
  recorder.stop();
  for (const auto& layer : recorder.counts()) {
    int64_t sum = 0;
    for (int64_t c : layer) sum += c;
    EXPECT_EQ(sum, tokens * shape_.top_k);
  }
  const Json s = recorder.summary();
  EXPECT_EQ(s["num_records"], passes);
  EXPECT_EQ(s["num_tokens"], tokens);
  EXPECT_EQ(s["num_layers"], 3);
  // The weight sums of one layer add up to the sum of every token's top-k weights: at most 1 each.
  const Json dump = Json::parse(recorder.dump());
  for (const auto& row : dump["weight_sums"]) {
    double sum = 0.0;
    for (double w : row) sum += w;
    EXPECT_GT(sum, 0.0);
    EXPECT_LE(sum, static_cast<double>(tokens) + 1e-6);
  }
}

TEST_F(RecorderTest, PerTokenHasTokensTimesMoeLayersRecordsAndPerPassOneRecordPerPass) {
  ExpertRecorder per_token(shape_), per_pass(shape_);
  per_token.configure(RecordingMode::PerToken);
  per_pass.configure(RecordingMode::PerPass);
  per_token.start();
  per_pass.start();
  SinkFanout sinks;
  sinks.add(&per_token);
  sinks.add(&per_pass);
  const auto [passes, tokens] = run(&sinks, 7, 6, 3);
  EXPECT_EQ(per_token.num_records(), tokens * 3);
  EXPECT_EQ(per_pass.num_records(), passes);
  const Json dump = Json::parse(per_pass.dump());
  ASSERT_EQ(dump["records"].size(), static_cast<size_t>(passes));
  int64_t id = -1, summed_tokens = 0;
  for (const Json& r : dump["records"]) {
    EXPECT_GT(r["forward_pass_id"].get<int64_t>(), id) << "pass ids increase";
    id = r["forward_pass_id"].get<int64_t>();
    summed_tokens += r["num_tokens"].get<int64_t>();
    EXPECT_EQ(r["activated_experts"].size(), 3u);
  }
  EXPECT_EQ(summed_tokens, tokens);
  const Json token_dump = Json::parse(per_token.dump());
  EXPECT_EQ(token_dump["records"].size(), static_cast<size_t>(tokens * 3));
}

TEST_F(RecorderTest, ThousandsOfPassesThroughTinyQueuesLoseNothing) {
  test::TempDir tmp;
  ExpertRecorder recorder(shape_);
  auto stream = std::make_shared<JsonlWriter>(tmp / "tokens.jsonl", false, /*capacity=*/1);
  recorder.stream_per_token(stream);
  recorder.configure(RecordingMode::PerToken);
  recorder.start();
  RouteLog log({tmp / "routes.jsonl", "0,3"}, shape_, /*queue_capacity=*/1);
  PassLog passes_log(tmp / "passes.jsonl", shape_, 0, /*queue_capacity=*/1);
  SinkFanout sinks;
  sinks.add(&recorder);
  sinks.add(&log);
  sinks.add(&passes_log);
  // 60 requests of 40 tokens, 2 at a time: well over a thousand passes.
  const auto [passes, tokens] = run(&sinks, 60, 40, 2);
  ASSERT_GT(passes, 1000);
  recorder.stop();
  stream->close();
  log.writer().close();
  passes_log.writer().close();
  EXPECT_EQ(static_cast<int64_t>(read_jsonl(tmp / "tokens.jsonl").size()), tokens * 3);
  EXPECT_EQ(static_cast<int64_t>(read_jsonl(tmp / "routes.jsonl").size()), 1 + tokens * 2);  // meta + 2 layers
  const auto pass_lines = read_jsonl(tmp / "passes.jsonl");
  ASSERT_EQ(static_cast<int64_t>(pass_lines.size()), passes);
  for (size_t i = 0; i < pass_lines.size(); ++i) EXPECT_EQ(pass_lines[i]["forward_pass_id"], static_cast<int64_t>(i));
  std::printf("  %ld passes, %ld tokens; producer waits: tokens %ld, routes %ld, passes %ld\n", static_cast<long>(passes),
              static_cast<long>(tokens), static_cast<long>(stream->stats().producer_waits),
              static_cast<long>(log.writer().stats().producer_waits), static_cast<long>(passes_log.writer().stats().producer_waits));
}

// --- per-pass figures, by hand ----------------------------------------------------------------------

TEST_F(RecorderTest, PassFiguresByHand) {
  // A mixed pass of 3 tokens (a 2-token prefill of "a", a decode of "b") over MoE layers 0, 2, 3 of
  // 8 experts, top-2. Distinct experts: layer 0 {1,2,5} = 3, layer 2 {0} = 1... (see each line).
  ExpertRecorder recorder(shape_);
  recorder.configure(RecordingMode::PerPass);
  recorder.start();
  PassInfo pass{7, ForwardMode::Mixed, 2, 3, 2 + 9, {"a", "b"}, {0, 0, 1}, {0, 1, 8}};
  recorder.begin_pass(pass);
  const std::vector<float> w = {0.5f, 0.25f, 0.5f, 0.25f, 0.5f, 0.25f};
  const std::vector<int32_t> l0 = {1, 2, 2, 5, 1, 5};  // {1, 2, 5}: 3
  const std::vector<int32_t> l2 = {0, 7, 7, 0, 0, 7};  // {0, 7}: 2
  const std::vector<int32_t> l3 = {3, 4, 5, 6, 7, 0};  // 6 distinct
  recorder.on_layer(0, 3, 2, l0, w);
  recorder.on_layer(2, 3, 2, l2, w);
  recorder.on_layer(3, 3, 2, l3, w);
  recorder.end_pass(pass, 0.25);
  const Json r = Json::parse(recorder.dump())["records"].at(0);
  EXPECT_EQ(r["forward_pass_id"], 7);
  EXPECT_EQ(r["forward_mode"], "mixed");
  EXPECT_EQ(r["batch_size"], 2);
  EXPECT_EQ(r["num_tokens"], 3);
  EXPECT_EQ(r["seq_lens_sum"], 11);
  EXPECT_EQ(r["latency"], 0.25);
  EXPECT_EQ(r["activated_experts"].get<std::vector<int>>(), (std::vector<int>{3, 2, 6}));
  EXPECT_EQ(r["total_activated_experts"], 11);
  EXPECT_DOUBLE_EQ(r["avg_activated_per_layer"].get<double>(), 11.0 / 3.0);
  EXPECT_DOUBLE_EQ(r["expert_utilization"].get<double>(), 11.0 / 3.0 / 8.0);
  EXPECT_DOUBLE_EQ(r["expert_activation"].get<double>(), 11.0 / 3.0);
  const Json sample = recorder.summary()["sample_record"];
  EXPECT_EQ(sample["total_activated_experts"], 11.0);
  EXPECT_EQ(sample.size(), 5u);
  // Layer 0 counts: expert 1 twice, 2 twice, 5 twice; weights 0.5+0.5, 0.25+0.5, 0.25+0.25.
  const Json dump = Json::parse(recorder.dump());
  EXPECT_EQ(dump["counts"][0].get<std::vector<int64_t>>(), (std::vector<int64_t>{0, 2, 2, 0, 0, 2, 0, 0}));
  EXPECT_EQ(dump["weight_sums"][0][1], 1.0);
  EXPECT_EQ(dump["weight_sums"][0][2], 0.75);
  EXPECT_EQ(dump["weight_sums"][0][5], 0.5);
}

// A backend that keeps per-expert totals on the device (the CUDA backend) hands counts-only sinks
// on_counts instead of on_layer: this stands in for it, tallying each layer's routes with a loop of its own.
class TallyingBackendSink final : public RoutingSink {
 public:
  TallyingBackendSink(RoutingSink* inner, int num_experts) : inner_(inner), num_experts_(num_experts) {}
  bool wants_pass() override { return inner_->wants_pass(); }
  bool counts_suffice() const override { return inner_->counts_suffice(); }
  void begin_pass(const PassInfo& pass) override { inner_->begin_pass(pass); }
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> ids, std::span<const float> weights) override {
    if (!inner_->counts_suffice()) {
      inner_->on_layer(layer, num_tokens, top_k, ids, weights);
      return;
    }
    std::vector<int64_t> counts(static_cast<size_t>(num_experts_), 0);
    std::vector<double> sums(static_cast<size_t>(num_experts_), 0.0);
    for (size_t i = 0; i < static_cast<size_t>(num_tokens) * top_k; ++i) {
      ++counts[static_cast<size_t>(ids[i])];
      sums[static_cast<size_t>(ids[i])] += weights[i];
    }
    ++counts_calls;
    inner_->on_counts(layer, counts, sums);
  }
  void end_pass(const PassInfo& pass, double latency) override { inner_->end_pass(pass, latency); }
  int counts_calls = 0;

 private:
  RoutingSink* inner_;
  int num_experts_;
};

TEST_F(RecorderTest, CountsPathRecordsWhatTheRoutesPathRecords) {
  // stat and per_pass need only per-expert totals; per_token needs the routes. Each mode, and the
  // per-pass JSONL, record the same through on_counts as through on_layer.
  for (RecordingMode mode : {RecordingMode::Stat, RecordingMode::PerPass, RecordingMode::PerToken}) {
    SCOPED_TRACE(to_string(mode));
    test::TempDir tmp;
    ExpertRecorder by_routes(shape_), by_counts(shape_);
    PassLog log_routes(tmp / "routes_path.jsonl", shape_), log_counts(tmp / "counts_path.jsonl", shape_);
    for (ExpertRecorder* r : {&by_routes, &by_counts}) {
      r->configure(mode);
      r->start();
    }
    EXPECT_TRUE(by_counts.wants_pass());
    EXPECT_EQ(by_counts.counts_suffice(), mode != RecordingMode::PerToken);
    SinkFanout routes_sinks, counts_sinks;
    routes_sinks.add(&by_routes);
    routes_sinks.add(&log_routes);
    counts_sinks.add(&by_counts);
    counts_sinks.add(&log_counts);
    TallyingBackendSink tallying(&counts_sinks, shape_.num_experts);
    run(&routes_sinks, 5, 4);
    run(&tallying, 5, 4);
    EXPECT_EQ(tallying.counts_calls > 0, mode != RecordingMode::PerToken);  // the fanout asks every sink
    for (ExpertRecorder* r : {&by_routes, &by_counts}) r->stop();
    log_routes.writer().close();
    log_counts.writer().close();
    Json a = Json::parse(by_routes.dump()), b = Json::parse(by_counts.dump());
    EXPECT_EQ(a["counts"], b["counts"]);
    EXPECT_EQ(a["weight_sums"], b["weight_sums"]);
    if (mode == RecordingMode::PerPass) {
      ASSERT_EQ(a["records"].size(), b["records"].size());
      for (size_t i = 0; i < a["records"].size(); ++i)
        EXPECT_EQ(a["records"][i]["activated_experts"], b["records"][i]["activated_experts"]) << "pass " << i;
    }
    const auto la = read_jsonl(tmp / "routes_path.jsonl"), lb = read_jsonl(tmp / "counts_path.jsonl");
    ASSERT_EQ(la.size(), lb.size());
    ASSERT_FALSE(la.empty());
    for (size_t i = 0; i < la.size(); ++i) EXPECT_EQ(la[i]["activated_experts"], lb[i]["activated_experts"]) << "line " << i;
  }
}

// --- the state machine ------------------------------------------------------------------------------

TEST_F(RecorderTest, StateMachineRefusesWhatItShouldAndChangesNothing) {
  ExpertRecorder recorder(shape_);
  EXPECT_EQ(recorder.state(), RecorderState::Idle);
  EXPECT_THROW(recorder.summary(), RecorderStateError);  // never started
  EXPECT_THROW(recorder.dump(), RecorderStateError);
  EXPECT_THROW(recorder.stop(), RecorderStateError);
  EXPECT_FALSE(recorder.wants_pass());
  recorder.start();  // from idle: the default mode
  EXPECT_EQ(recorder.mode(), RecordingMode::Stat);
  EXPECT_THROW(recorder.configure(RecordingMode::PerToken), RecorderStateError);
  EXPECT_EQ(recorder.mode(), RecordingMode::Stat);
  EXPECT_THROW(recorder.start(), RecorderStateError);
  run(&recorder, 2, 3);
  const int64_t recorded = recorder.num_records();
  EXPECT_GT(recorded, 0);
  recorder.stop();
  EXPECT_EQ(recorder.state(), RecorderState::Stopped);
  run(&recorder, 2, 3);  // stopped: nothing more is recorded
  EXPECT_EQ(recorder.num_records(), recorded);
  recorder.configure(RecordingMode::PerPass);
  EXPECT_EQ(recorder.num_records(), 0);  // per_pass has no records yet; the stat data is still there
  recorder.start();  // clears the previous data
  EXPECT_EQ(Json::parse(recorder.dump())["counts"][0][0], 0);
  EXPECT_EQ(recorder.state(), RecorderState::Recording);
  EXPECT_EQ(parse_recording_mode("per_token"), RecordingMode::PerToken);
  EXPECT_EQ(parse_recording_mode("bogus"), std::nullopt);
}

TEST_F(RecorderTest, ControlFromAnotherThreadWhileTheEngineRuns) {
  // The server's pattern: control calls and dumps race the engine thread. Every recording that a
  // dump sees is whole: stat counts are tokens x top_k in every layer. (Run under TSan in CI.)
  ExpertRecorder recorder(shape_);
  std::atomic<bool> done{false};
  std::thread control([&] {
    const RecordingMode modes[] = {RecordingMode::Stat, RecordingMode::PerPass, RecordingMode::PerToken};
    for (int i = 0; !done.load(); ++i) {
      try {
        recorder.configure(modes[i % 3]);
        recorder.start();
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        const Json d = Json::parse(recorder.dump());
        for (const auto& row : d["counts"]) {
          int64_t sum = 0;
          for (int64_t c : row) sum += c;
          EXPECT_EQ(sum, d["num_tokens"].get<int64_t>() * shape_.top_k);
        }
        recorder.stop();
      } catch (const RecorderStateError& e) {
        ADD_FAILURE() << e.what();
      }
    }
  });
  run(&recorder, 20, 20, 3);
  done = true;
  control.join();
}

// --- routing log configuration ------------------------------------------------------------------------

TEST_F(RecorderTest, LayerSelectionAcceptsListsAndAllAndNamesBadEntries) {
  EXPECT_EQ(parse_layer_selection("0", shape_), (std::vector<int>{0}));
  EXPECT_EQ(parse_layer_selection("3, 0,3", shape_), (std::vector<int>{0, 3}));
  EXPECT_EQ(parse_layer_selection("all", shape_), (std::vector<int>{0, 2, 3}));
  auto message = [&](const std::string& text) {
    try {
      parse_layer_selection(text, shape_);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("1").find("layer 1 is a dense layer (MoE layers: 0,2,3)"), std::string::npos) << message("1");
  EXPECT_NE(message("9").find("out of range"), std::string::npos);
  EXPECT_NE(message("x").find("\"x\" is not a layer index"), std::string::npos);
  EXPECT_NE(message("0,,2").find("\"\" is not a layer index"), std::string::npos);
}

TEST_F(RecorderTest, EnvironmentTurnsTheLogOnWithVllmAliases) {
  ::unsetenv("MOESCOPE_LOG_MOE");
  ::unsetenv("MOESCOPE_LOG_MOE_LAYER");
  ::unsetenv("VLLM_LOG_MOE");
  ::unsetenv("VLLM_LOG_MOE_LAYER");
  EXPECT_FALSE(route_log_config_from_env().has_value());
  ::setenv("VLLM_LOG_MOE", "/tmp/v.jsonl", 1);
  ::setenv("VLLM_LOG_MOE_LAYER", "all", 1);
  auto c = route_log_config_from_env();
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->path, "/tmp/v.jsonl");
  EXPECT_EQ(c->layers, "all");
  ::setenv("MOESCOPE_LOG_MOE", "/tmp/m.jsonl", 1);  // ours win over the aliases
  EXPECT_EQ(route_log_config_from_env()->path, "/tmp/m.jsonl");
  ::unsetenv("MOESCOPE_LOG_MOE");
  ::unsetenv("VLLM_LOG_MOE");
  EXPECT_THROW(route_log_config_from_env(), Error);  // a layer list without a file
  ::unsetenv("VLLM_LOG_MOE_LAYER");
}

// --- files: bad paths, a full disk ----------------------------------------------------------------------

TEST(JsonlWriter, UnwritablePathIsAnErrorAtOnce) {
  try {
    JsonlWriter w("/nonexistent-dir/x.jsonl", false);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/x.jsonl: cannot open for writing"), std::string::npos) << e.what();
  }
}

TEST(JsonlWriter, AFullDiskStopsTheWriterAndLeavesWholeLines) {
  // A child process whose files may not grow past 3000 bytes stands in for a full disk.
  test::TempDir tmp;
  const fs::path path = tmp / "full.jsonl";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{3000, 3000};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    JsonlWriter w(path, false, 4);
    int pushed = 0;
    for (int i = 0; i < 1000; ++i) pushed += w.push_line(fmt::format("{{\"i\":{},\"pad\":\"{}\"}}", i, std::string(40, 'x')));
    w.close();
    const bool ok = w.failed() && w.error().find("write failed") != std::string::npos && pushed < 1000;
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the writer did not report the failure";
  const std::string text = read_text_file(path);
  ASSERT_FALSE(text.empty());
  EXPECT_LE(text.size(), 3000u);
  EXPECT_EQ(text.back(), '\n') << "the file must end with a whole line";
  EXPECT_NO_THROW(read_jsonl(path));
}

// --- the CLI ------------------------------------------------------------------------------------------

TEST_F(RecorderTest, GenerateRecordsFromTheCommandLine) {
  test::TempDir tmp;
  const std::string model = dir_->path().string();
  auto r = test::run_moescope("generate " + model + " --prompt-ids 1,2,3,4 --max-tokens 6 --ignore-eos --expert-distribution-jsonl " +
                              (tmp / "passes.jsonl").string() + " --expert-distribution-recorder-mode per_pass --expert-distribution-dump " +
                              (tmp / "dump.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto passes = read_jsonl(tmp / "passes.jsonl");
  EXPECT_EQ(passes.size(), 6u);  // one prefill, five decodes
  EXPECT_EQ(passes[0]["forward_mode"], "prefill");
  EXPECT_EQ(passes[1]["forward_mode"], "decode");
  const Json dump = read_json_file(tmp / "dump.json");
  EXPECT_EQ(dump["records"].size(), 6u);

  r = test::run_moescope("generate " + model + " --prompt-ids 1,2,3 --max-tokens 2 --expert-distribution-recorder-mode per_token --expert-distribution-dump " +
                         (tmp / "tokens.jsonl").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto tokens = read_jsonl(tmp / "tokens.jsonl");
  ASSERT_EQ(tokens.size(), 1 + 4u * 3u);  // meta, then (3 prompt + 1 decoded) tokens x 3 MoE layers
  EXPECT_EQ(tokens[0]["type"], "meta");
  EXPECT_EQ(tokens[1]["forward_pass_id"], 0);

  r = test::run_moescope("generate " + model + " --prompt-ids 1 --expert-distribution-jsonl /nonexistent-dir/p.jsonl");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("error: /nonexistent-dir/p.jsonl: cannot open for writing"), std::string::npos) << r.output;
}

TEST_F(RecorderTest, RoutingLogFromTheEnvironment) {
  test::TempDir tmp;
  const std::string model = dir_->path().string();
  const std::string env = "MOESCOPE_LOG_MOE=" + (tmp / "routes.jsonl").string() + " MOESCOPE_LOG_MOE_LAYER=";
  auto r = test::run_command(env + "0,3 " + test::binary().string() + " generate " + model + " --prompt-ids 5,6,7 --max-tokens 3 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto lines = read_jsonl(tmp / "routes.jsonl");
  ASSERT_EQ(lines.size(), 1 + 5u * 2u);  // meta, then (3 prompt + 2 decoded) tokens x 2 layers
  EXPECT_EQ(lines[0]["layers"].get<std::vector<int>>(), (std::vector<int>{0, 3}));
  EXPECT_EQ(lines[0]["num_experts"], 8);
  EXPECT_EQ(lines[1]["req_id"], "r0");
  EXPECT_EQ(lines[1]["token_idx"], 0);
  EXPECT_EQ(lines[1]["layer"], 0);
  EXPECT_EQ(lines[2]["layer"], 3);

  r = test::run_command(env + "1 " + test::binary().string() + " generate " + model + " --prompt-ids 5");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("layer 1 is a dense layer"), std::string::npos) << r.output;
}

TEST_F(RecorderTest, SigintStopsBetweenPassesAndEveryFileEndsWhole) {
  test::TempDir tmp;
  const std::string cmd = "MOESCOPE_LOG_MOE=" + (tmp / "routes.jsonl").string() + " MOESCOPE_LOG_MOE_LAYER=all exec " +
                          test::binary().string() + " generate " + dir_->path().string() +
                          " --prompt-ids 1,2,3 --max-tokens 4000 --ignore-eos --expert-distribution-jsonl " + (tmp / "passes.jsonl").string();
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for the run to be under way (the per-pass file grows), then interrupt it.
  for (int i = 0; i < 200 && (!fs::exists(tmp / "passes.jsonl") || fs::file_size(tmp / "passes.jsonl") < 2000); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  for (const char* name : {"routes.jsonl", "passes.jsonl"}) {
    const std::string text = read_text_file(tmp / name);
    ASSERT_FALSE(text.empty()) << name;
    EXPECT_EQ(text.back(), '\n') << name;
    EXPECT_NO_THROW(read_jsonl(tmp / name)) << name;
  }
  const size_t passes = read_jsonl(tmp / "passes.jsonl").size();
  EXPECT_LT(passes, 4000u) << "the run was not interrupted";
  // Every pass that ran is in both files: 3 prompt tokens, then one token per decode, 3 MoE layers.
  EXPECT_EQ(read_jsonl(tmp / "routes.jsonl").size(), 1 + (3 + (passes - 1)) * 3);
}

}  // namespace
}  // namespace moescope
