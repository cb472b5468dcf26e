// `moescope run`: the study's timed batch run. timing.json gets one entry per label with the figures the
// report reads; the label follows the routing log; a bad timing file fails before any work; the outputs
// equal `generate`'s for the same prompts.
#include <gtest/gtest.h>

#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

class RunCommand : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto r = test::run_moescope("prompts --synthetic --n 5 --seed 3 --out " + (tmp_ / "prompts.txt").string());
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  std::string run(const std::string& env, const std::string& args) {
    const auto r = test::run_command(env + " " + test::binary().string() + " run --prompts " + (tmp_ / "prompts.txt").string() + " " + args);
    last_exit_ = r.exit_code;
    return r.output;
  }
  test::TempDir tmp_;
  int last_exit_ = -1;
};

TEST_F(RunCommand, MergesEachRunIntoTimingJsonUnderItsLabel) {
  const std::string timing = (tmp_ / "timing.json").string();
  std::string out = run("", "--max-tokens 8 --ignore-eos --temperature 0 --timing " + timing + " --output " + (tmp_ / "a.jsonl").string());
  ASSERT_EQ(last_exit_, 0) << out;
  out = run("MOESCOPE_LOG_MOE=" + (tmp_ / "routes.jsonl").string(), "--max-tokens 8 --ignore-eos --temperature 0 --timing " + timing +
                                                                    " --output " + (tmp_ / "b.jsonl").string());
  ASSERT_EQ(last_exit_, 0) << out;
  out = run("", "--max-tokens 4 --ignore-eos --timing " + timing + " --label warmup");
  ASSERT_EQ(last_exit_, 0) << out;
  const Json t = read_json_file(timing);
  ASSERT_TRUE(t.contains("no_log") && t.contains("log") && t.contains("warmup")) << t.dump();
  for (const char* label : {"no_log", "log"}) {
    const Json& e = t[label];
    EXPECT_EQ(e["prompts"], 5);
    EXPECT_EQ(e["generated_tokens"], 5 * 8);
    EXPECT_GT(e["prompt_tokens"].get<int>(), 5);
    EXPECT_GT(e["seconds"].get<double>(), 0.0);
    EXPECT_NEAR(e["tokens_per_s"].get<double>(), 40.0 / e["seconds"].get<double>(), 1e-6 * e["tokens_per_s"].get<double>());
  }
  EXPECT_EQ(t["no_log"]["routing_log"], false);
  EXPECT_EQ(t["log"]["routing_log"], true);
  EXPECT_EQ(t["warmup"]["generated_tokens"], 5 * 4);
  // The routing log does not change what is generated.
  EXPECT_EQ(read_text_file(tmp_ / "a.jsonl"), read_text_file(tmp_ / "b.jsonl"));
  // The report reads the two runs as the overhead.
  const auto r = test::run_moescope("report " + (tmp_ / "routes.jsonl").string() + " --out-dir " + (tmp_ / "rep").string() + " --timing " + timing);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Overhead:"), std::string::npos) << r.output;
}

TEST_F(RunCommand, OutputsEqualGenerateForTheSamePrompts) {
  std::string out = run("", "--max-tokens 6 --ignore-eos --temperature 0 --output " + (tmp_ / "run.jsonl").string());
  ASSERT_EQ(last_exit_, 0) << out;
  const auto g = test::run_moescope("generate --prompts " + (tmp_ / "prompts.txt").string() + " --max-tokens 6 --ignore-eos --json");
  ASSERT_EQ(g.exit_code, 0) << g.output;
  std::istringstream run_lines(read_text_file(tmp_ / "run.jsonl")), gen_lines(g.output);
  std::string a, b;
  int n = 0;
  while (std::getline(run_lines, a) && std::getline(gen_lines, b)) {
    EXPECT_EQ(Json::parse(a)["output_ids"], Json::parse(b)["output_ids"]) << "prompt " << n;
    ++n;
  }
  EXPECT_EQ(n, 5);
}

TEST_F(RunCommand, BadTimingFilesAndFlagsFailBeforeAnyWork) {
  write_text_file(tmp_ / "bad.json", "[1, 2]");
  std::string out = run("", "--timing " + (tmp_ / "bad.json").string());
  EXPECT_NE(last_exit_, 0);
  EXPECT_NE(out.find("bad.json: timing file is not a JSON object"), std::string::npos) << out;
  EXPECT_EQ(out.find("prompts,"), std::string::npos) << "it ran before failing: " << out;
  out = run("", "--timing /nonexistent-dir/t.json");
  EXPECT_NE(last_exit_, 0);
  EXPECT_NE(out.find("/nonexistent-dir/t.json"), std::string::npos) << out;
  out = run("", "--max-tokens 0");
  EXPECT_NE(last_exit_, 0);
  EXPECT_NE(out.find("--max-tokens must be at least 1"), std::string::npos) << out;
  const auto r = test::run_moescope("run --prompts " + (tmp_ / "missing.txt").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("missing.txt"), std::string::npos) << r.output;
}

TEST(PromptsCommand, SyntheticProblemsAreDeterministicAndExclusiveOfGsm8k) {
  test::TempDir tmp;
  const auto a = test::run_moescope("prompts --synthetic --n 12 --seed 5 --out " + (tmp / "a.txt").string());
  const auto b = test::run_moescope("prompts --synthetic --n 12 --seed 5 --out " + (tmp / "b.txt").string());
  const auto c = test::run_moescope("prompts --synthetic --n 12 --seed 6 --out " + (tmp / "c.txt").string());
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(read_text_file(tmp / "a.txt"), read_text_file(tmp / "b.txt"));
  EXPECT_NE(read_text_file(tmp / "a.txt"), read_text_file(tmp / "c.txt"));
  const std::string text = read_text_file(tmp / "a.txt");
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 12);
  EXPECT_EQ(std::count(text.begin(), text.end(), '?'), 12);  // every problem asks one question
  const auto both = test::run_moescope("prompts --synthetic --gsm8k x.jsonl --n 3 --out " + (tmp / "d.txt").string());
  EXPECT_NE(both.exit_code, 0);
  EXPECT_NE(both.output.find("exactly one of --gsm8k FILE or --synthetic"), std::string::npos) << both.output;
}

}  // namespace
}  // namespace moescope
