#include "tokenizer/pre_tokenizer.h"

#include <pcre2.h>

#include "tokenizer/byte_level.h"
#include "tokenizer/unicode.h"
#include "util/error.h"

namespace moescope {
namespace {

// GPT-2's pattern, used by ByteLevel when use_regex is true (HF's ByteLevel::new default).
constexpr const char* k_gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

}  // namespace

struct RegexSplitter::Compiled {
  std::unique_ptr<pcre2_code, CodeDeleter> code;
};

RegexSplitter::RegexSplitter(const std::string& pattern, bool literal, const std::filesystem::path& source)
    : compiled_(std::make_unique<Compiled>()) {
  uint32_t options = PCRE2_UTF | PCRE2_UCP;
  if (literal) options |= PCRE2_LITERAL;
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                                   &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    fail("{}: pre_tokenizer regex {:?} does not compile at offset {}: {}", source.string(), pattern,
         error_offset, reinterpret_cast<const char*>(message));
  }
  compiled_->code.reset(code);
  // JIT is an optimisation only: a build of PCRE2 without it falls back to the interpreter.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
}

RegexSplitter::~RegexSplitter() = default;
RegexSplitter::RegexSplitter(RegexSplitter&&) noexcept = default;
RegexSplitter& RegexSplitter::operator=(RegexSplitter&&) noexcept = default;

void RegexSplitter::split(std::string_view text, std::vector<std::string>& pieces) const {
  pcre2_code* code = compiled_->code.get();
  const std::unique_ptr<pcre2_match_data, MatchDataDeleter> match(pcre2_match_data_create_from_pattern(code, nullptr));
  if (!match) fail("out of memory creating PCRE2 match data");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  std::size_t gap_start = 0;  // where the text not yet emitted begins
  std::size_t search_from = 0;
  while (search_from <= text.size()) {
    // The text was validated up front, so PCRE2 need not check it again on every call.
    const int rc = pcre2_match(code, subject, text.size(), search_from, PCRE2_NO_UTF_CHECK, match.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      fail("pre_tokenizer regex failed: {}", reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
    const std::size_t start = ovector[0];
    const std::size_t end = ovector[1];
    if (end == start) {
      // An empty match splits nothing; step over one code point so the search moves on.
      if (search_from == text.size()) break;
      unicode::next_code_point(text, search_from);
      continue;
    }
    if (start > gap_start) pieces.emplace_back(text.substr(gap_start, start - gap_start));
    pieces.emplace_back(text.substr(start, end - start));
    gap_start = end;
    search_from = end;
  }
  if (gap_start < text.size()) pieces.emplace_back(text.substr(gap_start));
}

PreTokenizer::PreTokenizer(const Json& config, const std::filesystem::path& source) {
  if (config.is_null()) return;
  add_step(config, source);
}

void PreTokenizer::add_step(const Json& step, const std::filesystem::path& source) {
  const std::string type = step.value("type", "");
  if (byte_level_) {
    fail("{}: pre_tokenizer step {} after ByteLevel is not supported (ByteLevel must come last)",
         source.string(), type);
  }
  if (type == "Sequence") {
    for (const Json& inner : step.at("pretokenizers")) add_step(inner, source);
  } else if (type == "Split") {
    const std::string behavior = step.value("behavior", "Isolated");
    if (behavior != "Isolated" || step.value("invert", false)) {
      fail("{}: pre_tokenizer Split with behavior {} invert {} is not supported (only Isolated, invert false)",
           source.string(), behavior, step.value("invert", false));
    }
    const Json& pattern = step.at("pattern");
    if (pattern.contains("Regex")) {
      splits_.emplace_back(pattern.at("Regex").get<std::string>(), false, source);
    } else if (pattern.contains("String")) {
      splits_.emplace_back(pattern.at("String").get<std::string>(), true, source);
    } else {
      fail("{}: pre_tokenizer Split pattern has neither Regex nor String", source.string());
    }
  } else if (type == "ByteLevel") {
    byte_level_ = true;
    add_prefix_space_ = step.value("add_prefix_space", false);
    prefix_space_after_ = splits_.size();
    if (step.value("use_regex", true)) splits_.emplace_back(k_gpt2_pattern, false, source);
  } else {
    fail("{}: pre_tokenizer type {:?} is not supported (Sequence, Split, ByteLevel)", source.string(), type);
  }
}

std::vector<std::string> PreTokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> pieces{std::string(text)};
  std::vector<std::string> next;
  for (std::size_t i = 0; i <= splits_.size(); ++i) {
    if (add_prefix_space_ && i == prefix_space_after_) {
      for (std::string& piece : pieces) {
        if (!piece.starts_with(' ')) piece.insert(piece.begin(), ' ');
      }
    }
    if (i == splits_.size()) break;
    next.clear();
    for (const std::string& piece : pieces) splits_[i].split(piece, next);
    pieces.swap(next);
  }
  if (byte_level_) {
    for (std::string& piece : pieces) piece = byte_level::encode(piece);
  }
  return pieces;
}

}  // namespace moescope
