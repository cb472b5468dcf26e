// The CUDA backend against Hugging Face transformers at real size (issue 7): a checkpoint at
// Qwen1.5-MoE-A2.7B's published shapes (random weights from `moescope make-model --preset
// qwen1.5-moe-a2.7b`, 24 MoE layers of 60 experts, top-4, shared expert, vocab 151936) against the float32
// reference that tools/hf_side_by_side.py computed with transformers on the GPU from the same files.
// Compared per prompt: the largest last-position logits, greedy tokens (free-running through the engine,
// and teacher-forced step by step), and every MoE layer's top-k experts of every prompt token and every
// generated token fed back. Two configurations: --matmul-precision high (with the f32 KV cache) against
// the bounds below, and the default (medium: bf16 activations and cache) against transformers' own
// bf16 inference on the same tokens. Runs only when MOESCOPE_REAL_SIZE_MODEL (the checkpoint) and
// MOESCOPE_REAL_SIZE_REFERENCE (its reference.json) are set and a GPU is present; bench/cuda_device_check.sh
// sets them. docs/CUDA.md ("Against transformers at real size") gives the command and the thresholds.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#include "engine/engine.h"
#include "engine/sampler.h"
#include "tensor/dtype.h"
#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

// The numbers below come from one estimate, made for the default precision; --matmul-precision high cuts
// the drift by ~2^8 and has to meet them with a wide margin. Both sides hold the same bf16 weights; by
// default moescope rounds activations to bf16 at the tensor-core products of large passes (the prefill)
// and keeps the KV cache in bf16, transformers runs in float32. One bf16 rounding is at most 2^-9 relative (1.1e-3 RMS), and the
// roundings of 24 layers add up in quadrature to a drift of a few 1e-3 of the hidden state; eps = 5e-3 below
// is the bound the estimates take. The router's logits spread over ~4 units (make-model draws
// the router with std 4/sqrt(hidden)), so that drift moves a router logit by ~4 eps = 2e-2 and a routing
// probability by at most a quarter of that, 5e-3.
//
// A reference top-k margin (k-th minus (k+1)-th router probability) or greedy margin (top-1 minus top-2
// logit) below this is a near-tie: there the bf16 side may choose differently, and the difference is listed,
// not failed. The bound, CudaReferenceTest's too; twice the 5e-3 a probability may move.
constexpr double k_tie = 1e-2;
// Route agreement over all (token, layer) pairs: the figure, not derived here. It is tight for this
// router: a quick simulation of 60 experts with logits of std 4 and noise of std 4 eps puts half the pairs'
// margins below 1e-2 and changes the top-4 set of ~0.4% of the pairs at eps = 1e-3, ~0.7% at 2e-3, ~1.2% at
// 3e-3 and ~2.2% at 5e-3: 99% holds while the drift stays below ~2.5e-3. Every disagreement must also be a
// near-tie.
constexpr double k_min_agreement = 0.99;
// Logits, max |ours - transformers| over the reference's 32 largest logits of a step, relative to that
// step's max |logit|: the logits inherit the drift (<= eps of their scale); 2e-2 is 4x eps. The 4-layer
// fixtures measured 0.42% (docs/CUDA.md); a real bug (a wrong expert, RoPE, norm or weight layout) moves
// logits by tens of percent.
constexpr double k_logit_rel_tol = 2e-2;
// Routing weights of the pairs whose expert sets agree, absolute: a weight is a probability, moved by at
// most 5e-3 by the drift (above); 2e-2 is 4x that. A weighting bug (renormalising when the model does not,
// another expert's probability) moves weights by 0.1 or more.
constexpr double k_weight_tol = 2e-2;

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// max |logits[id] - value| over a reference's {"ids", "values"}, relative to max_abs.
double top_logits_error(const std::vector<float>& logits, const Json& top, double max_abs) {
  const auto ids = top.at("ids").get<std::vector<int32_t>>();
  const auto values = top.at("values").get<std::vector<double>>();
  double worst = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const double got = logits.at(static_cast<size_t>(ids[i]));
    worst = std::max(worst, std::isfinite(got) ? std::fabs(got - values[i]) : INFINITY);
  }
  return worst / max_abs;
}

// Route agreement over (token, layer) pairs: the same set of top-k experts as the reference.
struct RouteTally {
  int64_t pairs = 0, agree = 0, ref_near_ties = 0;
  double max_weight_diff = 0.0;                 // over agreeing pairs, matched by expert id
  // A near-tie disagreement at (layer l0, position p0) sends that token through other experts, so every
  // later layer's input at positions >= p0 (causal attention) differs from the reference's: those pairs
  // may agree, but their weights are not held to the tolerance (counted, and their largest difference
  // printed). `flips`: this sequence's disagreements (begin_sequence() starts a new one).
  int64_t downstream = 0;
  double downstream_max_weight_diff = 0.0;
  std::vector<std::pair<int, size_t>> flips;
  void begin_sequence() { flips.clear(); }
  bool is_downstream(int layer, size_t pos) const {
    return std::any_of(flips.begin(), flips.end(), [&](const auto& f) { return f.first < layer && f.second <= pos; });
  }
  std::vector<double> disagreement_margins;     // the reference's margin at each disagreement
  int listed = 0;
  bool strict = true;  // a disagreement at a margin >= k_tie fails the test (else it is counted only)

  // Our routes of tokens [offset, offset + n) of every layer in `sink`, against the reference's routes[]
  // entries (one per MoE layer, tokens 0..n-1).
  void compare(const test::CaptureSink& sink, const Json& ref_routes, size_t offset, size_t n, const std::string& label) {
    for (const Json& layer_ref : ref_routes) {
      const int layer = layer_ref.at("layer").get<int>();
      const auto it = sink.routes.find(layer);
      ASSERT_NE(it, sink.routes.end()) << label << ": no routes of MoE layer " << layer;
      ASSERT_GE(it->second.ids.size(), offset + n) << label << " layer " << layer;
      ASSERT_EQ(layer_ref.at("topk_ids").size(), n) << label << " layer " << layer;
      for (size_t t = 0; t < n; ++t) {
        const auto ref_ids = layer_ref["topk_ids"][t].get<std::vector<int32_t>>();
        const auto ref_w = layer_ref["topk_weights"][t].get<std::vector<double>>();
        const double margin = layer_ref["margin"][t].get<double>();
        const auto& ids = it->second.ids[offset + t];
        const auto& w = it->second.weights[offset + t];
        ++pairs;
        if (margin < k_tie) ++ref_near_ties;
        if (std::is_permutation(ids.begin(), ids.end(), ref_ids.begin(), ref_ids.end())) {
          ++agree;
          const bool after_flip = is_downstream(layer, offset + t);
          downstream += after_flip ? 1 : 0;
          for (size_t j = 0; j < ids.size(); ++j) {
            const size_t at = static_cast<size_t>(std::find(ref_ids.begin(), ref_ids.end(), ids[j]) - ref_ids.begin());
            double& worst = after_flip ? downstream_max_weight_diff : max_weight_diff;
            worst = std::max(worst, std::fabs(w[j] - ref_w[at]));
          }
          continue;
        }
        disagreement_margins.push_back(margin);
        flips.emplace_back(layer, offset + t);
        if (margin >= k_tie && strict) {
          ADD_FAILURE() << label << " layer " << layer << " token " << t << ": experts " << Json(ids).dump()
                        << ", transformers " << Json(ref_ids).dump() << " at a reference margin of " << margin
                        << " (not a near-tie)";
        } else if (margin < k_tie && ++listed <= 20) {
          std::printf("  near-tie listed: %s layer %d token %zu: experts %s, transformers %s (margin %.3g)\n",
                      label.c_str(), layer, t, Json(ids).dump().c_str(), Json(ref_ids).dump().c_str(), margin);
        }
      }
    }
  }
};

// What one backend gave over all prompts of the reference.
struct RealSizeRun {
  RouteTally routes;
  double worst_prefill_logits = 0.0, worst_decode_logits = 0.0;
  int greedy_mismatch_ties = 0;
  size_t free_running_equal = 0, free_running_steps = 0;

  double agreement() const { return routes.pairs > 0 ? static_cast<double>(routes.agree) / routes.pairs : 0.0; }
  // Disagreements by the reference's margin, by decade: <1e-6, ..., 1e-3..1e-2, >= 1e-2.
  std::array<int, 6> histogram() const {
    const std::array<double, 5> edges = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2};
    std::array<int, 6> h{};
    for (double m : routes.disagreement_margins)
      ++h[static_cast<size_t>(std::upper_bound(edges.begin(), edges.end(), m) - edges.begin())];
    return h;
  }
  void print(const char* what) const {
    const auto h = histogram();
    std::printf("  real size [%s]: routes: %lld of %lld (token, layer) pairs choose the same experts as transformers: "
                "%.3f%%; %lld pairs are reference near-ties (margin < %.0e)\n",
                what, static_cast<long long>(routes.agree), static_cast<long long>(routes.pairs), 100.0 * agreement(),
                static_cast<long long>(routes.ref_near_ties), k_tie);
    std::printf("  real size [%s]: disagreements by reference margin: <1e-6: %d, 1e-6..1e-5: %d, 1e-5..1e-4: %d, "
                "1e-4..1e-3: %d, 1e-3..1e-2: %d, >=1e-2: %d\n",
                what, h[0], h[1], h[2], h[3], h[4], h[5]);
    std::printf("  real size [%s]: max route weight diff on agreeing pairs %.3g (%lld more agree downstream of a near-tie "
                "disagreement: max diff %.3g, not held to the tolerance); logits max rel err prefill %.3g, decode %.3g; "
                "free-running greedy equal for %zu of %zu steps; %d teacher-forced near-tie token differences\n",
                what, routes.max_weight_diff, static_cast<long long>(routes.downstream), routes.downstream_max_weight_diff,
                worst_prefill_logits, worst_decode_logits, free_running_equal, free_running_steps, greedy_mismatch_ties);
  }
};

// The checkpoint and its reference, loaded once for both tests.
struct RealSizeCase {
  std::string skip;  // why the tests skip, or empty
  std::string model_dir, reference_path;
  Json reference;
  std::shared_ptr<const ModelWeights> weights;
  double load_seconds = 0.0;
};

const RealSizeCase& real_size_case() {
  static const RealSizeCase rs = [] {
    RealSizeCase r;
    r.model_dir = env("MOESCOPE_REAL_SIZE_MODEL");
    r.reference_path = env("MOESCOPE_REAL_SIZE_REFERENCE");
    if (r.model_dir.empty() || r.reference_path.empty()) {
      r.skip = "MOESCOPE_REAL_SIZE_MODEL (a checkpoint, e.g. moescope make-model --arch qwen2_moe --preset "
               "qwen1.5-moe-a2.7b --seed 0 --out DIR) and MOESCOPE_REAL_SIZE_REFERENCE (the reference.json that "
               "tools/hf_side_by_side.py --model DIR --out OUT wrote for it) are not both set; "
               "bench/cuda_device_check.sh runs this test on the GPU machine";
      return r;
    }
    std::string why;
    if (env("MOESCOPE_REAL_SIZE_DEVICE") != "cpu" && !cuda::device_available(&why)) {
      r.skip = "no CUDA device (" + why + ")";
      return r;
    }
    const auto start = std::chrono::steady_clock::now();
    r.reference = read_json_file(r.reference_path);
    r.weights = std::make_shared<const ModelWeights>(ModelWeights::load(r.model_dir));
    r.load_seconds = seconds_since(start);
    return r;
  }();
  return rs;
}

// The reference is of this checkpoint: the same routing geometry and the same values in a few rows.
void check_reference_matches(const RealSizeCase& rs) {
  const ModelConfig& c = rs.weights->config;
  std::vector<int> sparse;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.layer_is_moe[l]) sparse.push_back(l);
  const Json& reference = rs.reference;
  ASSERT_EQ(reference.at("sparse_layers").get<std::vector<int>>(), sparse);
  ASSERT_EQ(reference.at("num_experts").get<int>(), c.num_experts);
  ASSERT_EQ(reference.at("top_k").get<int>(), c.num_experts_per_tok);
  ASSERT_EQ(reference.at("renormalize_topk").get<bool>(), c.norm_topk_prob);
  for (const Json& probe : reference.at("weights_probe")) {
    const std::string name = probe.at("name").get<std::string>();
    const auto want = probe.at("values").get<std::vector<float>>();
    const TensorView& view = rs.weights->store.get(name);
    std::vector<float> got(want.size());
    to_f32(view.dtype, view.row(probe.at("row").get<int64_t>()), got.data(), got.size());
    ASSERT_EQ(got, want) << name << " row " << probe.at("row") << ": " << rs.reference_path
                         << " was made from another checkpoint than " << rs.model_dir;
  }
  ASSERT_FALSE(reference.at("prompts").empty());
  std::printf("  real size: %s, %d layers (%zu MoE), hidden %d, %d experts top-%d, vocab %d; reference: %zu prompts, "
              "transformers %s, torch %s, %s, %s attention, on %s (loaded in %.1f s)\n",
              rs.model_dir.c_str(), c.num_hidden_layers, sparse.size(), c.hidden_size, c.num_experts,
              c.num_experts_per_tok, c.vocab_size, reference.at("prompts").size(),
              reference.value("transformers_version", "?").c_str(), reference.value("torch_version", "?").c_str(),
              reference.value("ref_dtype", "?").c_str(), reference.value("attn_implementation", "?").c_str(),
              reference.value("device", "?").c_str(), rs.load_seconds);
}

// Every prompt of the reference through `backend`. With strict, the bounds fail the test where
// they are crossed (logits, greedy tokens at margins >= k_tie, routes at margins >= k_tie); without,
// everything is only measured, for the caller to set beside transformers' own bf16 figures.
void run_prompts(Backend& backend, const RealSizeCase& rs, bool strict, RealSizeRun& run) {
  const ModelConfig& c = rs.weights->config;
  const Json& prompts = rs.reference.at("prompts");
  run.routes.strict = strict;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const Json& ref = prompts[p];
    const std::string label = "prompt " + std::to_string(p);
    const auto prompt = ref.at("prompt_ids").get<std::vector<int32_t>>();
    const auto ref_greedy = ref.at("greedy_ids").get<std::vector<int32_t>>();
    const auto margins = ref.at("greedy_margins").get<std::vector<double>>();
    const size_t P = prompt.size(), T = ref_greedy.size();
    ASSERT_EQ(margins.size(), T);
    ASSERT_GE(T, 2u);
    const bool has_steps = ref.contains("step_logits_top");
    const auto start = std::chrono::steady_clock::now();

    // Teacher-forced: prefill the prompt, then feed transformers' greedy tokens 0..T-2 one decode pass each,
    // so every step sees the reference's prefix: logits and argmax at every step, routes of every token.
    test::CaptureSink sink;
    const int cache = backend.create_cache();
    Batch prefill;
    prefill.sequences.push_back({cache, 0, prompt, "r"});
    std::vector<float> logits;
    backend.forward(prefill, &sink, logits);
    ASSERT_EQ(logits.size(), static_cast<size_t>(c.vocab_size));
    const double prefill_err =
        top_logits_error(logits, ref.at("last_logits_top"), ref.at("last_logits_max_abs").get<double>());
    run.worst_prefill_logits = std::max(run.worst_prefill_logits, prefill_err);
    if (strict) {
      EXPECT_LE(prefill_err, k_logit_rel_tol) << label << ": last-position logits (prefill) vs transformers";
    }
    double decode_err = 0.0;
    int step_mismatches = 0;
    for (size_t s = 0; s < T; ++s) {
      if (s > 0 && has_steps) {
        const Json& top = ref["step_logits_top"][s];
        const double err = top_logits_error(logits, top, top.at("max_abs").get<double>());
        decode_err = std::max(decode_err, err);
        if (strict) {
          EXPECT_LE(err, k_logit_rel_tol) << label << ": logits of greedy step " << s << " (decode) vs transformers";
        }
      }
      const int32_t ours = argmax(logits);
      if (ours != ref_greedy[s]) {
        ++step_mismatches;
        if (margins[s] < k_tie) {
          ++run.greedy_mismatch_ties;
          std::printf("  near-tie listed: %s teacher-forced step %zu: %d, transformers %d (margin %.3g)\n",
                      label.c_str(), s, ours, ref_greedy[s], margins[s]);
        } else if (strict) {
          ADD_FAILURE() << label << " teacher-forced step " << s << ": token " << ours << ", transformers "
                        << ref_greedy[s] << " (margin " << margins[s] << ")";
        }
      }
      if (s + 1 == T) break;
      Batch step;
      step.sequences.push_back({cache, static_cast<int32_t>(P + s), std::span<const int32_t>(&ref_greedy[s], 1), "r"});
      backend.forward(step, &sink, logits);
    }
    backend.free_cache(cache);
    run.worst_decode_logits = std::max(run.worst_decode_logits, decode_err);
    EXPECT_EQ(sink.passes.size(), T) << label << ": one prefill and " << T - 1 << " decode passes";
    run.routes.begin_sequence();
    run.routes.compare(sink, ref.at("routes"), 0, P, label + " prompt token");
    run.routes.compare(sink, ref.at("decode_routes"), P, T - 1, label + " generated token");

    // Free-running greedy through the engine, as `moescope generate` runs it: equal to transformers up to
    // the first step whose reference margin is a near-tie (from there on the prefixes may differ).
    Engine engine(backend, EngineOptions{});
    engine.add_request({"g", prompt, SamplingParams{}, static_cast<int>(T), true});
    const auto out = engine.run_to_completion();
    ASSERT_EQ(out.size(), 1u);
    ASSERT_EQ(out[0].output_ids.size(), T);
    size_t equal = 0;
    for (; equal < T; ++equal) {
      if (out[0].output_ids[equal] == ref_greedy[equal]) continue;
      if (margins[equal] < k_tie) {
        std::printf("  near-tie listed: %s free-running greedy step %zu: %d, transformers %d (margin %.3g); "
                    "steps %zu..%zu not compared\n",
                    label.c_str(), equal, out[0].output_ids[equal], ref_greedy[equal], margins[equal], equal, T - 1);
      } else if (strict) {
        ADD_FAILURE() << label << " free-running greedy step " << equal << ": token " << out[0].output_ids[equal]
                      << ", transformers " << ref_greedy[equal] << " (margin " << margins[equal] << ")";
      }
      break;
    }
    run.free_running_equal += equal;
    run.free_running_steps += T;
    std::printf("  real size: %s: %zu + %zu tokens; logits rel err prefill %.3g, decode steps %.3g; teacher-forced "
                "greedy %zu of %zu equal; free-running greedy equal for %zu of %zu steps (%.1f s)\n",
                label.c_str(), P, T, prefill_err, decode_err, T - step_mismatches, T, equal, T, seconds_since(start));
  }
}

std::unique_ptr<cuda::CudaBackend> make_gpu(const RealSizeCase& rs, cuda::CudaBackendOptions options) {
  const auto start = std::chrono::steady_clock::now();
  options.max_kv_tokens = 8192;  // one sequence of ~100 tokens at a time
  auto gpu = std::make_unique<cuda::CudaBackend>(rs.weights, options);
  std::printf("  real size: backend ready in %.1f s (%.1f GB on the device, %s), --matmul-precision %s, KV cache %s\n",
              seconds_since(start), gpu->weight_bytes() / 1e9, gpu->device_description().c_str(),
              options.matmul_precision_high ? "high" : "medium", options.kv_cache_f32 ? "float32" : "bfloat16");
  return gpu;
}

// The criterion, on the configuration made for it: --matmul-precision high (and the f32 KV cache
// that --kv-cache-dtype auto then picks). MOESCOPE_REAL_SIZE_DEVICE=cpu runs the CPU backend instead (f32
// activations, the oracle), which tells the GPU's arithmetic apart from a difference in the model's maths.
TEST(CudaRealSize, RoutesAndTokensAgreeWithTransformersAtPrecisionHigh) {
  const RealSizeCase& rs = real_size_case();
  if (!rs.skip.empty()) GTEST_SKIP() << rs.skip;
  ASSERT_NO_FATAL_FAILURE(check_reference_matches(rs));
  RealSizeRun run;
  {
    std::unique_ptr<Backend> backend;
    if (env("MOESCOPE_REAL_SIZE_DEVICE") == "cpu") {
      std::printf("  real size: the CPU backend (MOESCOPE_REAL_SIZE_DEVICE=cpu)\n");
      backend = std::make_unique<cpu::CpuBackend>(rs.weights);
    } else {
      cuda::CudaBackendOptions options;  // the defaults but the precision (small path <= 8 tokens, CUDA graphs)
      options.matmul_precision_high = true;
      options.kv_cache_f32 = true;
      backend = make_gpu(rs, options);
    }
    ASSERT_NO_FATAL_FAILURE(run_prompts(*backend, rs, true, run));
  }  // the backend and its device memory are released here
  run.print("precision high");
  std::printf("  real size: required: >= %.0f%% of the routes, every disagreement at a reference margin < %.0e, route "
              "weights within %.0e, logits within %.0e of their scale\n",
              100.0 * k_min_agreement, k_tie, k_weight_tol, k_logit_rel_tol);
  EXPECT_GT(run.routes.pairs, 0);
  EXPECT_GE(run.agreement(), k_min_agreement);
  EXPECT_EQ(run.histogram()[5], 0) << "disagreements at a reference margin >= " << k_tie;
  EXPECT_LE(run.routes.max_weight_diff, k_weight_tol);
  RecordProperty("route_agreement_percent", std::to_string(100.0 * run.agreement()));
  RecordProperty("route_pairs", std::to_string(run.routes.pairs));
}

// The default, --matmul-precision medium with the bf16 KV cache, as moescope serves: bf16 activations drift
// from the float32 reference as transformers' own bf16 inference does. Set beside the peer measured in
// the same run (tools/hf_side_by_side.py: transformers in bf16 on the same checkpoint and tokens,
// reference.json's "transformers_bf16_routes"): at least as many routes agree with float32, and no more
// disagree at a margin >= k_tie.
TEST(CudaRealSize, DefaultPrecisionRoutesAtLeastAsCloseAsTransformersBf16) {
  const RealSizeCase& rs = real_size_case();
  if (!rs.skip.empty()) GTEST_SKIP() << rs.skip;
  if (env("MOESCOPE_REAL_SIZE_DEVICE") == "cpu") GTEST_SKIP() << "MOESCOPE_REAL_SIZE_DEVICE=cpu: the CPU has no bf16 mode";
  if (!rs.reference.contains("transformers_bf16_routes"))
    GTEST_SKIP() << rs.reference_path << " has no \"transformers_bf16_routes\" (hf_side_by_side.py's throughput "
                 << "stage adds it; it was skipped or failed)";
  ASSERT_NO_FATAL_FAILURE(check_reference_matches(rs));
  RealSizeRun run;
  {
    auto gpu = make_gpu(rs, cuda::CudaBackendOptions{});
    ASSERT_NO_FATAL_FAILURE(run_prompts(*gpu, rs, false, run));
  }
  run.print("precision medium");
  const Json& hf = rs.reference.at("transformers_bf16_routes");
  const double hf_agreement = hf.at("agreement").get<double>();
  const int hf_ge_tie = hf.at("disagreements_at_margin_ge_1e-2").get<int>();
  std::printf("  real size: transformers bf16 (%s attention, experts %s) on the same tokens: %lld of %lld routes agree "
              "with float32 (%.3f%%), %d disagreements at a margin >= %.0e\n",
              hf.value("attn_implementation", "?").c_str(), hf.value("experts_implementation", "?").c_str(),
              hf.at("agree").get<long long>(), hf.at("pairs").get<long long>(), 100.0 * hf_agreement, hf_ge_tie, k_tie);
  EXPECT_GE(run.agreement(), hf_agreement) << "moescope's bf16 mode routes further from float32 than transformers' bf16";
  EXPECT_LE(run.histogram()[5], hf_ge_tie) << "more disagreements at a margin >= " << k_tie << " than transformers' bf16";
  RecordProperty("route_agreement_percent", std::to_string(100.0 * run.agreement()));
}

}  // namespace
}  // namespace moescope
