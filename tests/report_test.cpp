// `moescope report` end to end: the real binary on routes files written here, checking the files it
// writes, the numbers in expert_metrics.json against counts worked out by hand, the summary, and
// that every error is one line and a non-zero exit.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>

#include "test_util.h"
#include "tokenizer/tokenizer.h"
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

// --tokens: routes joined with the token ids of a `moescope run --output` file, classified with the
// shipped model's tokenizer. One request, 4 experts, top-1, layers 0 and 1:
//   token_idx  token           class        layer 0  layer 1
//   0          <|im_start|>    special  p   2        0
//   1          " the"          word     p   1        0
//   2          "7"             digit    p   3        0
//   3          " +"            operator g   1        0
//   4          "3"             digit    g   3        0
//   5          ".\n"           punctuation  (the last sampled token: never fed back, no route)
struct TokensCase {
  fs::path routes, outputs;
};

int32_t token_id(const Tokenizer& tok, const char* token) {
  const std::optional<int32_t> id = tok.token_to_id(token);
  EXPECT_TRUE(id) << token;
  return id.value_or(0);
}

fs::path shipped_model() { return test::source_dir() / "models" / "moescope-tiny-gsm8k"; }

TokensCase write_tokens_case(const test::TempDir& dir) {
  const Tokenizer tok = Tokenizer::from_file(shipped_model() / "tokenizer.json");
  // Vocab spellings: "\u0120" is the byte-level space, "\u010a" the newline.
  const std::vector<int32_t> prompt = {token_id(tok, "<|im_start|>"), token_id(tok, "\u0120the"), token_id(tok, "7")};
  const std::vector<int32_t> output = {token_id(tok, "\u0120+"), token_id(tok, "3"), token_id(tok, ".\u010a")};
  TokensCase c{dir / "routes.jsonl", dir / "outputs.jsonl"};
  write_file(c.outputs, Json({{"req_id", "r0"},
                              {"prompt_ids", prompt},
                              {"output_ids", output},
                              {"finish_reason", "length"},
                              {"text", " + 3.\n"}})
                                .dump() +
                            "\n");
  std::string text =
      R"({"type":"meta","model_id":"test/classes","num_layers":2,"num_experts":4,"top_k":1,"layers":[0,1]})"
      "\n";
  const int layer0[] = {2, 1, 3, 1, 3};
  for (int t = 0; t < 5; ++t) {
    text += route(0, t, 0, {layer0[t]});
    text += route(0, t, 1, {0});
  }
  write_file(c.routes, text);
  return c;
}

const Json& class_row(const Json& layer, const char* name) {
  for (const Json& row : layer["classes"])
    if (row["class"] == name) return row;
  static const Json none;
  ADD_FAILURE() << "no class " << name;
  return none;
}

TEST(Report, TokensAddTokenClassesAndThePromptGeneratedShift) {
  test::TempDir dir;
  const TokensCase c = write_tokens_case(dir);
  const fs::path out = dir / "out";
  const auto r = report(
      {quote(c.routes), "--out-dir", quote(out), "--tokens", quote(c.outputs), "--model", quote(shipped_model())});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(out / "expert_token_classes.png"));
  const Json m = read_metrics(out);
  EXPECT_EQ(m["input"]["prompt_tokens"], 3);
  EXPECT_EQ(m["input"]["generated_tokens"], 2);

  const Json t = read_json_file(out / "token_classes.json");
  EXPECT_EQ(t["classes"], Json({"digit", "operator", "punctuation", "whitespace", "word", "special", "other"}));
  EXPECT_EQ(t["requests"], 1);
  EXPECT_EQ(t["prompt_tokens"], 3);
  EXPECT_EQ(t["generated_tokens"], 2);
  EXPECT_EQ(t["tokens_without_routes"], 0);
  ASSERT_EQ(t["layers"].size(), 2u);
  const Json& l0 = t["layers"][0];
  EXPECT_EQ(l0["layer"], 0);
  EXPECT_EQ(l0["tokens"], 5);
  // Layer 0 selections per expert: 0, 2 (" the", " +"), 1 (<|im_start|>), 2 ("7", "3").
  EXPECT_EQ(class_row(l0, "digit")["counts"], Json({0, 0, 0, 2}));
  EXPECT_EQ(class_row(l0, "digit")["tokens"], 2);
  EXPECT_EQ(class_row(l0, "operator")["counts"], Json({0, 1, 0, 0}));
  EXPECT_EQ(class_row(l0, "word")["counts"], Json({0, 1, 0, 0}));
  EXPECT_EQ(class_row(l0, "special")["counts"], Json({0, 0, 1, 0}));
  EXPECT_EQ(class_row(l0, "punctuation")["tokens"], 0);  // ".\n" was sampled last: no route
  EXPECT_TRUE(class_row(l0, "punctuation")["top_expert"].is_null());
  // digit: all on expert 3, which has 2 of the layer's 5 selections: lift 1 / (2/5) = 2.5.
  EXPECT_EQ(class_row(l0, "digit")["top_expert"]["expert"], 3);
  EXPECT_DOUBLE_EQ(class_row(l0, "digit")["top_expert"]["share"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(class_row(l0, "digit")["top_expert"]["lift"].get<double>(), 2.5);
  // special: expert 2, which has 1 of 5: lift 5, the largest.
  EXPECT_EQ(l0["strongest"]["class"], "special");
  EXPECT_EQ(l0["strongest"]["expert"], 2);
  EXPECT_DOUBLE_EQ(l0["strongest"]["lift"].get<double>(), 5.0);
  // The class decides the expert, so I = H(expert) of (2, 1, 2)/5 = 0.8 log2 2.5 + 0.2 log2 5;
  // H(class) of (2, 1, 1, 1)/5 = 0.4 log2 2.5 + 0.6 log2 5.
  const double mi = 0.8 * std::log2(2.5) + 0.2 * std::log2(5.0);
  const double h_class = 0.4 * std::log2(2.5) + 0.6 * std::log2(5.0);
  EXPECT_NEAR(l0["mutual_information_bits"].get<double>(), mi, 1e-12);
  EXPECT_NEAR(l0["class_entropy_bits"].get<double>(), h_class, 1e-12);
  EXPECT_NEAR(l0["normalized_mutual_information"].get<double>(), mi / h_class, 1e-12);
  // Prompt (0, 1, 1, 1)/3, generated (0, 1, 0, 1)/2: |d| = 1/6 + 1/3 + 1/6 = 2/3, TV = 1/3.
  const Json& pg = l0["prompt_vs_generated"];
  EXPECT_EQ(pg["prompt"]["counts"], Json({0, 1, 1, 1}));
  EXPECT_EQ(pg["generated"]["counts"], Json({0, 1, 0, 1}));
  EXPECT_NEAR(pg["total_variation"].get<double>(), 1.0 / 3, 1e-12);
  // Layer 1 sends everything to expert 0: no information, no shift.
  const Json& l1 = t["layers"][1];
  EXPECT_NEAR(l1["mutual_information_bits"].get<double>(), 0.0, 1e-12);
  EXPECT_NEAR(l1["prompt_vs_generated"]["total_variation"].get<double>(), 0.0, 1e-12);

  for (const char* s :
       {"Token classes", "routed tokens: 3 prompt, 2 generated", "1 requests, 5 tokens: 3 prompt, 2 generated",
        "digit 2 (40.0%)", "special -> 2 (100.0%, 5.00x)", "0.333", "token_classes.json", "expert_token_classes.png"})
    EXPECT_NE(r.output.find(s), std::string::npos) << "missing \"" << s << "\" in:\n" << r.output;
  EXPECT_NE(r.output.find(fmt::format("{:.3f}", mi)), std::string::npos) << r.output;

  // Without --model the shipped model's tokenizer is used: the same classes.
  const auto d = report({quote(c.routes), "--out-dir", quote(dir / "default"), "--tokens", quote(c.outputs)});
  ASSERT_EQ(d.exit_code, 0) << d.output;
  EXPECT_EQ(read_json_file(dir / "default" / "token_classes.json")["layers"], t["layers"]);
  // A tokenizer.json path works as --model too.
  const auto f = report({quote(c.routes), "--out-dir", quote(dir / "file"), "--tokens", quote(c.outputs), "--model",
                         quote(shipped_model() / "tokenizer.json")});
  ASSERT_EQ(f.exit_code, 0) << f.output;

  // A report without --tokens in the same directory removes the token-class files of the earlier one.
  const auto again = report({quote(c.routes), "--out-dir", quote(out)});
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_FALSE(fs::exists(out / "token_classes.json"));
  EXPECT_FALSE(fs::exists(out / "expert_token_classes.png"));
  EXPECT_EQ(again.output.find("Token classes"), std::string::npos) << again.output;
}

TEST(Report, TokensErrorsAreOneLineAndNonZero) {
  test::TempDir dir;
  const TokensCase c = write_tokens_case(dir);
  const fs::path out = dir / "out";
  const auto with_tokens = [&](const fs::path& tokens, const std::vector<std::string>& more = {}) {
    std::vector<std::string> args = {quote(c.routes), "--out-dir", quote(out), "--tokens", quote(tokens)};
    args.insert(args.end(), more.begin(), more.end());
    return report(args);
  };
  expect_one_line_error(with_tokens(dir / "missing.jsonl"), "missing.jsonl: cannot open the tokens file");
  write_file(dir / "junk.jsonl", "{\"req_id\": \"r0\", \"prompt_ids\": [1\n");
  expect_one_line_error(with_tokens(dir / "junk.jsonl"), "junk.jsonl:1: not valid JSON");
  write_file(dir / "no_ids.jsonl", R"({"req_id":"r0","text":"hi"})"
                                   "\n");
  expect_one_line_error(with_tokens(dir / "no_ids.jsonl"), "no_ids.jsonl:1: no \"prompt_ids\"");
  // The routes are of r0; a tokens file of r1 and r2 does not cover them.
  write_file(dir / "other.jsonl", R"({"req_id":"r1","prompt_ids":[5],"output_ids":[6]})"
                                  "\n"
                                  R"({"req_id":"r2","prompt_ids":[5],"output_ids":[6]})"
                                  "\n");
  expect_one_line_error(with_tokens(dir / "other.jsonl"), "line 2: req_id \"r0\" is not in the tokens file");
  // r0 with 2 + 1 tokens: the routes go up to token_idx 4.
  write_file(dir / "short.jsonl", R"({"req_id":"r0","prompt_ids":[5,5],"output_ids":[6]})"
                                  "\n");
  expect_one_line_error(with_tokens(dir / "short.jsonl"),
                        "routes.jsonl: line 8: token_idx 3 of request \"r0\" is beyond its 3 tokens");
  // An id the tokenizer (4096 ids) does not have.
  write_file(dir / "big.jsonl", R"({"req_id":"r0","prompt_ids":[5,99999,5],"output_ids":[6,6,6]})"
                                "\n");
  expect_one_line_error(with_tokens(dir / "big.jsonl"), "big.jsonl:1: request \"r0\": token id 99999 is out of range");
  // Routes without req_id cannot be joined.
  write_file(dir / "anon.jsonl", R"({"layer":0,"topk_ids":[1]})"
                                 "\n");
  expect_one_line_error(report({quote(dir / "anon.jsonl"), "--out-dir", quote(out), "--tokens", quote(c.outputs)}),
                        "line 1: the route has no req_id");
  // A model directory without a tokenizer, and one that does not exist.
  fs::create_directories(dir / "no_tokenizer");
  expect_one_line_error(with_tokens(c.outputs, {"--model", quote(dir / "no_tokenizer")}), "has no tokenizer.json");
  expect_one_line_error(with_tokens(c.outputs, {"--model", quote(dir / "nowhere")}),
                        "nowhere: no such model directory");
  // Every error came before anything was written.
  EXPECT_FALSE(fs::exists(out / "expert_metrics.json"));
  EXPECT_FALSE(fs::exists(out / "token_classes.json"));
  // --model means nothing without --tokens.
  const auto r = report({quote(c.routes), "--out-dir", quote(out), "--model", quote(shipped_model())});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--tokens"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace moescope
