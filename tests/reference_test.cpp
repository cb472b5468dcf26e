// The acceptance test that matters: the CPU backend against Hugging Face transformers on the same
// weights. Fixtures (tests/fixtures/reference/<case>/) are made by tools/make_reference_fixtures.py
// with transformers itself: bf16 checkpoints, fp32 logits of the last prompt position, 24 greedy tokens
// and every MoE layer's top-k ids and weights for every prompt token.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

constexpr double k_logit_rel_tol = 1e-4;   // max |ours - ref| / max |ref|
constexpr double k_greedy_tie = 1e-4;      // a top-1/top-2 logit gap below this is a near-tie

class ReferenceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = test::reference_fixtures_dir() / GetParam();
    ASSERT_TRUE(fs::exists(dir_ / "reference.json"))
        << "no reference fixtures under " << test::reference_fixtures_dir() << ": run tools/make_reference_fixtures.py (tools/README.md)";
    reference_ = read_json_file(dir_ / "reference.json");
    weights_ = std::make_shared<const ModelWeights>(ModelWeights::load(dir_));
  }

  fs::path dir_;
  Json reference_;
  std::shared_ptr<const ModelWeights> weights_;
};

TEST_P(ReferenceTest, LogitsRoutesAndGreedyTokensMatchTransformers) {
  const ModelConfig& c = weights_->config;
  EXPECT_EQ(std::string(to_string(c.arch)), reference_["arch"].get<std::string>());
  std::vector<int> sparse;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.layer_is_moe[l]) sparse.push_back(l);
  EXPECT_EQ(sparse, reference_["sparse_layers"].get<std::vector<int>>());

  int near_ties = 0;
  const Json& prompts = reference_["prompts"];
  ASSERT_FALSE(prompts.empty());
  for (size_t p = 0; p < prompts.size(); ++p) {
    const Json& ref = prompts[p];
    const auto prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
    const std::string label = GetParam() + " prompt " + std::to_string(p);

    // Prefill: logits of the last position and every prompt token's routes.
    cpu::CpuBackend backend(weights_);
    test::CaptureSink sink;
    Batch batch;
    batch.sequences.push_back({backend.create_cache(), 0, prompt, "r0"});
    std::vector<float> logits;
    backend.forward(batch, &sink, logits);
    const auto ref_logits = ref["last_logits"].get<std::vector<double>>();
    ASSERT_EQ(logits.size(), ref_logits.size());
    double max_diff = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < logits.size(); ++i) {
      max_diff = std::max(max_diff, std::fabs(logits[i] - ref_logits[i]));
      max_ref = std::max(max_ref, std::fabs(ref_logits[i]));
    }
    std::printf("  %s: last-position logits max |diff| %.3g, relative %.3g (max |ref| %.3g)\n", label.c_str(), max_diff,
                max_diff / max_ref, max_ref);
    EXPECT_LE(max_diff / max_ref, k_logit_rel_tol) << label;
    test::expect_routes_equal(sink.routes, ref["routes"], 0, prompt.size(), label, &near_ties);

    // Greedy continuation of 24 tokens through the engine (prefill, then one decode per token).
    Engine engine(backend, EngineOptions{});
    engine.add_request({"g", prompt, SamplingParams{}, 24, true});
    const auto out = engine.run_to_completion();
    ASSERT_EQ(out.size(), 1u);
    const auto ref_greedy = ref["greedy_ids"].get<std::vector<int32_t>>();
    const auto margins = ref["greedy_margins"].get<std::vector<double>>();
    ASSERT_EQ(out[0].output_ids.size(), ref_greedy.size());
    for (size_t i = 0; i < ref_greedy.size(); ++i) {
      if (out[0].output_ids[i] == ref_greedy[i]) continue;
      if (margins[i] < k_greedy_tie) {  // later tokens follow a different prefix: nothing more to compare
        ++near_ties;
        std::printf("  near-tie reported: %s greedy step %zu margin %.3g; compared %zu of 24 tokens\n", label.c_str(), i,
                    margins[i], i);
        break;
      }
      ADD_FAILURE() << label << ": greedy token " << i << " is " << out[0].output_ids[i] << ", reference "
                    << ref_greedy[i] << " (margin " << margins[i] << ")";
      break;
    }
  }

  // Both prompts in one pass (two prefills sharing a batch) give the same routes as alone.
  if (prompts.size() >= 2) {
    cpu::CpuBackend backend(weights_);
    test::CaptureSink sink;
    const auto a = prompts[0]["prompt_ids"].get<std::vector<int32_t>>();
    const auto b = prompts[1]["prompt_ids"].get<std::vector<int32_t>>();
    Batch batch;
    batch.sequences.push_back({backend.create_cache(), 0, a, "a"});
    batch.sequences.push_back({backend.create_cache(), 0, b, "b"});
    std::vector<float> logits;
    backend.forward(batch, &sink, logits);
    test::expect_routes_equal(sink.routes, prompts[0]["routes"], 0, a.size(), GetParam() + " batched prompt 0", &near_ties);
    test::expect_routes_equal(sink.routes, prompts[1]["routes"], a.size(), b.size(), GetParam() + " batched prompt 1", &near_ties);
  }
  RecordProperty("near_ties", near_ties);
  std::printf("  %s: %d near-ties reported\n", GetParam().c_str(), near_ties);
}

INSTANTIATE_TEST_SUITE_P(Transformers, ReferenceTest, ::testing::ValuesIn(test::reference_case_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moescope
