// The engine and the CPU backend agree with themselves across batching: a sequence gets bit-identical
// logits and tokens whether it runs alone or beside others, prefilled at once or token by token.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "model/make_model.h"
#include "test_util.h"
#include "util/error.h"

namespace moescope {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    write_random_checkpoint(dir_->path(), make_model_config("qwen2_moe", "tiny"), 11);
    weights_ = std::make_shared<const ModelWeights>(ModelWeights::load(dir_->path()));
  }
  static void TearDownTestSuite() {
    weights_.reset();
    delete dir_;
  }
  static test::TempDir* dir_;
  static std::shared_ptr<const ModelWeights> weights_;
};
test::TempDir* EngineTest::dir_ = nullptr;
std::shared_ptr<const ModelWeights> EngineTest::weights_;

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, static_cast<double>(std::fabs(a[i] - b[i])));
  return d;
}

TEST_F(EngineTest, PrefillAtOnceEqualsTokenByToken) {
  const std::vector<int32_t> prompt = {5, 17, 300, 42, 7, 99, 256, 1, 3, 480};
  cpu::CpuBackend backend(weights_);
  std::vector<float> at_once, step;
  Batch batch;
  batch.sequences.push_back({backend.create_cache(), 0, prompt, "a"});
  backend.forward(batch, nullptr, at_once);

  const int cache = backend.create_cache();
  for (size_t i = 0; i < prompt.size(); ++i) {
    Batch one;
    one.sequences.push_back({cache, static_cast<int32_t>(i), std::span<const int32_t>(&prompt[i], 1), "b"});
    backend.forward(one, nullptr, step);
  }
  // The kernels are batch-invariant (tests/kernels_test.cpp), so the logits are bit-identical.
  EXPECT_EQ(max_abs_diff(at_once, step), 0.0);
}

TEST_F(EngineTest, MixedBatchEqualsEachSequenceAlone) {
  // Sequence b decodes while sequence a is prefilled in the same pass.
  const std::vector<int32_t> a = {9, 8, 7, 6, 5, 4, 3};
  const std::vector<int32_t> b = {100, 200, 300};
  cpu::CpuBackend backend(weights_);
  std::vector<float> alone_a, alone_b, mixed;
  {
    Batch batch;
    batch.sequences.push_back({backend.create_cache(), 0, a, "a"});
    backend.forward(batch, nullptr, alone_a);
    const int cb = backend.create_cache();
    Batch pb;
    pb.sequences.push_back({cb, 0, std::span<const int32_t>(b.data(), 2), "b"});
    backend.forward(pb, nullptr, mixed);
    Batch db;
    db.sequences.push_back({cb, 2, std::span<const int32_t>(b.data() + 2, 1), "b"});
    backend.forward(db, nullptr, alone_b);
  }
  const int ca = backend.create_cache(), cb = backend.create_cache();
  Batch pb;
  pb.sequences.push_back({cb, 0, std::span<const int32_t>(b.data(), 2), "b"});
  backend.forward(pb, nullptr, mixed);
  Batch batch;
  batch.sequences.push_back({ca, 0, a, "a"});
  batch.sequences.push_back({cb, 2, std::span<const int32_t>(b.data() + 2, 1), "b"});
  test::CaptureSink sink;
  backend.forward(batch, &sink, mixed);
  const size_t vocab = static_cast<size_t>(weights_->config.vocab_size);
  ASSERT_EQ(mixed.size(), 2 * vocab);
  EXPECT_EQ(max_abs_diff(std::vector<float>(mixed.begin(), mixed.begin() + vocab), alone_a), 0.0);
  EXPECT_EQ(max_abs_diff(std::vector<float>(mixed.begin() + vocab, mixed.end()), alone_b), 0.0);
  ASSERT_EQ(sink.passes.size(), 1u);
  const PassInfo& pass = sink.passes[0];
  EXPECT_EQ(pass.forward_mode, ForwardMode::Mixed);
  EXPECT_EQ(pass.batch_size, 2);
  EXPECT_EQ(pass.num_tokens, 8);
  EXPECT_EQ(pass.seq_lens_sum, 7 + 3);
  EXPECT_EQ(pass.token_pos, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 2}));
  EXPECT_EQ(pass.token_seq, (std::vector<int32_t>{0, 0, 0, 0, 0, 0, 0, 1}));
  // Every MoE layer saw all 8 tokens.
  for (const auto& [layer, routes] : sink.routes) EXPECT_EQ(routes.ids.size(), 8u) << "layer " << layer;
  EXPECT_EQ(sink.routes.size(), static_cast<size_t>(weights_->config.num_moe_layers()));
}

TEST_F(EngineTest, ContinuousBatchingGivesEachRequestItsSoloTokens) {
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {50, 60, 70, 80, 90, 100, 110}, {400}, {7, 7, 7, 7}};
  std::vector<std::vector<int32_t>> solo;
  for (const auto& p : prompts) {
    cpu::CpuBackend backend(weights_);
    Engine engine(backend, EngineOptions{});
    engine.add_request({"solo", p, SamplingParams{}, 12, true});
    solo.push_back(engine.run_to_completion().at(0).output_ids);
  }
  // max_num_seqs 2: requests wait, then join running decodes between passes.
  cpu::CpuBackend backend(weights_);
  test::CaptureSink sink;
  Engine engine(backend, EngineOptions{2, {}}, &sink);
  std::map<std::string, std::vector<int32_t>> got;
  for (size_t i = 0; i < prompts.size(); ++i)
    engine.add_request({"r" + std::to_string(i), prompts[i], SamplingParams{}, 12 - static_cast<int>(i) * 2, true});
  while (engine.has_work())
    for (auto& out : engine.step()) got[out.req_id] = out.output_ids;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& ids = got.at("r" + std::to_string(i));
    ASSERT_EQ(ids.size(), 12 - i * 2);
    EXPECT_EQ(ids, std::vector<int32_t>(solo[i].begin(), solo[i].begin() + static_cast<std::ptrdiff_t>(ids.size()))) << i;
  }
  bool saw_mixed = false;
  for (const auto& pass : sink.passes) {
    EXPECT_LE(pass.batch_size, 2);
    saw_mixed |= pass.forward_mode == ForwardMode::Mixed;
  }
  EXPECT_TRUE(saw_mixed) << "a waiting request should have joined running decodes";
}

TEST_F(EngineTest, EosEndsARequestWithReasonStop) {
  cpu::CpuBackend backend(weights_);
  Engine probe(backend, EngineOptions{});
  probe.add_request({"p", {1, 2, 3}, SamplingParams{}, 6, true});
  const auto free_run = probe.run_to_completion().at(0).output_ids;
  ASSERT_EQ(free_run.size(), 6u);
  // Declare the 4th greedy token an end-of-sequence id: generation stops before it.
  Engine engine(backend, EngineOptions{8, {free_run[3]}});
  engine.add_request({"e", {1, 2, 3}, SamplingParams{}, 6, false});
  const auto out = engine.run_to_completion().at(0);
  EXPECT_EQ(out.finish_reason, "stop");
  const auto first_eos = std::find(free_run.begin(), free_run.end(), free_run[3]) - free_run.begin();
  EXPECT_EQ(out.output_ids, std::vector<int32_t>(free_run.begin(), free_run.begin() + first_eos));
}

TEST_F(EngineTest, BadRequestsAreRejected) {
  cpu::CpuBackend backend(weights_);
  Engine engine(backend, EngineOptions{});
  EXPECT_THROW(engine.add_request({"x", {}, SamplingParams{}, 4, false}), Error);
  EXPECT_THROW(engine.add_request({"x", {1, 512}, SamplingParams{}, 4, false}), Error);  // vocab is 512
  EXPECT_THROW(engine.add_request({"x", {1, -1}, SamplingParams{}, 4, false}), Error);
  EXPECT_THROW(engine.add_request({"x", {1}, SamplingParams{}, 0, false}), Error);
  EXPECT_FALSE(engine.has_work());
}

TEST_F(EngineTest, KvBudgetPreemptsAndRecomputesToTheSameTokens) {
  // 4 requests that need 10 + 20 tokens each, in a cache of 64 tokens (8 blocks of 8): they cannot all
  // run at once, so the newest are preempted and recomputed; every request still gets its solo tokens.
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {11, 12, 13, 14, 15, 16, 17, 18, 19, 20},
                                                     {21, 22, 23, 24, 25, 26, 27, 28, 29, 30}, {31, 32, 33, 34, 35, 36, 37, 38, 39, 40}};
  std::vector<std::vector<int32_t>> solo;
  for (const auto& p : prompts) {
    cpu::CpuBackend backend(weights_);
    Engine engine(backend, EngineOptions{});
    engine.add_request({"solo", p, SamplingParams{}, 20, true});
    solo.push_back(engine.run_to_completion().at(0).output_ids);
  }
  cpu::CpuBackend backend(weights_);
  Engine engine(backend, EngineOptions{8, {}, /*kv_cache_tokens=*/64, /*block_size=*/8});
  EXPECT_EQ(engine.kv_blocks_total(), 8);
  for (size_t i = 0; i < prompts.size(); ++i) engine.add_request({"r" + std::to_string(i), prompts[i], SamplingParams{}, 20, true});
  int64_t max_used = 0;
  std::vector<RequestOutput> outs;
  while (engine.has_work()) {
    for (auto& o : engine.step()) outs.push_back(std::move(o));
    max_used = std::max(max_used, engine.kv_blocks_used());
    EXPECT_LE(engine.kv_blocks_used(), 8);
  }
  EXPECT_GT(engine.timing().preemptions, 0);
  EXPECT_EQ(engine.kv_blocks_used(), 0);
  ASSERT_EQ(outs.size(), prompts.size());
  for (const auto& o : outs) EXPECT_EQ(o.output_ids, solo[std::stoi(o.req_id.substr(1))]) << o.req_id;
  std::printf("  preemptions %ld, max blocks used %ld of 8\n", static_cast<long>(engine.timing().preemptions), static_cast<long>(max_used));
}

// A CPU backend that holds a fixed cache as a GPU's does: 8 blocks of 4 tokens, each sequence taking
// ceil(tokens / 4) of them; a pass that would need more than are free throws, as the CUDA backend does.
class FixedCacheBackend final : public Backend {
 public:
  explicit FixedCacheBackend(std::shared_ptr<const ModelWeights> w) : cpu_(std::move(w)) {}
  const ModelConfig& config() const override { return cpu_.config(); }
  int create_cache() override {
    const int id = cpu_.create_cache();
    blocks_[id] = 0;
    return id;
  }
  void free_cache(int id) override {
    used_ -= blocks_.at(id);
    blocks_.erase(id);
    cpu_.free_cache(id);
  }
  void forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) override {
    for (const BatchSequence& s : batch.sequences) {
      const int64_t need = (s.start_pos + static_cast<int64_t>(s.tokens.size()) + 3) / 4;
      used_ += need - blocks_.at(s.cache_id);
      blocks_.at(s.cache_id) = need;
    }
    max_used_ = std::max(max_used_, used_);
    if (used_ > 8) fail("fixed cache full: {} of 8 blocks", used_);
    cpu_.forward(batch, sink, logits);
  }
  KvCapacity kv_capacity() const override { return {8, 4}; }
  int64_t max_used() const { return max_used_; }

 private:
  cpu::CpuBackend cpu_;
  std::map<int, int64_t> blocks_;
  int64_t used_ = 0, max_used_ = 0;
};

TEST_F(EngineTest, BackendWithAFixedCacheSetsTheBudgetAndIsNeverOverfilled) {
  // The options ask for blocks of 16 and no budget: the backend's 8 blocks of 4 tokens win. Three
  // requests of 6 + 12 tokens need 5 blocks each, so they cannot all run at once.
  FixedCacheBackend backend(weights_);
  Engine engine(backend, EngineOptions{8, {}, 0, 16});
  EXPECT_EQ(engine.kv_blocks_total(), 8);
  EXPECT_EQ(engine.block_size(), 4);
  std::vector<std::vector<int32_t>> solo;
  for (int i = 0; i < 3; ++i) {
    const std::vector<int32_t> prompt = {1 + i, 2 + i, 3 + i, 4 + i, 5 + i, 6 + i};
    cpu::CpuBackend alone(weights_);
    Engine e(alone, EngineOptions{});
    e.add_request({"solo", prompt, SamplingParams{}, 12, true});
    solo.push_back(e.run_to_completion().at(0).output_ids);
    engine.add_request({"r" + std::to_string(i), prompt, SamplingParams{}, 12, true});
  }
  const auto outs = engine.run_to_completion();
  ASSERT_EQ(outs.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(outs[static_cast<size_t>(i)].output_ids, solo[static_cast<size_t>(i)]) << i;
  EXPECT_GT(engine.timing().preemptions, 0);
  EXPECT_LE(backend.max_used(), 8);
  EXPECT_THROW(engine.add_request({"big", std::vector<int32_t>(32, 1), SamplingParams{}, 4, true}), Error);
}

TEST_F(EngineTest, PromptThatCanNeverFitIsRejectedAndFinishEndsRequests) {
  cpu::CpuBackend backend(weights_);
  Engine engine(backend, EngineOptions{8, {}, 16, 8});
  EXPECT_THROW(engine.add_request({"big", std::vector<int32_t>(16, 1), SamplingParams{}, 4, true}), Error);
  engine.add_request({"a", {1, 2, 3}, SamplingParams{}, 10, true});
  engine.add_request({"b", {4, 5, 6}, SamplingParams{}, 10, true});
  engine.step();
  const auto a = engine.finish("a", "abort");
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->finish_reason, "abort");
  EXPECT_EQ(a->output_ids.size(), 1u);
  EXPECT_FALSE(engine.finish("a", "abort").has_value());
  EXPECT_TRUE(engine.finish("b", "stop").has_value());
  EXPECT_FALSE(engine.has_work());
  EXPECT_EQ(engine.kv_blocks_used(), 0);
}

TEST_F(EngineTest, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  const std::vector<int32_t> prompt = {7, 8, 9};
  cpu::CpuBackend probe(weights_);
  Batch batch;
  batch.sequences.push_back({probe.create_cache(), 0, prompt, "p"});
  std::vector<float> logits;
  probe.forward(batch, nullptr, logits);
  double z = 0.0;
  for (float v : logits) z += std::exp(static_cast<double>(v));
  cpu::CpuBackend backend(weights_);
  Engine engine(backend, EngineOptions{});
  engine.add_request({"l", prompt, SamplingParams{}, 1, true, /*logprobs=*/3});
  engine.step();
  ASSERT_EQ(engine.step_tokens().size(), 1u);
  const TokenEvent& e = engine.step_tokens()[0];
  EXPECT_EQ(e.token, argmax(logits));
  EXPECT_NEAR(e.logprob, logits[e.token] - std::log(z), 1e-5);
  ASSERT_EQ(e.top.size(), 3u);
  EXPECT_EQ(e.top[0].first, e.token);
  EXPECT_GE(e.top[0].second, e.top[1].second);
  EXPECT_GE(e.top[1].second, e.top[2].second);
  EXPECT_NEAR(e.top[2].second, logits[e.top[2].first] - std::log(z), 1e-5);
  EXPECT_EQ(e.finish_reason, "length");
}

TEST(Sampler, GreedyIsArgmaxFirstOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(std::vector<float>{0.1f, 3.0f, 3.0f, -1.0f}), 1);
}

TEST(Sampler, SameSeedSameDrawsOtherSeedOtherDraws) {
  std::vector<float> logits(64);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i));
  auto draws = [&](uint64_t seed) {
    Sampler s(SamplingParams{1.0f, 1.0f, 0, seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.sample(logits));
    return out;
  };
  EXPECT_EQ(draws(1), draws(1));
  EXPECT_NE(draws(1), draws(2));
}

TEST(Sampler, TopKAndTopPRestrictTheCandidates) {
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f};
  Sampler k1(SamplingParams{1.0f, 1.0f, 1, 3});
  Sampler p_small(SamplingParams{1.0f, 0.01f, 0, 3});
  Sampler k2(SamplingParams{5.0f, 1.0f, 2, 3});
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(k1.sample(logits), 0);
    EXPECT_EQ(p_small.sample(logits), 0);
    EXPECT_LE(k2.sample(logits), 1);
  }
}

TEST(Sampler, FrequenciesFollowTheSoftmax) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler s(SamplingParams{1.0f, 1.0f, 0, 42});
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[s.sample(logits)];
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.015);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.015);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.015);
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  // probs 0.5, 0.3, 0.2: top_p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), never 2.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler s(SamplingParams{1.0f, 0.7f, 0, 9});
  std::vector<int> counts(3);
  for (int i = 0; i < 5000; ++i) ++counts[s.sample(logits)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_GT(counts[1], 0);
}

}  // namespace
}  // namespace moescope
