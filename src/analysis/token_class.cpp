#include "analysis/token_class.h"

#include <array>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moescope::analysis {
namespace {

constexpr std::string_view k_operator_chars = "+-*/=<>%$^";

// What one character of a stripped token is, from the most to the least telling.
enum class CharKind { kLetter, kDigit, kOperator, kPunctuation, kOther };

CharKind char_kind(char32_t c) {
  if (c == unicode::k_replacement_char) return CharKind::kOther;  // a byte of a character cut between tokens
  if (c < 0x80) {
    if (c >= '0' && c <= '9') return CharKind::kDigit;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CharKind::kLetter;
    if (k_operator_chars.find(static_cast<char>(c)) != std::string_view::npos) return CharKind::kOperator;
    if (c > 0x20 && c < 0x7F) return CharKind::kPunctuation;  // the rest of printable ASCII
    return CharKind::kOther;                                  // control characters
  }
  if (unicode::is_letter(c)) return CharKind::kLetter;
  // Non-ASCII numbers (², ٣), marks and connectors are neither digits nor punctuation here.
  if (unicode::is_word_char(c) || c < 0xA0) return CharKind::kOther;
  return CharKind::kPunctuation;  // punctuation and symbols: — ’ “ × € …
}

}  // namespace

const char* to_string(TokenClass c) {
  switch (c) {
    case TokenClass::kDigit: return "digit";
    case TokenClass::kOperator: return "operator";
    case TokenClass::kPunctuation: return "punctuation";
    case TokenClass::kWhitespace: return "whitespace";
    case TokenClass::kWord: return "word";
    case TokenClass::kSpecial: return "special";
    case TokenClass::kOther: return "other";
  }
  return "other";
}

std::optional<TokenClass> token_class_from_string(std::string_view name) {
  for (TokenClass c : k_token_classes)
    if (name == to_string(c)) return c;
  return std::nullopt;
}

TokenClass classify_token_text(std::string_view text) {
  // Decoded text is valid UTF-8 (Tokenizer::decode repairs it); anything else is not a token's text.
  if (text.empty() || !unicode::is_valid_utf8(text)) return TokenClass::kOther;
  std::vector<char32_t> chars;
  for (size_t pos = 0; pos < text.size();) chars.push_back(unicode::next_code_point(text, pos));
  // Strip surrounding whitespace: " 7" (a byte-level "Ġ7") is a digit, ".\n" punctuation.
  size_t begin = 0, end = chars.size();
  while (begin < end && unicode::is_whitespace(chars[begin])) ++begin;
  while (end > begin && unicode::is_whitespace(chars[end - 1])) --end;
  if (begin == end) return TokenClass::kWhitespace;

  bool letter = false, all_digits = true, all_operators = true, all_symbols = true;
  for (size_t i = begin; i < end; ++i) {
    const CharKind k = char_kind(chars[i]);
    letter = letter || k == CharKind::kLetter;
    all_digits = all_digits && k == CharKind::kDigit;
    all_operators = all_operators && k == CharKind::kOperator;
    all_symbols = all_symbols && (k == CharKind::kOperator || k == CharKind::kPunctuation);
  }
  if (letter) return TokenClass::kWord;
  if (all_digits) return TokenClass::kDigit;
  if (all_operators) return TokenClass::kOperator;
  if (all_symbols) return TokenClass::kPunctuation;
  return TokenClass::kOther;
}

TokenClass classify_token(const Tokenizer& tokenizer, int32_t id) {
  const std::array<int32_t, 1> ids = {id};
  const std::string text = tokenizer.decode(ids);  // throws for an id with no token
  if (tokenizer.is_special(id)) return TokenClass::kSpecial;
  return classify_token_text(text);
}

}  // namespace moescope::analysis
