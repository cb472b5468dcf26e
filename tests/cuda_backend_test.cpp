// The CUDA backend end to end: against the transformers fixtures (tests/fixtures/reference) and the CPU
// backend, a mixed batch against each sequence alone, the routing sink, its errors, and --device.
// The GPU tests skip without a GPU; the --device tests without one run everywhere.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <tuple>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#include "cuda_test_util.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "engine/sampler.h"
#include "routing/expert_recorder.h"
#include "test_util.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

// bf16 weights on both sides; the GPU also rounds activations to bf16 in large passes and keeps the KV
// cache in bf16, so logits agree with the f32 reference to about 1e-2 of their scale.
constexpr double k_logit_rel_tol = 3e-2;
// Routing weights, absolute. The fixtures' routers are wide (logits of several units), so the ~2e-3
// relative drift of the hidden state that bf16 activations bring moves a renormalised weight by ~1e-2
// (seen: 0.010 on mixtral_gqa); a wrong route moves it by far more.
constexpr double k_weight_tol = 2e-2;
constexpr double k_tie = 1e-2;         // route and greedy margins below this are near-ties: listed, not failed
// --matmul-precision high with the f32 KV cache: every activation the tensor cores read carries 2^-17
// instead of 2^-9, the cache is exact, so the drift is ~100x smaller; 1e-3 still leaves a margin of 10x
// over what the 2^-17 terms give, and a wrong route or layout moves logits and weights by far more.
constexpr double k_logit_rel_tol_high = 1e-3;
constexpr double k_weight_tol_high = 1e-3;

std::shared_ptr<const ModelWeights> load_fixture(const std::string& name, Json* reference) {
  const fs::path dir = test::reference_fixtures_dir() / name;
  if (!fs::exists(dir / "reference.json")) return nullptr;
  *reference = read_json_file(dir / "reference.json");
  return std::make_shared<const ModelWeights>(ModelWeights::load(dir));
}

cuda::CudaBackendOptions small_options(int small_batch_max_tokens) {
  cuda::CudaBackendOptions o;
  o.max_kv_tokens = 4096;
  o.block_size = 16;
  o.small_batch_max_tokens = small_batch_max_tokens;
  return o;
}

// Top-1 minus top-2 of a row of logits.
double top2_margin(std::span<const float> logits) {
  float a = -INFINITY, b = -INFINITY;
  for (float v : logits) {
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) {
      b = v;
    }
  }
  return static_cast<double>(a) - b;
}

// Routes by (request, position, layer): what each token of each sequence was routed to, whatever pass it
// was computed in.
class RoutesByToken : public RoutingSink {
 public:
  struct Route {
    std::vector<int32_t> ids;
    std::vector<float> weights;
  };
  void begin_pass(const PassInfo& pass) override {
    pass_ = pass;
    ++passes;
  }
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> ids, std::span<const float> w) override {
    layers_seen.push_back(layer);
    EXPECT_EQ(num_tokens, pass_.num_tokens);
    for (int t = 0; t < num_tokens; ++t) {
      const auto key = std::make_tuple(pass_.req_ids[pass_.token_seq[t]], pass_.token_pos[t], layer);
      routes[key] = {{ids.begin() + t * top_k, ids.begin() + (t + 1) * top_k},
                     {w.begin() + t * top_k, w.begin() + (t + 1) * top_k}};
    }
  }
  std::map<std::tuple<std::string, int32_t, int>, Route> routes;
  std::vector<int> layers_seen;
  int passes = 0;

 private:
  PassInfo pass_;
};

// ---- against the transformers fixtures --------------------------------------------------------------

// (fixture, small-path token limit (0: the large path only), --matmul-precision high with the f32 cache)
class CudaReferenceTest : public ::testing::TestWithParam<std::tuple<std::string, int, bool>> {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << ")";
    weights_ = load_fixture(std::get<0>(GetParam()), &reference_);
    ASSERT_TRUE(weights_) << "no reference fixtures under " << test::reference_fixtures_dir();
  }
  Json reference_;
  std::shared_ptr<const ModelWeights> weights_;
};

TEST_P(CudaReferenceTest, LogitsRoutesAndGreedyTokensMatchTransformersAndCpu) {
  const auto& [name, small_max, high] = GetParam();
  cuda::CudaBackendOptions options = small_options(small_max);
  options.matmul_precision_high = high;
  options.kv_cache_f32 = high;  // --kv-cache-dtype auto with --matmul-precision high
  const double logit_tol = high ? k_logit_rel_tol_high : k_logit_rel_tol;
  const double weight_tol = high ? k_weight_tol_high : k_weight_tol;
  cuda::CudaBackend gpu(weights_, options);
  cpu::CpuBackend cpu_backend(weights_);
  std::vector<int> sparse;
  for (int l = 0; l < weights_->config.num_hidden_layers; ++l)
    if (weights_->config.layer_is_moe[l]) sparse.push_back(l);

  int route_ties = 0, greedy_ties = 0;
  const Json& prompts = reference_["prompts"];
  ASSERT_FALSE(prompts.empty());
  for (size_t p = 0; p < prompts.size(); ++p) {
    const Json& ref = prompts[p];
    const auto prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
    const std::string label =
        fmt::format("{} (small path up to {} tokens{}) prompt {}", name, small_max, high ? ", precision high" : "", p);

    // Prefill: logits of the last position, and every prompt token's routes through the sink.
    RoutesByToken sink;
    Batch batch;
    const int cache = gpu.create_cache();
    batch.sequences.push_back({cache, 0, prompt, "r"});
    std::vector<float> logits;
    gpu.forward(batch, &sink, logits);
    gpu.free_cache(cache);
    EXPECT_EQ(sink.passes, 1);
    EXPECT_EQ(sink.layers_seen, sparse) << "on_layer once per MoE layer, in layer order";
    const auto ref_logits = ref["last_logits"].get<std::vector<float>>();
    test::expect_close(label + ": last-position logits vs transformers", logits, ref_logits, logit_tol);

    double max_weight_diff = 0.0;
    for (const Json& layer_ref : ref["routes"]) {
      const int layer = layer_ref["layer"].get<int>();
      for (size_t t = 0; t < prompt.size(); ++t) {
        const auto it = sink.routes.find({"r", static_cast<int32_t>(t), layer});
        ASSERT_NE(it, sink.routes.end()) << label << ": no route for token " << t << " layer " << layer;
        const auto ref_ids = layer_ref["topk_ids"][t].get<std::vector<int32_t>>();
        const auto ref_w = layer_ref["topk_weights"][t].get<std::vector<double>>();
        const double margin = layer_ref["margin"][t].get<double>();
        const auto& ids = it->second.ids;
        auto ref_weight_of = [&](int32_t id) {  // -1 when the reference did not choose it
          const auto at = std::find(ref_ids.begin(), ref_ids.end(), id);
          return at == ref_ids.end() ? -1.0 : ref_w[static_cast<size_t>(at - ref_ids.begin())];
        };
        if (!std::is_permutation(ids.begin(), ids.end(), ref_ids.begin(), ref_ids.end())) {
          if (margin < k_tie) {  // the k-th and (k+1)-th probabilities nearly tie: another set is allowed
            ++route_ties;
            std::printf("  near-tie listed: %s layer %d token %zu margin %.3g (ids differ)\n", label.c_str(), layer, t, margin);
            continue;
          }
          ADD_FAILURE() << label << " layer " << layer << " token " << t << ": top-k ids differ (margin " << margin << ")";
          continue;
        }
        // The same experts; any change of order must be between experts whose weights nearly tie.
        if (ids != ref_ids) {
          bool near = true;
          for (size_t j = 0; j < ids.size(); ++j)
            if (ids[j] != ref_ids[j] && std::fabs(ref_weight_of(ids[j]) - ref_w[j]) >= k_tie) near = false;
          if (!near) {
            ADD_FAILURE() << label << " layer " << layer << " token " << t << ": top-k order differs beyond a near-tie";
            continue;
          }
          ++route_ties;
          std::printf("  near-tie listed: %s layer %d token %zu: two chosen experts with weights within %.0e swapped\n",
                      label.c_str(), layer, t, k_tie);
        }
        for (size_t j = 0; j < ids.size(); ++j)
          max_weight_diff = std::max(max_weight_diff, std::fabs(it->second.weights[j] - ref_weight_of(ids[j])));
      }
    }
    std::printf("  %s: routes of %zu tokens x %zu MoE layers, max weight diff %.3g\n", label.c_str(), prompt.size(),
                ref["routes"].size(), max_weight_diff);
    EXPECT_LE(max_weight_diff, weight_tol) << label;

    // Greedy continuation of 24 tokens through the engine, on the GPU and on the CPU.
    auto greedy = [&](Backend& backend) {
      Engine engine(backend, EngineOptions{});
      engine.add_request({"g", prompt, SamplingParams{}, 24, true});
      const auto out = engine.run_to_completion();
      EXPECT_EQ(out.size(), 1u);
      return out.empty() ? std::vector<int32_t>{} : out[0].output_ids;
    };
    const auto gpu_ids = greedy(gpu), cpu_ids = greedy(cpu_backend);
    const auto ref_ids = ref["greedy_ids"].get<std::vector<int32_t>>();
    const auto margins = ref["greedy_margins"].get<std::vector<double>>();
    ASSERT_EQ(gpu_ids.size(), ref_ids.size());
    size_t compared = 0;
    for (; compared < ref_ids.size(); ++compared) {
      if (margins[compared] < k_tie) {  // from here on a different choice is allowed; later tokens follow it
        if (gpu_ids[compared] != ref_ids[compared] || gpu_ids[compared] != cpu_ids[compared]) {
          ++greedy_ties;
          std::printf("  near-tie listed: %s greedy step %zu margin %.3g: gpu %d, cpu %d, transformers %d\n",
                      label.c_str(), compared, margins[compared], gpu_ids[compared], cpu_ids[compared], ref_ids[compared]);
          break;
        }
        continue;
      }
      ASSERT_EQ(gpu_ids[compared], ref_ids[compared]) << label << ": greedy step " << compared << " (margin "
                                                       << margins[compared] << ")";
      ASSERT_EQ(gpu_ids[compared], cpu_ids[compared]) << label << ": greedy step " << compared << " vs the CPU";
    }
    std::printf("  %s: greedy tokens equal transformers and the CPU for %zu of 24 steps\n", label.c_str(), compared);
  }
  std::printf("  %s: %d route near-ties and %d greedy near-ties listed (margin < %.0e)\n", name.c_str(), route_ties,
              greedy_ties, k_tie);
}

INSTANTIATE_TEST_SUITE_P(Transformers, CudaReferenceTest,
                         ::testing::Combine(::testing::ValuesIn(test::reference_case_names()), ::testing::Values(8, 0),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::get<0>(info.param) + (std::get<1>(info.param) == 0 ? "_large_path" : "_default") +
                                  (std::get<2>(info.param) ? "_precision_high" : "");
                         });

// ---- a mixed batch equals each sequence alone ------------------------------------------------------

struct SequenceRun {
  std::vector<int32_t> tokens;                 // generated
  std::vector<std::vector<float>> logits;      // [step][vocab]
};

class CudaBackendTest : public test::GpuTest {};

TEST_F(CudaBackendTest, MixedBatchOfPrefillsAndDecodesEqualsEachSequenceAlone) {
  for (const std::string& name : std::vector<std::string>{"qwen2_moe_gqa_shared", "qwen3_moe_headdim"}) {
    Json reference;
    const auto weights = load_fixture(name, &reference);
    ASSERT_TRUE(weights) << name;
    const int vocab = weights->config.vocab_size;
    const auto prompt_a = reference["prompts"][0]["prompt_ids"].get<std::vector<int32_t>>();
    const auto prompt_b = reference["prompts"][1]["prompt_ids"].get<std::vector<int32_t>>();
    const int steps = 8;
    cuda::CudaBackend gpu(weights, small_options(8));

    // Alone: prefill, then one decode per pass.
    RoutesByToken alone_routes;
    auto run_alone = [&](const std::vector<int32_t>& prompt, const std::string& req) {
      SequenceRun run;
      const int cache = gpu.create_cache();
      std::vector<int32_t> next = prompt;
      int32_t pos = 0;
      for (int step = 0; step <= steps; ++step) {
        Batch b;
        b.sequences.push_back({cache, pos, next, req});
        std::vector<float> logits;
        gpu.forward(b, &alone_routes, logits);
        pos += static_cast<int32_t>(next.size());
        run.logits.push_back(logits);
        run.tokens.push_back(argmax(logits));
        next = {run.tokens.back()};
      }
      gpu.free_cache(cache);
      return run;
    };
    const SequenceRun alone_a = run_alone(prompt_a, "a"), alone_b = run_alone(prompt_b, "b");

    // Mixed: A's prefill alone; then A's decode beside B's prefill; then both decode.
    RoutesByToken mixed_routes;
    SequenceRun mixed_a, mixed_b;
    const int cache_a = gpu.create_cache(), cache_b = gpu.create_cache();
    std::vector<int32_t> next_a = prompt_a, next_b = prompt_b;
    int32_t pos_a = 0, pos_b = 0;
    for (int pass = 0; pass <= steps + 1; ++pass) {
      Batch b;
      const bool run_a = static_cast<int>(mixed_a.tokens.size()) <= steps, run_b = pass >= 1;
      if (run_a) b.sequences.push_back({cache_a, pos_a, next_a, "a"});
      if (run_b) b.sequences.push_back({cache_b, pos_b, next_b, "b"});
      std::vector<float> logits;
      gpu.forward(b, &mixed_routes, logits);
      size_t row = 0;
      if (run_a) {
        pos_a += static_cast<int32_t>(next_a.size());
        mixed_a.logits.emplace_back(logits.begin(), logits.begin() + vocab);
        mixed_a.tokens.push_back(argmax(mixed_a.logits.back()));
        next_a = {mixed_a.tokens.back()};
        ++row;
      }
      if (run_b) {
        pos_b += static_cast<int32_t>(next_b.size());
        mixed_b.logits.emplace_back(logits.begin() + static_cast<std::ptrdiff_t>(row * vocab),
                                    logits.begin() + static_cast<std::ptrdiff_t>((row + 1) * vocab));
        mixed_b.tokens.push_back(argmax(mixed_b.logits.back()));
        next_b = {mixed_b.tokens.back()};
      }
    }
    gpu.free_cache(cache_a);
    gpu.free_cache(cache_b);

    // Tokens and logits equal until a step where the alone run's top-2 margin is a near-tie.
    auto compare = [&](const SequenceRun& alone, const SequenceRun& mixed, const std::string& req, size_t prompt_len) {
      size_t same = 0;
      for (; same < alone.tokens.size(); ++same) {
        test::expect_close(fmt::format("{} seq {} step {} logits mixed vs alone", name, req, same), mixed.logits[same],
                           alone.logits[same], k_logit_rel_tol);
        if (mixed.tokens[same] == alone.tokens[same]) continue;
        const double margin = top2_margin(alone.logits[same]);
        if (margin < k_tie) {
          std::printf("  near-tie listed: %s seq %s step %zu margin %.3g\n", name.c_str(), req.c_str(), same, margin);
          break;
        }
        ADD_FAILURE() << name << " seq " << req << " step " << same << ": token " << mixed.tokens[same] << " vs "
                      << alone.tokens[same] << " alone (margin " << margin << ")";
        break;
      }
      // Routes of every position computed on the same prefix.
      const int32_t last_pos = static_cast<int32_t>(prompt_len + std::min(same, alone.tokens.size() - 1));
      int compared = 0, ties = 0;
      double max_w = 0.0;
      for (const auto& [key, route] : alone_routes.routes) {
        if (std::get<0>(key) != req || std::get<1>(key) >= last_pos) continue;
        const auto it = mixed_routes.routes.find(key);
        ASSERT_NE(it, mixed_routes.routes.end()) << "no mixed-batch route for " << req << " position " << std::get<1>(key);
        ++compared;
        for (size_t j = 0; j < route.ids.size(); ++j) {
          const double dw = std::fabs(route.weights[j] - it->second.weights[j]);
          if (route.ids[j] != it->second.ids[j]) {
            // Differing experts at the same rank with the same weight: their probabilities tie.
            EXPECT_LE(dw, k_tie) << name << " " << req << " position " << std::get<1>(key) << " layer " << std::get<2>(key);
            ++ties;
            break;
          }
          max_w = std::max(max_w, dw);
        }
      }
      std::printf("  %s seq %s: %zu tokens equal, %d routes compared (max weight diff %.3g, %d near-ties)\n", name.c_str(),
                  req.c_str(), same, compared, max_w, ties);
      EXPECT_LE(max_w, k_weight_tol);
      EXPECT_GT(compared, 0);
    };
    compare(alone_a, mixed_a, "a", prompt_a.size());
    compare(alone_b, mixed_b, "b", prompt_b.size());
  }
}

// Decode passes replayed from CUDA graphs give the eager launches' logits and routes bit for bit, at a
// batch on the small path (2 sequences) and one on the large path (12: cuBLAS inside the graph). So do
// graphs whose kernels are launched plainly, without programmatic dependent launch (on an sm_90 GPU the
// other two use it): a kernel that read or wrote an activation before waiting for the previous one would
// show here as a difference.
TEST_F(CudaBackendTest, DecodeGraphsGiveTheEagerResultsBitForBit) {
  Json reference;
  const auto weights = load_fixture("qwen2_moe_gqa_shared", &reference);
  ASSERT_TRUE(weights);
  cuda::CudaBackendOptions graph_options = small_options(8), eager_options = small_options(8);
  eager_options.cuda_graphs = false;
  cuda::CudaBackend graphs(weights, graph_options), eager(weights, eager_options), plain(weights, graph_options),
      greedy(weights, graph_options);  // forward_greedy: the argmax on the device, from graphs too
  const bool programmatic = cuda::programmatic_launch();  // as the backends set it for this GPU
  std::printf("  programmatic dependent launch: %s\n", programmatic ? "on" : "off (GPU before sm_90 or MOESCOPE_CUDA_PDL=0)");
  auto plain_forward = [&](const Batch& batch, RoutingSink* sink, std::vector<float>& logits) {
    cuda::set_programmatic_launch(false);
    plain.forward(batch, sink, logits);
    cuda::set_programmatic_launch(programmatic);
  };
  const auto base = reference["prompts"][1]["prompt_ids"].get<std::vector<int32_t>>();
  for (const int batch_size : {2, 12}) {
    std::vector<std::vector<int32_t>> prompts;
    for (int b = 0; b < batch_size; ++b) {
      prompts.push_back(base);
      prompts.back().resize(base.size() - static_cast<size_t>(b % 5));  // different lengths
      prompts.back()[0] = static_cast<int32_t>(3 + b);
    }
    std::vector<int> cache_g, cache_e, cache_p, cache_d;
    Batch prefill_g, prefill_e, prefill_p, prefill_d;
    for (int b = 0; b < batch_size; ++b) {
      cache_g.push_back(graphs.create_cache());
      cache_e.push_back(eager.create_cache());
      cache_p.push_back(plain.create_cache());
      cache_d.push_back(greedy.create_cache());
      prefill_g.sequences.push_back({cache_g.back(), 0, prompts[b], fmt::format("s{}", b)});
      prefill_e.sequences.push_back({cache_e.back(), 0, prompts[b], fmt::format("s{}", b)});
      prefill_p.sequences.push_back({cache_p.back(), 0, prompts[b], fmt::format("s{}", b)});
      prefill_d.sequences.push_back({cache_d.back(), 0, prompts[b], fmt::format("s{}", b)});
    }
    std::vector<float> logits_g, logits_e, logits_p;
    std::vector<int32_t> tokens_d;
    graphs.forward(prefill_g, nullptr, logits_g);
    eager.forward(prefill_e, nullptr, logits_e);
    plain_forward(prefill_p, nullptr, logits_p);
    greedy.forward_greedy(prefill_d, nullptr, tokens_d);
    ASSERT_EQ(logits_g, logits_e);
    ASSERT_EQ(logits_p, logits_e) << "prefill launched plainly";
    const int vocab = weights->config.vocab_size;
    auto argmax_rows = [&](const std::vector<float>& logits) {
      std::vector<int32_t> ids(static_cast<size_t>(batch_size));
      for (int b = 0; b < batch_size; ++b)
        ids[b] = argmax(std::span<const float>(logits.data() + static_cast<size_t>(b) * vocab, vocab));
      return ids;
    };
    ASSERT_EQ(tokens_d, argmax_rows(logits_e)) << "prefill, greedy on the device";
    std::vector<int32_t> next(batch_size);
    std::vector<int32_t> pos(batch_size);
    for (int b = 0; b < batch_size; ++b) pos[b] = static_cast<int32_t>(prompts[b].size());
    for (int step = 0; step < 6; ++step) {
      Batch dg, de, dp, dd;
      next = argmax_rows(logits_e);
      for (int b = 0; b < batch_size; ++b) {
        dg.sequences.push_back({cache_g[b], pos[b], std::span<const int32_t>(&next[b], 1), fmt::format("s{}", b)});
        de.sequences.push_back({cache_e[b], pos[b], std::span<const int32_t>(&next[b], 1), fmt::format("s{}", b)});
        dp.sequences.push_back({cache_p[b], pos[b], std::span<const int32_t>(&next[b], 1), fmt::format("s{}", b)});
        dd.sequences.push_back({cache_d[b], pos[b], std::span<const int32_t>(&next[b], 1), fmt::format("s{}", b)});
        ++pos[b];
      }
      test::CaptureSink sink_g, sink_e, sink_p, sink_d;
      graphs.forward(dg, &sink_g, logits_g);
      eager.forward(de, &sink_e, logits_e);
      plain_forward(dp, &sink_p, logits_p);
      greedy.forward_greedy(dd, &sink_d, tokens_d);
      ASSERT_EQ(logits_g, logits_e) << "batch " << batch_size << " decode step " << step;
      ASSERT_EQ(logits_p, logits_e) << "batch " << batch_size << " decode step " << step << ", graphs launched plainly";
      ASSERT_EQ(tokens_d, argmax_rows(logits_e)) << "batch " << batch_size << " decode step " << step << ", greedy on the device";
      for (const auto& [layer, routes] : sink_e.routes) {
        EXPECT_EQ(sink_g.routes[layer].ids, routes.ids) << "layer " << layer;
        EXPECT_EQ(sink_g.routes[layer].weights, routes.weights) << "layer " << layer;
        EXPECT_EQ(sink_p.routes[layer].ids, routes.ids) << "layer " << layer << ", launched plainly";
        EXPECT_EQ(sink_d.routes[layer].ids, routes.ids) << "layer " << layer << ", greedy on the device";
      }
    }
    std::printf("  batch %d: 6 decode steps from graphs (with and without programmatic launch) equal the eager "
                "launches bit for bit; the device's greedy ids are the argmax of the eager logits\n", batch_size);
    for (int b = 0; b < batch_size; ++b) {
      graphs.free_cache(cache_g[b]);
      eager.free_cache(cache_e[b]);
      plain.free_cache(cache_p[b]);
      greedy.free_cache(cache_d[b]);
    }
  }
}

// stat and per_pass take the per-expert tallies the router kernels keep on the device (one copy of
// layers x experts per pass); per_token takes every route. Both record the same counts, in decode
// passes replayed from CUDA graphs as in eager ones, on the small path (3 sequences) and the large (12).
// Large passes run the shared expert on a second stream beside the routed experts (the cuBLAS path: 192
// tokens and more here, 48 pairs an expert); MOESCOPE_CUDA_SHARED_STREAM=0 keeps it on the pass's stream.
// The same kernels on the same data: the logits and the routes are equal to the bit, for a prefill of two
// prompts (400 tokens) and the decode step after it.
TEST_F(CudaBackendTest, SharedExpertOnItsOwnStreamGivesTheSameLogitsBitForBit) {
  Json reference;
  const auto weights = load_fixture("qwen2_moe_gqa_shared", &reference);
  ASSERT_TRUE(weights);
  cuda::CudaBackend side(weights, small_options(8));
  ::setenv("MOESCOPE_CUDA_SHARED_STREAM", "0", 1);
  cuda::CudaBackend one(weights, small_options(8));
  ::unsetenv("MOESCOPE_CUDA_SHARED_STREAM");
  const auto base = reference["prompts"][1]["prompt_ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> prompt;
  while (prompt.size() < 200) prompt.insert(prompt.end(), base.begin(), base.end());
  prompt.resize(200);
  RoutesByToken routes_side, routes_one;
  std::vector<std::vector<int32_t>> next(2, prompt);
  next[1][0] = 7;
  std::vector<int32_t> pos(2, 0);
  std::vector<int> cache_side{side.create_cache(), side.create_cache()}, cache_one{one.create_cache(), one.create_cache()};
  for (int step = 0; step < 2; ++step) {
    Batch b_side, b_one;
    for (int s = 0; s < 2; ++s) {
      b_side.sequences.push_back({cache_side[s], pos[s], next[s], fmt::format("s{}", s)});
      b_one.sequences.push_back({cache_one[s], pos[s], next[s], fmt::format("s{}", s)});
    }
    std::vector<float> logits_side, logits_one;
    side.forward(b_side, &routes_side, logits_side);
    one.forward(b_one, &routes_one, logits_one);
    ASSERT_EQ(logits_side.size(), logits_one.size());
    EXPECT_EQ(std::memcmp(logits_side.data(), logits_one.data(), logits_side.size() * sizeof(float)), 0)
        << "step " << step << ": logits with the shared expert on its own stream";
    const int vocab = weights->config.vocab_size;
    for (int s = 0; s < 2; ++s) {
      pos[s] += static_cast<int32_t>(next[s].size());
      next[s] = {argmax(std::span<const float>(logits_side).subspan(static_cast<size_t>(s) * vocab, vocab))};
    }
  }
  EXPECT_EQ(routes_side.routes.size(), routes_one.routes.size());
  for (const auto& [key, route] : routes_side.routes) {
    const auto it = routes_one.routes.find(key);
    ASSERT_NE(it, routes_one.routes.end());
    EXPECT_EQ(route.ids, it->second.ids);
    EXPECT_EQ(route.weights, it->second.weights);
  }
  std::printf("  shared expert on a second stream: a 400-token prefill and a decode step equal to one stream's to the bit\n");
}

TEST_F(CudaBackendTest, DeviceTalliesRecordWhatTheRoutesRecordUnderGraphs) {
  Json reference;
  const auto weights = load_fixture("qwen2_moe_gqa_shared", &reference);
  ASSERT_TRUE(weights);
  const RoutingShape shape = routing_shape(weights->config, "qwen2_moe_gqa_shared");
  const auto base = reference["prompts"][1]["prompt_ids"].get<std::vector<int32_t>>();
  for (const int batch_size : {3, 12}) {
    SCOPED_TRACE(batch_size);
    std::map<std::string, Json> dumps;
    int64_t graph_passes = 0;
    for (const RecordingMode mode : {RecordingMode::PerToken, RecordingMode::Stat, RecordingMode::PerPass}) {
      ExpertRecorder recorder(shape);
      recorder.configure(mode);
      recorder.start();
      cuda::CudaBackend gpu(weights, small_options(8));
      Engine engine(gpu, EngineOptions{batch_size, {}, 0, 16}, &recorder);
      for (int b = 0; b < batch_size; ++b) {
        std::vector<int32_t> prompt = base;
        prompt.resize(base.size() - static_cast<size_t>(b % 5));
        prompt[0] = static_cast<int32_t>(3 + b);
        engine.add_request({fmt::format("r{}", b), prompt, SamplingParams{}, 10, true});
      }
      engine.run_to_completion();
      recorder.stop();
      dumps[to_string(mode)] = Json::parse(recorder.dump());
      graph_passes = engine.timing().passes - 2;  // the prefill pass and the eager first decode
    }
    ASSERT_GT(graph_passes, 0);
    const Json& routes = dumps.at("per_token");
    for (const char* mode : {"stat", "per_pass"}) {
      const Json& tallies = dumps.at(mode);
      EXPECT_EQ(tallies["counts"], routes["counts"]) << mode;
      double max_diff = 0.0;
      for (size_t m = 0; m < routes["weight_sums"].size(); ++m)
        for (size_t e = 0; e < routes["weight_sums"][m].size(); ++e)
          max_diff = std::max(max_diff, std::fabs(tallies["weight_sums"][m][e].get<double>() -
                                                  routes["weight_sums"][m][e].get<double>()));
      // Each device weight is rounded to 2^-32 before it is added: at most 2^-33 per selection.
      std::printf("  %s, batch %d: counts equal, weight sums within %.3g\n", mode, batch_size, max_diff);
      EXPECT_LE(max_diff, 1e-6) << mode;
    }
    int64_t total = 0;
    for (const auto& row : routes["counts"])
      for (int64_t n : row.get<std::vector<int64_t>>()) total += n;
    EXPECT_EQ(total, static_cast<int64_t>(shape.moe_layers.size()) * shape.top_k * routes["num_tokens"].get<int64_t>());
  }
}

// MOESCOPE_CUDA_TWICE (a timing diagnostic) names stages; a name it does not know is one clear error.
// Constructing a backend with the environment variable `name` set to `value` fails with `message`.
void expect_environment_error(const char* name, const char* value, const std::string& message) {
  Json reference;
  const auto weights = load_fixture("qwen2_moe_gqa_shared", &reference);
  ASSERT_TRUE(weights);
  ::setenv(name, value, 1);
  try {
    cuda::CudaBackend gpu(weights, small_options(8));
    ADD_FAILURE() << name << "=" << value << " was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
  }
  ::unsetenv(name);
}

TEST_F(CudaBackendTest, UnknownStageInTheTimingDiagnosticIsAClearError) {
  expect_environment_error("MOESCOPE_CUDA_TWICE", "attention,bogus", "unknown stage 'bogus'");
}

// Every 0/1 diagnostic switch takes nothing else.
TEST_F(CudaBackendTest, BadSwitchValuesAreAClearError) {
  const std::pair<const char*, const char*> cases[] = {
      {"MOESCOPE_CUDA_PDL", "yes"},           {"MOESCOPE_CUDA_WGMMA", "off"},        {"MOESCOPE_CUDA_TAIL", "2"},
      {"MOESCOPE_CUDA_ROUTER_STAGED", "true"}, {"MOESCOPE_CUDA_DENSE_NORM", "no"}, {"MOESCOPE_CUDA_SHARED_STREAM", "2"},
      {"MOESCOPE_CUDA_SHARED_GROUPED", "-1"}, {"MOESCOPE_CUDA_DOWN_FOLD", "x"},
      {"MOESCOPE_CUDA_PROFILE", "on"},
  };
  for (const auto& [name, value] : cases)
    expect_environment_error(name, value, fmt::format("{}={}: expected 0 or 1", name, value));
}

TEST_F(CudaBackendTest, BadProfilerTokensAreAClearError) {
  expect_environment_error("MOESCOPE_CUDA_PROFILER_TOKENS", "2k",
                           "MOESCOPE_CUDA_PROFILER_TOKENS=2k: expected a number of tokens, 1 or more");
  expect_environment_error("MOESCOPE_CUDA_PROFILER_TOKENS", "0",
                           "MOESCOPE_CUDA_PROFILER_TOKENS=0: expected a number of tokens, 1 or more");
}


TEST_F(CudaBackendTest, KvCacheFullIsAClearErrorAndFreedBlocksAreReused) {
  Json reference;
  const auto weights = load_fixture("qwen2_moe_gqa_shared", &reference);
  ASSERT_TRUE(weights);
  cuda::CudaBackendOptions o;
  o.max_kv_tokens = 32;
  o.block_size = 16;
  cuda::CudaBackend gpu(weights, o);
  EXPECT_EQ(gpu.kv_capacity().blocks * gpu.kv_capacity().block_size, 32);
  std::vector<int32_t> long_prompt(40, 7), short_prompt(20, 9);
  std::vector<float> logits;
  const int a = gpu.create_cache();
  Batch too_long;
  too_long.sequences.push_back({a, 0, long_prompt, "long"});
  try {
    gpu.forward(too_long, nullptr, logits);
    ADD_FAILURE() << "a 40-token prompt fit a 32-token cache";
  } catch (const Error& e) {
    std::printf("  error: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find("KV cache full"), std::string::npos) << e.what();
  }
  gpu.free_cache(a);
  for (int round = 0; round < 3; ++round) {  // the blocks come back each time
    const int c = gpu.create_cache();
    Batch b;
    b.sequences.push_back({c, 0, short_prompt, "short"});
    gpu.forward(b, nullptr, logits);
    EXPECT_EQ(logits.size(), static_cast<size_t>(weights->config.vocab_size));
    gpu.free_cache(c);
  }
}

TEST_F(CudaBackendTest, NoMemoryForTheKvCacheIsOneClearMessageWithTheSizes) {
  Json reference;
  const auto weights = load_fixture("mixtral_gqa", &reference);
  ASSERT_TRUE(weights);
  cuda::CudaBackendOptions o;
  o.gpu_memory_utilization = 0.01;  // less than the CUDA context alone takes
  try {
    cuda::CudaBackend gpu(weights, o);
    ADD_FAILURE() << "a backend fit in 1% of the GPU";
  } catch (const Error& e) {
    std::printf("  error: %s\n", e.what());
    const std::string what = e.what();
    EXPECT_NE(what.find("KV cache"), std::string::npos) << what;
    EXPECT_NE(what.find("GiB"), std::string::npos) << what;
  }
}

// ---- the command line ---------------------------------------------------------------------------------

TEST(CudaDeviceCli, DeviceCudaWithoutAGpuIsAClearErrorAndAutoFallsBackToCpu) {
  std::string why;
  if (cuda::device_available(&why)) GTEST_SKIP() << "a GPU is present; this checks the behaviour without one";
  const std::string model = (test::reference_fixtures_dir() / "mixtral_gqa").string();
  const auto r = test::run_moescope("generate " + model + " --prompt-ids 5,6,7 --max-tokens 2 --device cuda");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("no CUDA device"), std::string::npos) << r.output;
  const auto cpu_run = test::run_moescope("generate " + model + " --prompt-ids 5,6,7 --max-tokens 2 --device auto --json");
  EXPECT_EQ(cpu_run.exit_code, 0) << cpu_run.output;
}

TEST_F(CudaBackendTest, GenerateAndBenchRunOnTheGpu) {
  const std::string model = (test::reference_fixtures_dir() / "qwen3_moe_headdim").string();
  const auto gpu_run = test::run_moescope("generate " + model + " --prompt-ids 5,6,7,8 --max-tokens 6 --device cuda --json");
  ASSERT_EQ(gpu_run.exit_code, 0) << gpu_run.output;
  const Json j = Json::parse(gpu_run.output.substr(gpu_run.output.find('{')));
  EXPECT_EQ(j["output_ids"].size(), 6u) << gpu_run.output;
  const auto bench = test::run_moescope("bench --preset tiny --device cuda --repeats 2 --decode-tokens 4 --batch 1,4");
  ASSERT_EQ(bench.exit_code, 0) << bench.output;
  EXPECT_NE(bench.output.find("checksum of generated ids"), std::string::npos) << bench.output;
  std::printf("%s\n", bench.output.c_str());
}

}  // namespace
}  // namespace moescope
