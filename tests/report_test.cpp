// `moescope report` end to end: the real binary on routes files written here, checking the files it
// writes, the numbers in expert_metrics.json against counts worked out by hand, the summary, and
// that every error is one line and a non-zero exit.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>

#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string quote(const fs::path& p) { return fmt::format("'{}'", p.string()); }

// `moescope report ARGS...`; arguments joined with fmt, since GCC 12 warns falsely (-Wrestrict) on
// "literal" + std::string chains.
test::CommandResult report(const std::vector<std::string>& args) {
  return test::run_moescope(fmt::format("report {}", fmt::join(args, " ")));
}

std::string route(int req, int token, int layer, std::vector<int> ids) {
  Json j = {{"type", "route"}, {"req_id", fmt::format("r{}", req)}, {"token_idx", token}, {"layer", layer},
            {"topk_ids", ids}, {"topk_weights", std::vector<double>(ids.size(), 1.0 / ids.size())}};
  return fmt::format("{}\n", j.dump());
}

// Layers 0 and 2 of an 8-expert, top-2 model, 2 requests x 3 tokens.
//   layer 0 picks (0,1) for every token                -> counts 6,6,0,0,0,0,0,0
//   layer 2 picks (t % 8, (t + 4) % 8) for token t of request r with t' = 3r + t
//           t' = 0..5 -> (0,4) (1,5) (2,6) (3,7) (4,0) (5,1) -> counts 2,2,1,1,2,2,1,1
// and a half-written last line.
fs::path write_two_layer_log(const test::TempDir& dir) {
  std::string text =
      R"({"type":"meta","model_id":"test/tiny-moe","moescope_version":"0.1.0","num_layers":3,"num_experts":8,"top_k":2,"layers":[0,2]})"
      "\n";
  for (int r = 0; r < 2; ++r)
    for (int t = 0; t < 3; ++t) {
      const int tt = 3 * r + t;
      text += route(r, t, 0, {0, 1});
      text += route(r, t, 2, {tt % 8, (tt + 4) % 8});
    }
  text += R"({"type":"route","req_id":"r1","token_idx":3,"lay)";  // no newline: cut by a crash
  const fs::path path = dir / "routes.jsonl";
  write_file(path, text);
  return path;
}

Json read_metrics(const fs::path& dir) { return read_json_file(dir / "expert_metrics.json"); }

// An error is one line on stderr ("error: ..."), nothing else.
void expect_one_line_error(const test::CommandResult& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << r.output;
}

TEST(Report, TwoLayersWithTimingWritesEverything) {
  test::TempDir dir;
  const fs::path routes = write_two_layer_log(dir);
  write_file(dir / "timing.json",
             R"({"no_log":{"seconds":10.0,"prompts":2,"prompt_tokens":4,"generated_tokens":2,"tokens_per_s":0.6,"routing_log":false},
                 "log":{"seconds":10.5,"prompts":2,"prompt_tokens":4,"generated_tokens":2,"tokens_per_s":0.57,"routing_log":true}})");
  const fs::path out = dir / "out" / "nested";  // created as needed
  const auto r = report({quote(routes), "--out-dir", quote(out), "--timing", quote(dir / "timing.json")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(out / "expert_hist.png"));
  EXPECT_TRUE(fs::exists(out / "expert_heatmap.png"));

  const Json m = read_metrics(out);
  EXPECT_EQ(m["model_id"], "test/tiny-moe");
  EXPECT_EQ(m["selected_layer"], "all");  // several layers: all by default
  const Json& in = m["input"];
  EXPECT_EQ(in["lines_read"], 14);
  EXPECT_EQ(in["records_used"], 12);
  EXPECT_EQ(in["malformed_lines"], 1);
  EXPECT_EQ(in["malformed_examples"][0]["line"], 14);
  EXPECT_EQ(in["requests"], 2);
  EXPECT_EQ(in["tokens"], 6);
  EXPECT_EQ(in["num_experts"], 8);
  EXPECT_EQ(in["num_experts_source"], "meta");
  EXPECT_EQ(in["layers"], Json({0, 2}));
  EXPECT_TRUE(in["prompt_tokens"].is_null());  // the log cannot tell

  ASSERT_EQ(m["layers"].size(), 2u);
  EXPECT_EQ(m["layers"][0]["layer"], 0);
  EXPECT_EQ(m["layers"][0]["counts"], Json({6, 6, 0, 0, 0, 0, 0, 0}));
  // Layer 0: two experts share 12 selections equally: H = 1 bit of log2(8) = 3 -> 1/3.
  EXPECT_NEAR(m["layers"][0]["entropy_bits"].get<double>(), 1.0, 1e-12);
  EXPECT_NEAR(m["layers"][0]["normalized_entropy"].get<double>(), 1.0 / 3.0, 1e-12);
  // max/mean: mean 12/8 = 1.5, max 6 -> 4.
  EXPECT_NEAR(m["layers"][0]["max_mean_ratio"].get<double>(), 4.0, 1e-12);
  EXPECT_EQ(m["layers"][1]["layer"], 2);
  EXPECT_EQ(m["layers"][1]["counts"], Json({2, 2, 1, 1, 2, 2, 1, 1}));
  // Layer 2: p = 1/6 x4, 1/12 x4: H = 4/6 log2 6 + 4/12 log2 12 = (2/3)(2.5849625) + (1/3)(3.5849625) = 2.9183
  EXPECT_NEAR(m["layers"][1]["entropy_bits"].get<double>(), 2.0 / 3.0 * std::log2(6.0) + 1.0 / 3.0 * std::log2(12.0),
              1e-12);
  // Overall = summed counts: 8,8,1,1,2,2,1,1 (24 selections).
  EXPECT_EQ(m["overall"]["counts"], Json({8, 8, 1, 1, 2, 2, 1, 1}));
  EXPECT_EQ(m["overall"]["selections"], 24);
  EXPECT_EQ(m["overall"]["top_experts"][0]["expert"], 0);
  EXPECT_EQ(m["overall"]["top_experts"][1]["expert"], 1);
  EXPECT_EQ(m["overall"]["top_experts"][2]["expert"], 4);  // 4 and 5 tie at 2: the lower id
  // layer_mean of normalised entropy: (1/3 + 2.9183/3) / 2.
  EXPECT_NEAR(m["overall"]["layer_mean"]["normalized_entropy"].get<double>(),
              (1.0 / 3.0 + (2.0 / 3.0 * std::log2(6.0) + 1.0 / 3.0 * std::log2(12.0)) / 3.0) / 2.0, 1e-12);
  // Overhead: 10.5 - 10 = 0.5 s = 5 %.
  EXPECT_NEAR(m["overhead"]["difference_seconds"].get<double>(), 0.5, 1e-12);
  EXPECT_NEAR(m["overhead"]["percent"].get<double>(), 5.0, 1e-9);
  EXPECT_DOUBLE_EQ(m["overhead"]["no_log_seconds"].get<double>(), 10.0);

  for (const char* s : {"test/tiny-moe", "Top-3 experts:", "1. Expert 0: 8 selections (33.3%)", "Load balance:",
                        "Per layer:", "Overhead:     +0.50s (+5.0%)", "line 14: truncated last line",
                        "2 requests, 6 tokens", "expert_heatmap.png"})
    EXPECT_NE(r.output.find(s), std::string::npos) << "missing \"" << s << "\" in:\n" << r.output;
}

TEST(Report, OneLayerDefaultsToItAndWritesNoHeatmap) {
  test::TempDir dir;
  std::string text =
      R"({"type":"meta","model_id":"m","num_layers":2,"num_experts":4,"top_k":1,"layers":[1]})" "\n";
  for (int t = 0; t < 8; ++t) text += route(0, t, 1, {t < 4 ? 0 : t - 3});  // counts 4,1,1,1... see below
  write_file(dir / "r.jsonl", text);
  // t = 0..3 -> expert 0; t = 4..7 -> experts 1,2,3,4? 4 is out of range for 4 experts: t = 7 is malformed.
  fs::create_directories(dir / "out");
  write_file(dir / "out" / "expert_heatmap.png", "stale");
  const auto r = report({quote(dir / "r.jsonl"), "--out-dir", quote(dir / "out")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json m = read_metrics(dir / "out");
  EXPECT_EQ(m["selected_layer"], 1);
  EXPECT_EQ(m["input"]["malformed_lines"], 1);
  EXPECT_EQ(m["layers"][0]["counts"], Json({4, 1, 1, 1}));
  EXPECT_FALSE(fs::exists(dir / "out" / "expert_heatmap.png"));  // one layer: none, and no stale one either
  EXPECT_TRUE(fs::exists(dir / "out" / "expert_hist.png"));
  EXPECT_NE(r.output.find("Layer 1 (7 selections)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("expert id 4 out of range"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("Per layer:"), std::string::npos) << r.output;
}

TEST(Report, LayerFlagPicksOneLayer) {
  test::TempDir dir;
  const fs::path routes = write_two_layer_log(dir);
  const auto r = report({quote(routes), "--layer 2 --out-dir", quote(dir / "out")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json m = read_metrics(dir / "out");
  EXPECT_EQ(m["selected_layer"], 2);
  EXPECT_EQ(m["layers"].size(), 2u);  // the JSON always has every layer
  EXPECT_TRUE(fs::exists(dir / "out" / "expert_heatmap.png"));
  EXPECT_NE(r.output.find("Layer 2 (12 selections)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1. Expert 0: 2 selections (16.7%)"), std::string::npos) << r.output;
}

TEST(Report, PerTokenDumpWithoutMetaAndNumExperts) {
  test::TempDir dir;
  std::string text;
  for (int t = 0; t < 5; ++t) {
    text += Json({{"forward_pass_id", t}, {"rank", 0}, {"req_id", "q"}, {"token_idx", t}, {"layer", 3},
                  {"topk_ids", {t % 3, 3 + t % 2}}, {"topk_weights", {0.5, 0.5}}})
                .dump();
    text += '\n';
  }
  write_file(dir / "dump.jsonl", text);
  auto r = report({quote(dir / "dump.jsonl"), "--out-dir", quote(dir / "a")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  Json m = read_metrics(dir / "a");
  EXPECT_EQ(m["input"]["num_experts"], 5);  // ids 0..4 seen
  EXPECT_EQ(m["input"]["num_experts_source"], "inferred");
  EXPECT_EQ(m["input"]["forward_passes"], 5);
  EXPECT_NE(r.output.find("inferred"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unknown (no meta line)"), std::string::npos) << r.output;

  r = report({quote(dir / "dump.jsonl"), "--num-experts 60 --out-dir", quote(dir / "b")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  m = read_metrics(dir / "b");
  EXPECT_EQ(m["input"]["num_experts"], 60);
  EXPECT_EQ(m["layers"][0]["counts"].size(), 60u);
  EXPECT_NEAR(m["layers"][0]["max_entropy_bits"].get<double>(), std::log2(60.0), 1e-12);
}

TEST(Report, TimingWithOneRunReportsNoOverhead) {
  test::TempDir dir;
  const fs::path routes = write_two_layer_log(dir);
  write_file(dir / "timing.json", R"({"log":{"seconds":3.0,"routing_log":true}})");
  const auto r = report({quote(routes), "--out-dir", quote(dir / "out"), "--timing", quote(dir / "timing.json")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(read_metrics(dir / "out")["overhead"].is_null());
  EXPECT_NE(r.output.find("no \"no_log\" run"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("Performance overhead"), std::string::npos) << r.output;
}

TEST(Report, ErrorsAreOneLineAndNonZero) {
  test::TempDir dir;
  const fs::path routes = write_two_layer_log(dir);
  const std::string out = fmt::format("--out-dir {}", quote(dir / "out"));
  expect_one_line_error(report({quote(dir / "missing.jsonl"), out}), "missing.jsonl");

  write_file(dir / "junk.jsonl", "not json\n{\"layer\": 0}\n{\"a\":1}\n");
  expect_one_line_error(report({quote(dir / "junk.jsonl"), out}), "no route records");
  write_file(dir / "empty.jsonl", "");
  expect_one_line_error(report({quote(dir / "empty.jsonl"), out}), "no route records");

  expect_one_line_error(report({quote(routes), out, "--layer 1"}),
                        "layer 1 is not in the routes (logged layers: 0, 2)");
  expect_one_line_error(report({quote(routes), out, "--layer first"}), "--layer");

  write_file(dir / "a_file", "x");
  expect_one_line_error(report({quote(routes), "--out-dir", quote(dir / "a_file")}),
                        "a_file");
  expect_one_line_error(report({quote(routes), "--out-dir", quote(dir / "a_file" / "sub")}),
                        "cannot create the output directory");

  write_file(dir / "bad_timing.json", R"({"no_log":{"seconds":"fast"}})");
  expect_one_line_error(report({quote(routes), out, "--timing", quote(dir / "bad_timing.json")}),
                        "bad_timing.json");
  expect_one_line_error(report({quote(routes), out, "--timing", quote(dir / "none.json")}),
                        "none.json");
  // A bad timing file fails before anything is written.
  EXPECT_FALSE(fs::exists(dir / "out" / "expert_metrics.json"));
}

}  // namespace
}  // namespace moescope
