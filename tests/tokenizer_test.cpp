// Tokenizer tests: a golden comparison with HF tokenizers on Qwen3's tokenizer, and unit tests on
// small tokenizer.json files written here, which need no download.
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

const fs::path k_source_dir = MOESCOPE_SOURCE_DIR;
const fs::path k_qwen_tokenizer = k_source_dir / ".cache/qwen-tokenizer/tokenizer.json";
const fs::path k_qwen_golden = k_source_dir / "tests/fixtures/tokenizer/qwen_golden.json";

std::string ids_string(const std::vector<int32_t>& ids) { return fmt::format("{}", fmt::join(ids, " ")); }

// The message's text as JSON, so control characters and combining marks show.
std::string quoted(const std::string& text) { return Json(text).dump(-1, ' ', true, Json::error_handler_t::replace); }

Tokenizer load_qwen() {
  if (!fs::exists(k_qwen_tokenizer)) {
    ADD_FAILURE() << k_qwen_tokenizer << " is missing: run scripts/fetch_fixtures.sh";
    throw Error("missing Qwen tokenizer");
  }
  return Tokenizer::from_file(k_qwen_tokenizer);
}

// ---- Golden: every string of tools/tokenizer_strings.json, ids from HF tokenizers ----

TEST(QwenGolden, IdsAndDecodeMatchHuggingFace) {
  if (!fs::exists(k_qwen_golden)) {
    GTEST_SKIP() << k_qwen_golden << " does not exist yet: generate it with tools/make_tokenizer_fixtures.py";
  }
  const Tokenizer tokenizer = load_qwen();
  const Json golden = read_json_file(k_qwen_golden);
  const Json& cases = golden.at("cases");
  ASSERT_GT(cases.size(), 100u);
  int id_mismatches = 0;
  for (const Json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> want = c.at("ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> got = tokenizer.encode(text);
    if (got != want) {
      ++id_mismatches;
      ADD_FAILURE() << "text " << quoted(text) << "\n  want " << ids_string(want) << "\n  got  " << ids_string(got);
      continue;
    }
    EXPECT_EQ(tokenizer.decode(got), c.at("decoded").get<std::string>()) << "text " << quoted(text);
    EXPECT_EQ(tokenizer.decode(got, /*skip_special_tokens=*/true), c.at("decoded_skip_special").get<std::string>())
        << "text " << quoted(text);
    // Decoding gives back the text itself, up to NFC (the normalizer's one change).
    EXPECT_EQ(tokenizer.decode(got), unicode::nfc(text)) << "text " << quoted(text);
  }
  std::printf("qwen golden: %zu cases, %d id mismatches (tokenizers %s)\n", cases.size(), id_mismatches,
              golden.value("tokenizers_version", "?").c_str());
}

TEST(QwenTokenizer, SpecialTokensAndVocab) {
  const Tokenizer tokenizer = load_qwen();
  EXPECT_EQ(tokenizer.vocab_size(), 151669);
  EXPECT_EQ(tokenizer.token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(tokenizer.token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(tokenizer.token_to_id("<|endoftext|>"), 151643);
  EXPECT_TRUE(tokenizer.is_special(151644));
  EXPECT_FALSE(tokenizer.is_special(151668));  // </think> is added but not special
  EXPECT_FALSE(tokenizer.is_special(9707));
  EXPECT_EQ(tokenizer.encode("<|im_start|>user\n"), (std::vector<int32_t>{151644, 872, 198}));
  EXPECT_EQ(tokenizer.decode(std::vector<int32_t>{151644, 872, 198}, /*skip_special_tokens=*/true), "user\n");
  EXPECT_THROW(tokenizer.decode(std::vector<int32_t>{151669}), Error);
  EXPECT_THROW(tokenizer.decode(std::vector<int32_t>{-1}), Error);
}

TEST(QwenTokenizer, InvalidUtf8BecomesReplacementCharacter) {
  const Tokenizer tokenizer = load_qwen();
  EXPECT_EQ(tokenizer.encode("a\xff" "b"), tokenizer.encode("a\xEF\xBF\xBD" "b"));
  // A truncated 3-byte sequence is one maximal subpart: one U+FFFD, then the next byte.
  EXPECT_EQ(tokenizer.encode("\xE4\xBD" "x"), tokenizer.encode("\xEF\xBF\xBD" "x"));
}

// ---- Unit tests on small tokenizer.json files ----

// A byte-level vocab: the 256 byte tokens (id = byte value), then `extra` tokens from id 256.
Json byte_vocab(const std::vector<std::string>& extra) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level::encode(std::string(1, static_cast<char>(b)))] = b;
  for (std::size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + static_cast<int>(i);
  return vocab;
}

Json small_config(const Json& merges, const std::vector<std::string>& extra_vocab) {
  return Json{
      {"version", "1.0"},
      {"added_tokens",
       Json::array({
           {{"id", 300}, {"content", "<|special|>"}, {"special", true}},
           {{"id", 301}, {"content", "<|special|>x"}, {"special", true}},
           {{"id", 302}, {"content", "plain"}, {"special", false}},
       })},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         Json::array({{{"type", "Split"},
                       {"pattern", {{"Regex", R"( ?\p{L}+| ?\p{N}|\s+|[^\s\p{L}\p{N}]+)"}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", byte_vocab(extra_vocab)}, {"merges", merges}}},
  };
}

class TempDir {
 public:
  TempDir() {
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            (std::string("moescope_tokenizer_") + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  fs::path write(const std::string& name, const std::string& text) const {
    write_text_file(path_ / name, text);
    return path_ / name;
  }

 private:
  fs::path path_;
};

Tokenizer load(const TempDir& dir, const Json& config) {
  return Tokenizer::from_file(dir.write("tokenizer.json", config.dump()));
}

std::vector<int32_t> bytes_of(std::string_view text) {
  std::vector<int32_t> ids;
  for (const char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

TEST(SmallTokenizer, MergesApplyInRankOrder) {
  const TempDir dir;
  // "abc": with "b c" ranked first the word becomes a|bc; with "a b" first, ab|c.
  const Tokenizer bc_first = load(dir, small_config(Json::array({"b c", "a b"}), {"bc", "ab"}));
  EXPECT_EQ(bc_first.encode("abc"), (std::vector<int32_t>{'a', 256}));
  const Tokenizer ab_first = load(dir, small_config(Json::array({"a b", "b c"}), {"bc", "ab"}));
  EXPECT_EQ(ab_first.encode("abc"), (std::vector<int32_t>{257, 'c'}));
  // Pair form of merges gives the same result as the string form.
  const Tokenizer pairs = load(dir, small_config(Json::array({Json::array({"b", "c"}), Json::array({"a", "b"})}),
                                                 {"bc", "ab"}));
  EXPECT_EQ(pairs.encode("abc"), (std::vector<int32_t>{'a', 256}));
}

TEST(SmallTokenizer, MergesChainAndRepeat) {
  const TempDir dir;
  const Tokenizer tokenizer = load(dir, small_config(Json::array({"a a", "aa aa", "aa a"}), {"aa", "aaaa", "aaa"}));
  // Leftmost pairs merge first: aaaaa -> aa|aa|a -> aaaa|a (rank 1 beats rank 2).
  EXPECT_EQ(tokenizer.encode("aaaaa"), (std::vector<int32_t>{257, 'a'}));
  EXPECT_EQ(tokenizer.encode("aaa"), (std::vector<int32_t>{258}));
  // The regex keeps the space with the letters but merges never cross pieces.
  EXPECT_EQ(tokenizer.encode("aa aa"), (std::vector<int32_t>{256, ' ', 256}));
}

TEST(SmallTokenizer, AddedTokensMatchBeforeBpeLongestFirst) {
  const TempDir dir;
  const Tokenizer tokenizer = load(dir, small_config(Json::array({"a b"}), {"ab"}));
  EXPECT_EQ(tokenizer.encode("ab<|special|>ab"), (std::vector<int32_t>{256, 300, 256}));
  EXPECT_EQ(tokenizer.encode("<|special|>xy"), (std::vector<int32_t>{301, 'y'}));  // longest match wins
  EXPECT_EQ(tokenizer.encode("<|special|"), bytes_of("<|special|"));
  // A non-special added token also matches inside words, and decode keeps it unless it is special.
  EXPECT_EQ(tokenizer.encode("explained"), (std::vector<int32_t>{'e', 'x', 302, 'e', 'd'}));
  const std::vector<int32_t> ids = tokenizer.encode("plain<|special|>");
  EXPECT_EQ(tokenizer.decode(ids), "plain<|special|>");
  EXPECT_EQ(tokenizer.decode(ids, /*skip_special_tokens=*/true), "plain");
  EXPECT_TRUE(tokenizer.is_special(300));
  EXPECT_FALSE(tokenizer.is_special(302));
  EXPECT_EQ(tokenizer.token_to_id("<|special|>"), 300);
  EXPECT_EQ(tokenizer.token_to_id("ab"), 256);
  EXPECT_EQ(tokenizer.token_to_id("missing"), std::nullopt);
  EXPECT_EQ(tokenizer.vocab_size(), 303);
}

TEST(SmallTokenizer, NfcNormalizesBeforeBpe) {
  const TempDir dir;
  const Tokenizer tokenizer = load(dir, small_config(Json::array(), {}));
  // e + U+0301 COMBINING ACUTE composes to U+00E9.
  EXPECT_EQ(tokenizer.encode("e\xCC\x81"), bytes_of("\xC3\xA9"));
  Json config = small_config(Json::array(), {});
  config["normalizer"] = nullptr;
  const Tokenizer raw = load(dir, config);
  EXPECT_EQ(raw.encode("e\xCC\x81"), bytes_of("e\xCC\x81"));
  config["normalizer"] = Json{{"type", "Sequence"}, {"normalizers", Json::array({{{"type", "NFC"}}})}};
  EXPECT_EQ(load(dir, config).encode("e\xCC\x81"), bytes_of("\xC3\xA9"));
}

TEST(SmallTokenizer, ByteLevelRegexKeepsMergesInsideWords) {
  const TempDir dir;
  // "oĠ" would join the end of one word and the space of the next; GPT-2's regex forbids that.
  Json config = small_config(Json::array({"o Ġ"}), {"oĠ"});
  config["pre_tokenizer"] = Json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  EXPECT_EQ(load(dir, config).encode("go on"), (std::vector<int32_t>{'g', 256, 'o', 'n'}));
  config["pre_tokenizer"]["use_regex"] = true;
  EXPECT_EQ(load(dir, config).encode("go on"), bytes_of("go on"));
  config["pre_tokenizer"]["add_prefix_space"] = true;
  EXPECT_EQ(load(dir, config).encode("go"), bytes_of(" go"));
}

TEST(SmallTokenizer, DecodeRoundTripsAndRejectsBadIds) {
  const TempDir dir;
  const Tokenizer tokenizer = load(dir, small_config(Json::array({"a b"}), {"ab"}));
  for (const std::string text : {"", "ab ab\n\tab", "caf\xC3\xA9 \xE4\xBD\xA0\xE5\xA5\xBD", "\xF0\x9F\x98\x80!"}) {
    EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text) << quoted(text);
  }
  // Half a character decodes to U+FFFD, as HF's from_utf8_lossy does.
  EXPECT_EQ(tokenizer.decode(std::vector<int32_t>{0xE4, 0xBD}), "\xEF\xBF\xBD");
  EXPECT_THROW(tokenizer.decode(std::vector<int32_t>{303}), Error);
  EXPECT_THROW(tokenizer.decode(std::vector<int32_t>{290}), Error);  // a hole between vocab and added tokens
  EXPECT_THROW(tokenizer.id_to_token(-5), Error);
  EXPECT_EQ(tokenizer.id_to_token(256), "ab");
}

// Loading `config` throws an Error whose message names the file and contains `fragment`.
void expect_load_error(const TempDir& dir, const std::string& text, const std::string& fragment) {
  const fs::path path = dir.write("tokenizer.json", text);
  try {
    Tokenizer::from_file(path);
    ADD_FAILURE() << "no error for " << text.substr(0, 200);
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
  }
}

TEST(SmallTokenizer, MalformedFilesNameTheFile) {
  const TempDir dir;
  Json config = small_config(Json::array({"a b"}), {"ab"});
  Json no_model = config;
  no_model.erase("model");
  expect_load_error(dir, no_model.dump(), "model");
  expect_load_error(dir, "{ not json", "malformed JSON");

  Json bad_merge = config;
  bad_merge["model"]["merges"] = Json::array({"ab"});
  expect_load_error(dir, bad_merge.dump(), "merges[0]");
  bad_merge["model"]["merges"] = Json::array({"a b", "x yz"});
  expect_load_error(dir, bad_merge.dump(), "merges[1]");
  bad_merge["model"]["merges"] = Json::array({Json::array({"a"})});
  expect_load_error(dir, bad_merge.dump(), "merges[0]");

  Json no_vocab = config;
  no_vocab["model"].erase("vocab");
  expect_load_error(dir, no_vocab.dump(), "vocab");
  Json bad_normalizer = config;
  bad_normalizer["normalizer"] = Json{{"type", "Lowercase"}};
  expect_load_error(dir, bad_normalizer.dump(), "Lowercase");
  Json bad_regex = config;
  bad_regex["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_load_error(dir, bad_regex.dump(), "regex");
  Json wrong_type = config;
  wrong_type["added_tokens"][0]["content"] = 5;
  expect_load_error(dir, wrong_type.dump(), "added_tokens[0]");

  EXPECT_THROW(Tokenizer::from_file(dir.path() / "absent.json"), Error);
}

TEST(SmallTokenizer, FromModelDir) {
  const TempDir dir;
  EXPECT_FALSE(Tokenizer::from_model_dir(dir.path()).has_value());
  dir.write("tokenizer.json", small_config(Json::array(), {}).dump());
  const std::optional<Tokenizer> tokenizer = Tokenizer::from_model_dir(dir.path());
  ASSERT_TRUE(tokenizer.has_value());
  EXPECT_EQ(tokenizer->encode("hi"), bytes_of("hi"));
}

// ---- CLI: moescope tokenize ----

struct CommandResult {
  int exit_code;
  std::string output;  // stdout and stderr together
};

// Runs `command` in a shell with `input` on stdin.
CommandResult run_command(const std::string& command, const std::string& input, const TempDir& dir) {
  const fs::path input_path = dir.write("stdin.txt", input);
  const std::string full = command + " < '" + input_path.string() + "' 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(full.c_str(), "r"), &pclose);
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  std::array<char, 4096> buffer{};
  while (const std::size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe.get())) output.append(buffer.data(), n);
  const int status = pclose(pipe.release());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(TokenizeCommand, EncodesAndDecodes) {
  const TempDir dir;
  const fs::path tokenizer = dir.write("tokenizer.json", small_config(Json::array({"a b"}), {"ab"}).dump());
  const std::string binary = std::string("'") + MOESCOPE_BINARY + "' tokenize --tokenizer '" + tokenizer.string() + "'";

  CommandResult result = run_command(binary, "ab<|special|>c", dir);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(result.output, "256 300 99\n");
  result = run_command(binary + " --json", "ab<|special|>c", dir);
  EXPECT_EQ(result.output, "[256,300,99]\n");
  // A model directory works as well as the file.
  result = run_command(std::string("'") + MOESCOPE_BINARY + "' tokenize --tokenizer '" + dir.path().string() + "'",
                       "ab", dir);
  EXPECT_EQ(result.output, "256\n");

  result = run_command(binary + " --decode", "256, 300\n99", dir);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(result.output, "ab<|special|>c\n");
  result = run_command(binary + " --decode", "[256, 300, 99]", dir);
  EXPECT_EQ(result.output, "ab<|special|>c\n");
  result = run_command(binary + " --decode --skip-special-tokens", "256 300 99", dir);
  EXPECT_EQ(result.output, "abc\n");
}

TEST(TokenizeCommand, BadIdsFailWithOneLine) {
  const TempDir dir;
  const fs::path tokenizer = dir.write("tokenizer.json", small_config(Json::array(), {}).dump());
  const std::string binary = std::string("'") + MOESCOPE_BINARY + "' tokenize --tokenizer '" + tokenizer.string() + "'";
  for (const std::string input : {"1 2 banana", "99999", "[1, \"x\"]", "[1, 2", "-1"}) {
    const CommandResult result = run_command(binary + " --decode", input, dir);
    EXPECT_NE(result.exit_code, 0) << input;
    EXPECT_TRUE(result.output.starts_with("error: ")) << result.output;
    EXPECT_EQ(result.output.find('\n'), result.output.size() - 1) << result.output;
  }
  const CommandResult missing =
      run_command(std::string("'") + MOESCOPE_BINARY + "' tokenize --tokenizer '" + dir.path().string() + "/none.json'",
                  "hi", dir);
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("none.json"), std::string::npos) << missing.output;
}

}  // namespace
}  // namespace moescope
