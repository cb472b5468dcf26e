// moescope tokenize: text on stdin -> token ids on stdout, or ids -> text with --decode.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {
namespace {

struct TokenizeOptions {
  std::string tokenizer;  // a tokenizer.json, or a model directory holding one
  bool json = false;
  bool decode = false;
  bool skip_special_tokens = false;
};

Tokenizer load_tokenizer(const std::filesystem::path& path) {
  if (!std::filesystem::is_directory(path)) return Tokenizer::from_file(path);
  std::optional<Tokenizer> tokenizer = Tokenizer::from_model_dir(path);
  if (!tokenizer) fail("{}: directory has no tokenizer.json", path.string());
  return std::move(*tokenizer);
}

std::string read_stdin() {
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

int32_t parse_id(std::string_view word) {
  int32_t id = 0;
  const auto [end, error] = std::from_chars(word.data(), word.data() + word.size(), id);
  if (error != std::errc() || end != word.data() + word.size()) fail("bad token id {:?} on stdin", word);
  return id;
}

// Ids as a JSON array, or as integers separated by whitespace and/or commas.
std::vector<int32_t> parse_ids(const std::string& input) {
  std::vector<int32_t> ids;
  const std::size_t first = input.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && input[first] == '[') {
    Json array;
    try {
      array = Json::parse(input);
    } catch (const Json::parse_error& e) {
      fail("stdin: malformed JSON array of token ids: {}", e.what());
    }
    for (const Json& value : array) {
      if (!value.is_number_integer() || value.get<int64_t>() < INT32_MIN || value.get<int64_t>() > INT32_MAX) {
        fail("bad token id {} on stdin", value.dump());
      }
      ids.push_back(value.get<int32_t>());
    }
    return ids;
  }
  constexpr std::string_view separators = " \t\r\n,";
  std::string_view rest = input;
  while (true) {
    const std::size_t start = rest.find_first_not_of(separators);
    if (start == std::string_view::npos) break;
    rest.remove_prefix(start);
    const std::size_t end = std::min(rest.find_first_of(separators), rest.size());
    ids.push_back(parse_id(rest.substr(0, end)));
    rest.remove_prefix(end);
  }
  return ids;
}

void run_tokenize(const TokenizeOptions& options) {
  const Tokenizer tokenizer = load_tokenizer(options.tokenizer);
  const std::string input = read_stdin();
  if (options.decode) {
    const std::string text = tokenizer.decode(parse_ids(input), options.skip_special_tokens);
    if (options.json) {
      fmt::print("{}\n", Json(text).dump(-1, ' ', false, Json::error_handler_t::replace));
    } else {
      fmt::print("{}\n", text);
    }
    return;
  }
  const std::vector<int32_t> ids = tokenizer.encode(input);
  if (options.json) {
    fmt::print("[{}]\n", fmt::join(ids, ","));
  } else {
    fmt::print("{}\n", fmt::join(ids, " "));
  }
}

}  // namespace

void add_tokenize(CLI::App& app) {
  auto options = std::make_shared<TokenizeOptions>();
  CLI::App* command = app.add_subcommand(
      "tokenize", "Encode stdin to token ids (one line), or decode ids on stdin to text with --decode");
  command->add_option("--tokenizer", options->tokenizer, "tokenizer.json, or a model directory holding one")
      ->required();
  command->add_flag("--json", options->json, "Print a JSON array of ids (or, with --decode, a JSON string)");
  command->add_flag("--decode", options->decode,
                    "Read ids (whitespace/comma separated, or a JSON array) and print their text");
  command->add_flag("--skip-special-tokens", options->skip_special_tokens, "With --decode, leave out special tokens");
  command->callback([options] { run_tokenize(*options); });
}

}  // namespace moescope::cli
