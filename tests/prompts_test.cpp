// The prompts file (escaping, the shared reader) and `moescope prompts` on GSM8K-shaped JSONL written
// here; and that `generate --prompts` reads the file through the same reader.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>

#include "analysis/prompts_file.h"
#include "test_util.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;
using analysis::escape_prompt;
using analysis::read_prompts_file;
using analysis::unescape_prompt;

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string quote(const fs::path& p) { return fmt::format("'{}'", p.string()); }

TEST(PromptsFile, EscapingRoundTripsAndKeepsOneLinePerPrompt) {
  const std::vector<std::string> prompts = {
      "Janet has 16 eggs.\nShe eats 3.",  // a newline inside a question
      "a \\ backslash and a literal \\n (backslash n)",
      "ends with a backslash \\",
      "CR\r\nLF",
      "\\\\ two backslashes",
      "Unicode: 5 € — naïve 数学",
      "tab\tstays",
  };
  for (const std::string& p : prompts) {
    const std::string line = escape_prompt(p);
    EXPECT_EQ(line.find('\n'), std::string::npos) << line;
    EXPECT_EQ(line.find('\r'), std::string::npos) << line;
    EXPECT_EQ(unescape_prompt(line), p) << line;
  }
  EXPECT_EQ(escape_prompt("a\nb\\c"), "a\\nb\\\\c");
  EXPECT_EQ(unescape_prompt("a\\nb\\\\c"), "a\nb\\c");
}

TEST(PromptsFile, HandWrittenBackslashesThatAreNoEscapeStay) {
  EXPECT_EQ(unescape_prompt("C:\\temp\\data"), "C:\\temp\\data");
  EXPECT_EQ(unescape_prompt("x = 5\\"), "x = 5\\");
  EXPECT_EQ(unescape_prompt("\\t is not an escape here"), "\\t is not an escape here");
}

TEST(PromptsFile, ReaderSkipsEmptyLinesAndHandlesCrlf) {
  test::TempDir dir;
  write_file(dir / "p.txt", "first\r\n\nsecond\\nline\n\r\nthird");  // no newline after the last
  EXPECT_EQ(read_prompts_file(dir / "p.txt"), (std::vector<std::string>{"first", "second\nline", "third"}));
  write_file(dir / "empty.txt", "");
  EXPECT_TRUE(read_prompts_file(dir / "empty.txt").empty());
  EXPECT_THROW(read_prompts_file(dir / "missing.txt"), Error);
  EXPECT_THROW(read_prompts_file(dir.path()), Error);
}

TEST(PromptsFile, WriteThenReadGivesThePromptsBack) {
  test::TempDir dir;
  const std::vector<std::string> prompts = {"one\ntwo", "back\\slash", "plain"};
  analysis::write_prompts_file(dir / "p.txt", prompts);
  EXPECT_EQ(read_text_file(dir / "p.txt"), "one\\ntwo\nback\\\\slash\nplain\n");
  EXPECT_EQ(read_prompts_file(dir / "p.txt"), prompts);
  EXPECT_THROW(analysis::write_prompts_file(dir / "q.txt", {"ok", ""}), Error);
}

// Four GSM8K-shaped records (question + answer), one with a newline and a backslash, blank line between.
fs::path write_gsm8k(const test::TempDir& dir) {
  std::string text;
  const std::vector<std::string> questions = {
      "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
      "Weng earns $12 an hour.\nHow much did she earn for 50 minutes?",
      "A path C:\\x costs 5 \u20ac. What is 2 + 2?",
      "Betty needs $100.",
  };
  for (size_t i = 0; i < questions.size(); ++i) {
    text += Json({{"question", questions[i]}, {"answer", fmt::format("#### {}", i)}}).dump();
    text += i == 1 ? "\n\n" : "\n";
  }
  const fs::path path = dir / "test.jsonl";
  write_file(path, text);
  return path;
}

TEST(PromptsCommand, WritesTheQuestionsOnePerLine) {
  test::TempDir dir;
  const fs::path gsm8k = write_gsm8k(dir);
  const auto r = test::run_moescope(fmt::format("prompts --gsm8k {} --n 2 --offset 1 --out {}", quote(gsm8k),
                                                quote(dir / "prompts.txt")));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("wrote 2 prompts"), std::string::npos) << r.output;
  EXPECT_EQ(read_text_file(dir / "prompts.txt"),
            "Weng earns $12 an hour.\\nHow much did she earn for 50 minutes?\n"
            "A path C:\\\\x costs 5 \u20ac. What is 2 + 2?\n");
  EXPECT_EQ(read_prompts_file(dir / "prompts.txt"),
            (std::vector<std::string>{"Weng earns $12 an hour.\nHow much did she earn for 50 minutes?",
                                      "A path C:\\x costs 5 \u20ac. What is 2 + 2?"}));
}

TEST(PromptsCommand, FewerQuestionsThanAskedWritesWhatThereIsAndWarns) {
  test::TempDir dir;
  const fs::path gsm8k = write_gsm8k(dir);
  const auto r = test::run_moescope(
      fmt::format("prompts --gsm8k {} --n 25 --out {}", quote(gsm8k), quote(dir / "prompts.txt")));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("warning:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("only 4 questions"), std::string::npos) << r.output;
  EXPECT_EQ(read_prompts_file(dir / "prompts.txt").size(), 4u);

  // The default --n is 25 and --offset 0.
  const auto d = test::run_moescope(fmt::format("prompts --gsm8k {} --out {}", quote(gsm8k), quote(dir / "d.txt")));
  ASSERT_EQ(d.exit_code, 0) << d.output;
  EXPECT_NE(d.output.find("asked for 25"), std::string::npos) << d.output;
}

TEST(PromptsCommand, ErrorsNameTheLine) {
  test::TempDir dir;
  const fs::path out = dir / "p.txt";
  auto expect_error = [&](const std::string& content, const std::string& needle, const std::string& flags = "--n 5") {
    write_file(dir / "bad.jsonl", content);
    const auto r = test::run_moescope(fmt::format("prompts --gsm8k {} {} --out {}", quote(dir / "bad.jsonl"), flags,
                                                  quote(out)));
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << "want \"" << needle << "\" in: " << r.output;
  };
  const std::string good = R"({"question":"q?","answer":"a"})" "\n";
  expect_error(good + good + "{\"question\": \"cut\n", "bad.jsonl:3: not valid JSON");
  expect_error(good + "\n" + R"({"answer":"a"})" "\n", "bad.jsonl:3: no \"question\" field");
  expect_error(good + R"({"question":42})" "\n", "bad.jsonl:2: \"question\" is not a string");
  expect_error(good + "[1]\n", "bad.jsonl:2: not a JSON object");
  expect_error(good + good, "no questions from offset 5", "--n 1 --offset 5");
  expect_error(good, "--n", "--n 0");
  const auto missing = test::run_moescope(fmt::format("prompts --gsm8k {} --out {}", quote(dir / "none.jsonl"), quote(out)));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("none.jsonl"), std::string::npos) << missing.output;
  // Lines after the last one needed are not read: a bad line there is no error.
  write_file(dir / "tail.jsonl", good + good + "garbage\n");
  const auto tail = test::run_moescope(fmt::format("prompts --gsm8k {} --n 2 --out {}", quote(dir / "tail.jsonl"), quote(out)));
  EXPECT_EQ(tail.exit_code, 0) << tail.output;
}

TEST(PromptsCommand, GenerateReadsPromptsThroughTheSharedReader) {
  test::TempDir dir;
  const auto made = test::run_moescope(fmt::format("make-model --arch qwen2_moe --preset tiny --seed 3 --out {}",
                                                   quote(dir / "m")));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  // An escaped newline in the file must reach the tokenizer as a newline, like --prompt with a real one
  // (a newline inside single quotes is passed as it is by the shell).
  analysis::write_prompts_file(dir / "p.txt", {"Janet has\n16 eggs.", "back\\slash"});
  const auto from_file = test::run_moescope(
      fmt::format("generate {} --prompts {} --max-tokens 2 --json", quote(dir / "m"), quote(dir / "p.txt")));
  ASSERT_EQ(from_file.exit_code, 0) << from_file.output;
  const auto direct = test::run_moescope(
      fmt::format("generate {} --prompt 'Janet has\n16 eggs.' --max-tokens 2 --json", quote(dir / "m")));
  ASSERT_EQ(direct.exit_code, 0) << direct.output;
  const Json first_from_file = Json::parse(from_file.output.substr(0, from_file.output.find('\n')));
  const Json first_direct = Json::parse(direct.output.substr(0, direct.output.find('\n')));
  EXPECT_EQ(first_from_file["prompt_ids"], first_direct["prompt_ids"]);
  EXPECT_EQ(std::count(from_file.output.begin(), from_file.output.end(), '\n'), 2) << from_file.output;
}

}  // namespace
}  // namespace moescope
