// The analysis library: metrics against hand-computed values, the routes reader on real files with
// good and broken lines, the timing file and the overhead, and the PNGs decoded back with cairo.
#include <cairo.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <set>

#include "analysis/metrics.h"
#include "analysis/plot.h"
#include "analysis/plot_style.h"
#include "analysis/route_line.h"
#include "analysis/route_reader.h"
#include "analysis/timing.h"
#include "test_util.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::analysis {
namespace {

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// ---------------------------------------------------------------------------------------------
// Metrics

TEST(Metrics, UniformIsPerfectlyBalanced) {
  const std::vector<int64_t> counts = {5, 5, 5, 5};
  const DistributionMetrics m = compute_distribution_metrics(counts);
  // p = 1/4 each: H = -4 * 1/4 * log2(1/4) = 2 bits = log2(4).
  EXPECT_EQ(m.selections, 20);
  EXPECT_DOUBLE_EQ(m.entropy_bits, 2.0);
  EXPECT_DOUBLE_EQ(m.max_entropy_bits, 2.0);
  EXPECT_DOUBLE_EQ(m.normalized_entropy, 1.0);
  // All equal: no pair differs, std 0, max = mean.
  EXPECT_NEAR(m.gini, 0.0, 1e-12);
  EXPECT_DOUBLE_EQ(m.coefficient_of_variation, 0.0);
  EXPECT_DOUBLE_EQ(m.max_mean_ratio, 1.0);
  EXPECT_EQ(m.experts_used, 4);
  for (double s : m.shares) EXPECT_DOUBLE_EQ(s, 0.25);
  // Ties: lower id first.
  ASSERT_EQ(m.top_experts.size(), 4u);
  EXPECT_EQ(m.top_experts[0].expert, 0);
  EXPECT_EQ(m.top_experts[3].expert, 3);
}

TEST(Metrics, OneHotIsMaximallyConcentrated) {
  const std::vector<int64_t> counts = {0, 0, 12, 0};
  const DistributionMetrics m = compute_distribution_metrics(counts, 2);
  // p = (0, 0, 1, 0): H = -1 * log2(1) = 0.
  EXPECT_DOUBLE_EQ(m.entropy_bits, 0.0);
  EXPECT_DOUBLE_EQ(m.max_entropy_bits, 2.0);
  EXPECT_DOUBLE_EQ(m.normalized_entropy, 0.0);
  // Gini, sorted x = (0, 0, 0, 12), n = 4: 2 * (4 * 12) / (4 * 12) - 5/4 = 2 - 1.25 = 0.75 = (n-1)/n.
  EXPECT_DOUBLE_EQ(m.gini, 0.75);
  // mean 3; squared deviations 9 + 9 + 9 + 81 = 108; variance 108/4 = 27; std sqrt(27); CV sqrt(27)/3 = sqrt(3).
  EXPECT_NEAR(m.coefficient_of_variation, std::sqrt(3.0), 1e-12);
  // max/mean = 12 / 3 = 4.
  EXPECT_DOUBLE_EQ(m.max_mean_ratio, 4.0);
  EXPECT_EQ(m.experts_used, 1);
  ASSERT_EQ(m.top_experts.size(), 2u);
  EXPECT_EQ(m.top_experts[0].expert, 2);
  EXPECT_DOUBLE_EQ(m.top_experts[0].share, 1.0);
  EXPECT_EQ(m.top_experts[1].expert, 0);  // a zero count, lowest id among the ties
}

TEST(Metrics, SkewedDistributionMatchesHandComputation) {
  const std::vector<int64_t> counts = {4, 2, 1, 1};  // total 8
  const DistributionMetrics m = compute_distribution_metrics(counts, 3);
  // p = (1/2, 1/4, 1/8, 1/8): H = 1/2*1 + 1/4*2 + 2 * 1/8*3 = 0.5 + 0.5 + 0.75 = 1.75 bits.
  EXPECT_NEAR(m.entropy_bits, 1.75, 1e-12);
  // normalised: 1.75 / log2(4) = 0.875.
  EXPECT_NEAR(m.normalized_entropy, 0.875, 1e-12);
  // Gini by all pairs: |4-2| + |4-1| + |4-1| + |2-1| + |2-1| + |1-1| = 10 over unordered pairs, 20 over
  // ordered ones; G = 20 / (2 * n^2 * mean) = 20 / (2 * 16 * 2) = 0.3125.
  EXPECT_NEAR(m.gini, 0.3125, 1e-12);
  // mean 2; squared deviations 4 + 0 + 1 + 1 = 6; variance 6/4 = 1.5; CV = sqrt(1.5) / 2 = 0.6123724...
  EXPECT_NEAR(m.coefficient_of_variation, 0.6123724356957945, 1e-12);
  // max/mean = 4 / 2.
  EXPECT_DOUBLE_EQ(m.max_mean_ratio, 2.0);
  ASSERT_EQ(m.top_experts.size(), 3u);
  EXPECT_EQ(m.top_experts[0].expert, 0);
  EXPECT_EQ(m.top_experts[1].expert, 1);
  EXPECT_EQ(m.top_experts[2].expert, 2);  // 2 and 3 tie at 1: the lower id
  EXPECT_DOUBLE_EQ(m.top_experts[0].share, 0.5);
  EXPECT_DOUBLE_EQ(m.shares[2], 0.125);
}

TEST(Metrics, NoSelectionsAndOneExpertGiveNumbersNotNaN) {
  const std::vector<int64_t> zeros = {0, 0, 0};
  const DistributionMetrics z = compute_distribution_metrics(zeros);
  EXPECT_EQ(z.selections, 0);
  EXPECT_DOUBLE_EQ(z.entropy_bits, 0.0);
  EXPECT_DOUBLE_EQ(z.normalized_entropy, 0.0);
  EXPECT_DOUBLE_EQ(z.gini, 0.0);
  EXPECT_DOUBLE_EQ(z.coefficient_of_variation, 0.0);
  EXPECT_DOUBLE_EQ(z.max_mean_ratio, 0.0);
  EXPECT_NEAR(z.max_entropy_bits, std::log2(3.0), 1e-12);

  const std::vector<int64_t> one = {7};
  const DistributionMetrics o = compute_distribution_metrics(one);
  EXPECT_DOUBLE_EQ(o.entropy_bits, 0.0);
  EXPECT_DOUBLE_EQ(o.max_entropy_bits, 0.0);
  EXPECT_DOUBLE_EQ(o.normalized_entropy, 1.0);  // log2(1) = 0: defined as balanced, not 0/0
  EXPECT_DOUBLE_EQ(o.gini, 0.0);
  EXPECT_DOUBLE_EQ(o.max_mean_ratio, 1.0);

  for (const DistributionMetrics* m : {&z, &o}) {
    const std::string dumped = to_json(*m).dump();
    EXPECT_EQ(dumped.find("null"), std::string::npos) << dumped;  // nlohmann writes NaN as null
    EXPECT_EQ(dumped.find("nan"), std::string::npos) << dumped;
  }
}

TEST(Metrics, RejectsNoExpertsAndNegativeCounts) {
  EXPECT_THROW(compute_distribution_metrics(std::vector<int64_t>{}), Error);
  EXPECT_THROW(compute_distribution_metrics(std::vector<int64_t>{3, -1}), Error);
}

TEST(Metrics, JsonCarriesEveryField) {
  const Json j = to_json(compute_distribution_metrics(std::vector<int64_t>{4, 2, 1, 1}, 3));
  for (const char* key : {"num_experts", "selections", "experts_used", "entropy_bits", "max_entropy_bits",
                          "normalized_entropy", "gini", "coefficient_of_variation", "max_mean_ratio", "top_experts",
                          "counts", "shares"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["counts"], Json({4, 2, 1, 1}));
  EXPECT_EQ(j["top_experts"][0], Json({{"expert", 0}, {"count", 4}, {"share", 0.5}}));
}

// ---------------------------------------------------------------------------------------------
// Timing and overhead

TEST(Timing, OverheadFromBothRuns) {
  test::TempDir dir;
  write_file(dir / "timing.json", R"({"no_log": {"seconds": 12.0, "prompts": 25, "prompt_tokens": 2000,
     "generated_tokens": 3200, "tokens_per_s": 266.7, "routing_log": false},
     "log": {"seconds": 12.54, "prompts": 25, "prompt_tokens": 2000, "generated_tokens": 3200,
     "tokens_per_s": 255.2, "routing_log": true}, "other_label": {"anything": 1}})");
  const TimingFile t = read_timing_file(dir / "timing.json");
  std::vector<std::string> notes;
  const auto o = logging_overhead(t, notes);
  ASSERT_TRUE(o.has_value());
  // 12.54 - 12.0 = 0.54 s; 0.54 / 12.0 = 4.5 %.
  EXPECT_DOUBLE_EQ(o->no_log_seconds, 12.0);
  EXPECT_DOUBLE_EQ(o->log_seconds, 12.54);
  EXPECT_NEAR(o->difference_seconds, 0.54, 1e-12);
  EXPECT_NEAR(o->percent, 4.5, 1e-9);
  EXPECT_TRUE(notes.empty());
  const Json j = to_json(*o, t);
  EXPECT_DOUBLE_EQ(j["no_log_tokens_per_s"].get<double>(), 266.7);
}

TEST(Timing, MissingRunGivesNoOverheadAndANote) {
  test::TempDir dir;
  write_file(dir / "timing.json", R"({"no_log": {"seconds": 3.5}})");
  std::vector<std::string> notes;
  EXPECT_FALSE(logging_overhead(read_timing_file(dir / "timing.json"), notes).has_value());
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("\"log\""), std::string::npos) << notes[0];
}

TEST(Timing, DifferentWorkIsNoted) {
  TimingFile t;
  t.no_log = TimingRun{10.0, 25, 2000, 3000, std::nullopt, false};
  t.log = TimingRun{11.0, 25, 2000, 3100, std::nullopt, true};
  std::vector<std::string> notes;
  const auto o = logging_overhead(t, notes);
  ASSERT_TRUE(o.has_value());
  EXPECT_NEAR(o->percent, 10.0, 1e-12);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("generated tokens"), std::string::npos) << notes[0];
}

TEST(Timing, BadFilesNameTheFileAndField) {
  test::TempDir dir;
  const std::pair<const char*, const char*> cases[] = {
      {"[1, 2]", "expected a JSON object"},
      {R"({"no_log": {"seconds": "12"}})", "\"seconds\""},
      {R"({"log": {"prompts": 3}})", "no \"seconds\""},
      {R"({"log": {"seconds": -1}})", "non-negative"},
      {R"({"log": {"seconds": 1, "routing_log": "yes"}})", "routing_log"},
      {R"({"log": 5})", "not an object"},
      {"{\"log\": {\"seconds\": 1", "malformed JSON"},
  };
  for (const auto& [text, expected] : cases) {
    write_file(dir / "t.json", text);
    try {
      read_timing_file(dir / "t.json");
      ADD_FAILURE() << "accepted " << text;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("t.json"), std::string::npos) << what;
      EXPECT_NE(what.find(expected), std::string::npos) << what;
    }
  }
  EXPECT_THROW(read_timing_file(dir / "missing.json"), Error);
}

// ---------------------------------------------------------------------------------------------
// Route reader

constexpr const char* k_meta =
    R"({"type":"meta","model_id":"test/moe","moescope_version":"0.1.0","num_layers":4,"num_experts":8,"top_k":2,"layers":[0,3]})";

std::string route(const std::string& req, int token, int layer, int a, int b) {
  return fmt::format(
      R"({{"type":"route","req_id":"{}","token_idx":{},"layer":{},"topk_ids":[{},{}],"topk_weights":[0.6,0.4]}})", req,
      token, layer, a, b);
}

TEST(RouteReader, ReadsTheRoutingLog) {
  test::TempDir dir;
  std::string text = std::string(k_meta) + "\n";
  // r0: 3 tokens, r1: 2 tokens, each on layers 0 and 3.
  text += route("r0", 0, 0, 1, 2) + "\n" + route("r0", 0, 3, 5, 6) + "\n";
  text += route("r0", 1, 0, 1, 3) + "\n" + route("r0", 1, 3, 5, 7) + "\n";
  text += route("r0", 2, 0, 1, 2) + "\n" + route("r0", 2, 3, 0, 5) + "\n";
  text += route("r1", 0, 0, 4, 1) + "\n" + route("r1", 0, 3, 5, 6) + "\n";
  text += route("r1", 1, 0, 2, 1) + "\n" + route("r1", 1, 3, 6, 5) + "\n";
  write_file(dir / "routes.jsonl", text);
  const RouteData d = read_routes(dir / "routes.jsonl");
  EXPECT_TRUE(d.meta.present);
  EXPECT_EQ(d.meta.model_id, "test/moe");
  EXPECT_EQ(d.num_experts, 8);
  EXPECT_EQ(d.num_experts_source, NumExpertsSource::kMeta);
  EXPECT_EQ(d.top_k, 2);
  EXPECT_EQ(d.lines_read, 11);
  EXPECT_EQ(d.records_used, 10);
  EXPECT_EQ(d.malformed_lines, 0);
  EXPECT_EQ(d.requests, 2);
  EXPECT_EQ(d.tokens, 5);  // (r0: 0,1,2) + (r1: 0,1), each seen on two layers
  EXPECT_EQ(d.layers(), (std::vector<int>{0, 3}));
  // Layer 0 ids: 1,2 1,3 1,2 4,1 2,1 -> expert 1: 5, 2: 3, 3: 1, 4: 1.
  EXPECT_EQ(d.counts.at(0), (std::vector<int64_t>{0, 5, 3, 1, 1, 0, 0, 0}));
  // Layer 3 ids: 5,6 5,7 0,5 5,6 6,5 -> expert 0: 1, 5: 5, 6: 3, 7: 1.
  EXPECT_EQ(d.counts.at(3), (std::vector<int64_t>{1, 0, 0, 0, 0, 5, 3, 1}));
  EXPECT_TRUE(d.notes.empty());
}

TEST(RouteReader, ReadsThePerTokenStreamWithoutMeta) {
  test::TempDir dir;
  // The recorder's per_token lines: no "type", forward_pass_id and rank; one unrelated per-pass record.
  const std::string text =
      R"({"forward_pass_id":0,"rank":0,"req_id":"a","token_idx":0,"layer":1,"topk_ids":[9,2],"topk_weights":[0.7,0.3]})"
      "\n"
      R"({"forward_pass_id":0,"rank":0,"req_id":"a","token_idx":1,"layer":1,"topk_ids":[2,4],"topk_weights":[0.5,0.5]})"
      "\n"
      R"({"forward_pass_id":1,"batch_size":1,"latency":0.1,"forward_mode":"decode","expert_activation":2.0})"
      "\n"
      R"({"forward_pass_id":1,"rank":0,"req_id":"a","token_idx":2,"layer":1,"topk_ids":[2,0]})"
      "\n";
  write_file(dir / "per_token.jsonl", text);
  const RouteData d = read_routes(dir / "per_token.jsonl");
  EXPECT_FALSE(d.meta.present);
  EXPECT_EQ(d.records_used, 3);
  EXPECT_EQ(d.skipped_lines, 1);
  EXPECT_EQ(d.malformed_lines, 0);
  // No meta: num_experts = largest id + 1 = 10, and the summary says so.
  EXPECT_EQ(d.num_experts, 10);
  EXPECT_EQ(d.num_experts_source, NumExpertsSource::kInferred);
  ASSERT_FALSE(d.notes.empty());
  EXPECT_NE(d.notes[0].find("inferred"), std::string::npos) << d.notes[0];
  EXPECT_EQ(d.counts.at(1), (std::vector<int64_t>{1, 0, 3, 0, 1, 0, 0, 0, 0, 1}));
  EXPECT_EQ(d.top_k, 2);
  EXPECT_EQ(d.forward_passes, 2);
  EXPECT_EQ(d.ranks, (std::set<int>{0}));
  EXPECT_EQ(d.tokens, 3);
}

TEST(RouteReader, CountsMalformedLinesAndKeepsTheRest) {
  test::TempDir dir;
  std::vector<std::string> lines = {
      k_meta,                                                            // 1
      route("r0", 0, 0, 1, 2),                                           // 2 good
      "this is not json",                                                // 3
      R"({"type":"route","req_id":"r0","token_idx":1,"layer":"0","topk_ids":[1,2]})",  // 4 layer a string
      route("r0", 1, 0, 1, 8),                                           // 5 id 8 >= num_experts 8
      "",                                                                // 6 blank: ignored
      R"({"type":"route","req_id":"r0","token_idx":2,"layer":0,"topk_ids":[3,3]})",    // 7 repeated id
      R"({"type":"route","req_id":"r0","token_idx":3,"layer":0,"topk_ids":[3]})",      // 8 1 entry, top_k 2
      R"({"type":"route","req_id":"r0","token_idx":4,"layer":9,"topk_ids":[3,4]})",    // 9 layer >= num_layers
      route("r0", 5, 0, 6, 7) + "\r",                                    // 10 good (CRLF)
      R"({"type":"route","req_id":"r0","token_idx":6,"layer":0,"topk_ids":[1,2],"topk_weights":[0.5]})",  // 11
      R"([1,2,3])",                                                      // 12 not an object
  };
  std::string text;
  for (const std::string& l : lines) text += l + "\n";
  text += R"({"type":"route","req_id":"r0","tok)";  // 13: the crash cut it
  write_file(dir / "routes.jsonl", text);
  const RouteData d = read_routes(dir / "routes.jsonl");
  EXPECT_EQ(d.lines_read, 13);
  EXPECT_EQ(d.records_used, 2);
  EXPECT_EQ(d.malformed_lines, 9);
  ASSERT_EQ(d.malformed_examples.size(), 5u);  // the first five, in order
  EXPECT_EQ(d.malformed_examples[0].line, 3);
  EXPECT_EQ(d.malformed_examples[1].line, 4);
  EXPECT_EQ(d.malformed_examples[2].line, 5);
  EXPECT_NE(d.malformed_examples[2].reason.find("out of range"), std::string::npos) << d.malformed_examples[2].reason;
  EXPECT_EQ(d.malformed_examples[3].line, 7);
  EXPECT_NE(d.malformed_examples[3].reason.find("twice"), std::string::npos);
  EXPECT_EQ(d.malformed_examples[4].line, 8);
  EXPECT_EQ(d.counts.at(0), (std::vector<int64_t>{0, 1, 1, 0, 0, 0, 1, 1}));

  RouteReadOptions all;
  all.max_malformed_examples = 100;
  const RouteData every = read_routes(dir / "routes.jsonl", all);
  ASSERT_EQ(every.malformed_examples.size(), 9u);
  EXPECT_EQ(every.malformed_examples[4].line, 8);
  EXPECT_EQ(every.malformed_examples[5].line, 9);
  EXPECT_EQ(every.malformed_examples[6].line, 11);
  EXPECT_EQ(every.malformed_examples[7].line, 12);
  EXPECT_EQ(every.malformed_examples[8].line, 13);
  EXPECT_NE(every.malformed_examples[8].reason.find("truncated last line"), std::string::npos);
}

TEST(RouteReader, NumExpertsFlagWinsOverMeta) {
  test::TempDir dir;
  write_file(dir / "r.jsonl", std::string(k_meta) + "\n" + route("r0", 0, 0, 1, 2) + "\n" + route("r0", 1, 0, 5, 2) + "\n");
  RouteReadOptions o;
  o.num_experts = 4;
  const RouteData d = read_routes(dir / "r.jsonl", o);
  EXPECT_EQ(d.num_experts, 4);
  EXPECT_EQ(d.num_experts_source, NumExpertsSource::kFlag);
  EXPECT_EQ(d.records_used, 1);
  EXPECT_EQ(d.malformed_lines, 1);  // expert 5 >= 4
  EXPECT_EQ(d.counts.at(0), (std::vector<int64_t>{0, 1, 1, 0}));
  ASSERT_FALSE(d.notes.empty());
  EXPECT_NE(d.notes[0].find("--num-experts 4"), std::string::npos) << d.notes[0];
}

TEST(RouteReader, NoMetaWithFlagSizesTheCounts) {
  test::TempDir dir;
  write_file(dir / "r.jsonl", R"({"layer":0,"topk_ids":[1]})" "\n");
  RouteReadOptions o;
  o.num_experts = 60;
  const RouteData d = read_routes(dir / "r.jsonl", o);
  EXPECT_EQ(d.counts.at(0).size(), 60u);
  EXPECT_EQ(d.records_without_token, 1);
  EXPECT_EQ(d.tokens, 0);
}

// The fast line parser against the reference: it must take the usual lines, and whatever it takes
// the reference must take too, with the same result. Mutated lines probe the edges.
TEST(RouteLine, FastParserAgreesWithTheReference) {
  RouteLimits limits;
  limits.expert_limit = 60;
  limits.num_experts_known = true;
  limits.num_layers = 24;
  limits.top_k = 4;
  const std::vector<std::string> usual = {
      R"({"type":"route","req_id":"r0","token_idx":0,"layer":0,"topk_ids":[3,12,7,40],"topk_weights":[0.42,0.21,0.2,0.17]})",
      R"({"forward_pass_id":12,"rank":1,"req_id":"cmpl-7","token_idx":130,"layer":23,"topk_ids":[59,0,1,2],"topk_weights":[1e-05,0.5,0.25,0.24999]})",
      R"({ "layer" : 5 , "topk_ids" : [ 1 , 2 , 3 , 4 ] , "extra": [1.5, -2], "note": "x", "flag": true, "nothing": null })",
      R"({"type":"route","layer":1,"topk_ids":[4,5,6,7],"topk_weights":[0.25,0.25,0.25,0.25],"req_id":"a b","token_idx":9})",
  };
  auto reference = [&](const std::string& line) -> std::optional<Route> {
    const Json j = Json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("layer") || !j.contains("topk_ids")) return std::nullopt;
    if (j.contains("type") && j["type"] == "meta") return std::nullopt;
    std::string reason;
    return route_from_json(j, limits, reason);
  };
  for (const std::string& line : usual) {
    const std::optional<Route> fast = parse_route_fast(line, limits);
    ASSERT_TRUE(fast.has_value()) << line;
    EXPECT_EQ(fast, reference(line)) << line;
  }
  const std::vector<std::string> declined = {
      R"({"type":"meta","layer":0,"topk_ids":[1,2,3,4]})",
      R"({"layer":0,"topk_ids":[1,2,3,4],"layer":1})",
      R"({"layer":0,"topk_ids":[1,2,3,60]})",
      R"({"layer":24,"topk_ids":[1,2,3,4]})",
      R"({"layer":0,"topk_ids":[1,2,3,3]})",
      R"({"layer":0,"topk_ids":[1,2,3]})",
      R"({"layer":0,"topk_ids":[1,2,3,4],"topk_weights":[0.5,0.5]})",
      R"({"layer":0,"topk_ids":[1,2,3,4],"req_id":"café"})",
      R"({"layer":0,"topk_ids":[1,2,3,4.0]})",
      R"({"layer":-0,"topk_ids":[1,2,3,4]})",
      R"({"layer":0,"topk_ids":[01,2,3,4]})",
      R"({"layer":0,"topk_ids":[1,2,3,4]} x)",
      R"({"layer":0,"topk_ids":[1,2,3,4],"nested":{"a":1}})",
      R"({"layer":0,"topk_ids":[1,2,3,4],"topk_weights":[1e999,0,0,0]})",
  };
  for (const std::string& line : declined) EXPECT_FALSE(parse_route_fast(line, limits).has_value()) << line;

  std::mt19937 rng(1234);
  const std::string alphabet = R"({}[]:,\0123456789-.eE +"abclrtyx)" "\t";
  int accepted = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    std::string line = usual[static_cast<size_t>(trial) % usual.size()];
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % line.size();
      const char c = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0: line.erase(at, 1); break;
        case 1: line.insert(at, 1, c); break;
        default: line[at] = c;
      }
    }
    const std::optional<Route> fast = parse_route_fast(line, limits);
    if (!fast) continue;
    ++accepted;
    EXPECT_EQ(fast, reference(line)) << line;
  }
  EXPECT_GT(accepted, 1000);  // the mutations reach the accepting paths, not only the declining ones
}

TEST(RouteReader, MissingFileIsAnError) {
  test::TempDir dir;
  EXPECT_THROW(read_routes(dir / "nope.jsonl"), Error);
  EXPECT_THROW(read_routes(dir.path()), Error);
}

// ---------------------------------------------------------------------------------------------
// Plots

struct PngStats {
  int width = 0;
  int height = 0;
  size_t distinct_colours = 0;
  double non_white = 0;  // fraction of pixels that are not background white
  std::vector<uint32_t> pixels;  // 0x00RRGGBB
};

PngStats decode(const std::filesystem::path& path) {
  PngStats s;
  cairo_surface_t* img = cairo_image_surface_create_from_png(path.c_str());
  EXPECT_EQ(cairo_surface_status(img), CAIRO_STATUS_SUCCESS) << path;
  if (cairo_surface_status(img) != CAIRO_STATUS_SUCCESS) {
    cairo_surface_destroy(img);
    return s;
  }
  s.width = cairo_image_surface_get_width(img);
  s.height = cairo_image_surface_get_height(img);
  const int stride = cairo_image_surface_get_stride(img);
  const unsigned char* data = cairo_image_surface_get_data(img);
  std::set<uint32_t> colours;
  size_t non_white = 0;
  for (int y = 0; y < s.height; ++y) {
    const auto* row = reinterpret_cast<const uint32_t*>(data + static_cast<ptrdiff_t>(y) * stride);
    for (int x = 0; x < s.width; ++x) {
      const uint32_t rgb = row[x] & 0xFFFFFFu;
      s.pixels.push_back(rgb);
      colours.insert(rgb);
      non_white += rgb != 0xFFFFFFu;
    }
  }
  s.distinct_colours = colours.size();
  s.non_white = static_cast<double>(non_white) / static_cast<double>(s.pixels.size());
  cairo_surface_destroy(img);
  return s;
}

size_t pixels_near(const PngStats& s, Rgb c, int tolerance = 3) {
  const int r = static_cast<int>(std::lround(c.r * 255)), g = static_cast<int>(std::lround(c.g * 255)),
            b = static_cast<int>(std::lround(c.b * 255));
  size_t n = 0;
  for (uint32_t p : s.pixels)
    n += std::abs(static_cast<int>((p >> 16) & 255) - r) <= tolerance &&
         std::abs(static_cast<int>((p >> 8) & 255) - g) <= tolerance && std::abs(static_cast<int>(p & 255) - b) <= tolerance;
  return n;
}

std::vector<int64_t> skewed_counts(int num_experts) {
  std::vector<int64_t> c;
  for (int e = 0; e < num_experts; ++e) c.push_back(10 + (e * 37) % 91);
  return c;
}

TEST(Plot, HistogramDecodesWithExpectedSizeAndMarksTheTopExperts) {
  test::TempDir dir;
  for (int num_experts : {8, 60}) {
    SCOPED_TRACE(num_experts);
    HistogramPlot p;
    p.model_id = "test/moe";
    p.layer_label = "layer 0";
    p.subtitle = "a subtitle";
    p.counts = skewed_counts(num_experts);
    const auto path = dir / ("hist" + std::to_string(num_experts) + ".png");
    plot_expert_histogram(path, p);
    const PngStats s = decode(path);
    EXPECT_EQ(s.width, k_hist_width);
    EXPECT_EQ(s.height, k_hist_height);
    EXPECT_GT(s.distinct_colours, 50u);  // bars, text antialiasing, grid, dashed line
    EXPECT_GT(s.non_white, 0.05);
    EXPECT_LT(s.non_white, 0.9);
    // Ordinary bars and the accent bars of the top three both cover a good area: the three bars take
    // well over 15000 pixels, more than the rank badges and the legend's accent marks (about 6000).
    EXPECT_GT(pixels_near(s, plot::k_bar), 20000u);
    EXPECT_GT(pixels_near(s, plot::k_accent), 15000u);
  }
}

TEST(Plot, HistogramWithoutTopExpertsHasNoAccent) {
  test::TempDir dir;
  HistogramPlot p;
  p.counts = skewed_counts(16);
  p.marked = 0;
  plot_expert_histogram(dir / "h.png", p);
  EXPECT_EQ(pixels_near(decode(dir / "h.png"), plot::k_accent), 0u);
}

TEST(Plot, HeatmapDecodesWithExpectedSizeAndSpansTheColourMap) {
  test::TempDir dir;
  for (auto [rows, num_experts] : {std::pair{1, 8}, std::pair{3, 8}, std::pair{24, 60}, std::pair{24, 8}}) {
    SCOPED_TRACE(fmt::format("{} layers, {} experts", rows, num_experts));
    HeatmapPlot p;
    p.model_id = "test/moe";
    for (int l = 0; l < rows; ++l) {
      p.layers.push_back(l * 2);
      std::vector<int64_t> c = skewed_counts(num_experts);
      std::rotate(c.begin(), c.begin() + l % num_experts, c.end());
      p.shares.push_back(compute_distribution_metrics(c).shares);
    }
    const auto path = dir / fmt::format("heat{}x{}.png", rows, num_experts);
    plot_expert_heatmap(path, p);
    const PngStats s = decode(path);
    EXPECT_EQ(s.width, k_heatmap_width);
    EXPECT_EQ(s.height, heatmap_height(rows));
    EXPECT_GT(s.distinct_colours, 200u);  // the colour bar alone has 256 bands
    EXPECT_GT(s.non_white, 0.1);
    // Both ends of the map are drawn (the colour bar's ends at least).
    EXPECT_GT(pixels_near(s, viridis(0.0)), 50u);
    EXPECT_GT(pixels_near(s, viridis(1.0)), 50u);
  }
  EXPECT_GT(heatmap_height(24), heatmap_height(3));
}

TEST(Plot, TokenClassesDecodeWithExpectedSizeAndFrameTheTopExperts) {
  test::TempDir dir;
  for (auto [layers, num_experts] : {std::pair{1, 16}, std::pair{7, 16}, std::pair{4, 60}}) {
    SCOPED_TRACE(fmt::format("{} layers, {} experts", layers, num_experts));
    TokenClassPlot p;
    p.model_id = "test/moe";
    p.subtitle = "a subtitle";
    p.num_experts = num_experts;
    for (int l = 0; l < layers; ++l) {
      TokenClassPanel panel;
      panel.title = fmt::format("Layer {}", l);
      panel.note = "I(class; expert) 0.5 bits";
      for (int r = 0; r < 6; ++r) {
        std::vector<int64_t> c = skewed_counts(num_experts);
        std::rotate(c.begin(), c.begin() + (l + r) % num_experts, c.end());
        const DistributionMetrics m = compute_distribution_metrics(c, 1);
        TokenClassRow row;
        row.label = fmt::format("row {}", r);
        row.tokens = r == 5 ? 0 : 100;  // the last row has no tokens: drawn empty, no frame
        row.shares = r == 5 ? std::vector<double>(static_cast<size_t>(num_experts), 0.0) : m.shares;
        if (r < 5) {
          row.top_expert = m.top_experts[0].expert;
          row.top_share = m.top_experts[0].share;
          row.lift = 1.5;
        }
        row.gap_before = r == 1;
        panel.rows.push_back(row);
      }
      p.panels.push_back(panel);
    }
    const auto path = dir / fmt::format("classes{}x{}.png", layers, num_experts);
    plot_expert_token_classes(path, p);
    const PngStats s = decode(path);
    EXPECT_EQ(s.width, k_heatmap_width);
    EXPECT_EQ(s.height, token_class_plot_height(p));
    EXPECT_GT(s.non_white, 0.1);
    // The colour bar spans the map; the frames of the top experts (5 rows per panel) are orange.
    EXPECT_GT(pixels_near(s, viridis(0.0)), 50u);
    EXPECT_GT(pixels_near(s, viridis(1.0)), 50u);
    EXPECT_GT(pixels_near(s, plot::k_accent), static_cast<size_t>(5 * layers * 40));
  }
  // Panels go two to a row: 3 and 4 panels are as tall, 5 taller.
  TokenClassPlot p;
  p.num_experts = 8;
  TokenClassPanel panel;
  panel.rows.push_back({"r", 1, std::vector<double>(8, 0.125), 0, 0.125, std::nullopt, false});
  p.panels.assign(3, panel);
  const int three = token_class_plot_height(p);
  p.panels.assign(4, panel);
  EXPECT_EQ(token_class_plot_height(p), three);
  p.panels.assign(5, panel);
  EXPECT_GT(token_class_plot_height(p), three);
  // Rows must have a share per expert.
  p.panels[0].rows[0].shares.pop_back();
  EXPECT_THROW(plot_expert_token_classes(dir / "bad.png", p), Error);
}

TEST(Plot, ViridisRunsDarkToLightWithoutBumps) {
  const Rgb start = viridis(0.0), end = viridis(1.0);
  EXPECT_NEAR(start.r, 0.267, 1e-3);
  EXPECT_NEAR(start.b, 0.329, 1e-3);
  EXPECT_NEAR(end.r, 0.993, 1e-3);
  EXPECT_NEAR(end.g, 0.906, 1e-3);
  // A sequential map must get lighter all the way: relative luminance strictly increases.
  auto luminance = [](Rgb c) { return 0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b; };
  double previous = -1;
  for (int i = 0; i <= 200; ++i) {
    const double l = luminance(viridis(i / 200.0));
    EXPECT_GT(l, previous) << "t = " << i / 200.0;
    previous = l;
  }
  EXPECT_EQ(viridis(-1).r, start.r);
  EXPECT_EQ(viridis(std::nan("")).r, start.r);
  EXPECT_EQ(viridis(2).r, end.r);
}

TEST(Plot, TicksAndLabels) {
  // 613 / 5 = 122.6 -> step 200 (the next of 1, 2, 2.5, 5 x 100), top 800.
  const plot::Ticks a = plot::nice_ticks(613, 5, true);
  EXPECT_DOUBLE_EQ(a.step, 200);
  EXPECT_DOUBLE_EQ(a.top, 800);
  EXPECT_EQ(a.values, (std::vector<double>{0, 200, 400, 600, 800}));
  // 7.3 / 5 = 1.46 -> step 2, top 8.
  const plot::Ticks b = plot::nice_ticks(7.3, 5, false);
  EXPECT_DOUBLE_EQ(b.step, 2);
  EXPECT_DOUBLE_EQ(b.top, 8);
  // 3 / 5 = 0.6 -> step 1 for counts (no fractional selections).
  EXPECT_DOUBLE_EQ(plot::nice_ticks(3, 5, true).step, 1);
  EXPECT_EQ(plot::tick_label(2.5, 2.5), "2.5");
  EXPECT_EQ(plot::tick_label(1500, 500), "1,500");
  EXPECT_EQ(plot::thousands(1234567), "1,234,567");
  EXPECT_EQ(plot::thousands(12), "12");
  EXPECT_EQ(plot::percent(0.1823), "18.2%");
}

TEST(Plot, UnwritablePathIsAnError) {
  test::TempDir dir;
  HistogramPlot p;
  p.counts = {1, 2};
  try {
    plot_expert_histogram(dir / "no_such_dir" / "h.png", p);
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("h.png"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moescope::analysis
