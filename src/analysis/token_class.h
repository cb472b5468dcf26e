#pragma once
// The class of a token, decided from its decoded text: what `report --tokens` groups routes by.
// The rule (docs/ANALYSIS.md, "Token classes"): a special token of the tokenizer is `special`; otherwise
// the text is stripped of surrounding whitespace and its characters decide:
//   nothing left (only spaces, newlines, tabs)          -> whitespace
//   any letter (Unicode \p{L})                          -> word
//   only ASCII digits 0-9                               -> digit
//   only the symbols + - * / = < > % $ ^                -> operator
//   only those symbols and other punctuation or symbols -> punctuation
//   anything else (an empty token, a piece of a multi-byte character, digits mixed with symbols,
//   control characters, non-ASCII numbers or marks)    -> other
#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moescope {
class Tokenizer;
}

namespace moescope::analysis {

enum class TokenClass : uint8_t { kDigit, kOperator, kPunctuation, kWhitespace, kWord, kSpecial, kOther };
inline constexpr int k_num_token_classes = 7;
// Every class, in the order the report lists them.
inline constexpr std::array<TokenClass, k_num_token_classes> k_token_classes = {
    TokenClass::kDigit, TokenClass::kOperator, TokenClass::kPunctuation, TokenClass::kWhitespace,
    TokenClass::kWord,  TokenClass::kSpecial,  TokenClass::kOther};

// "digit", "operator", "punctuation", "whitespace", "word", "special", "other".
const char* to_string(TokenClass c);
std::optional<TokenClass> token_class_from_string(std::string_view name);

// The class of one token's decoded text (UTF-8, as Tokenizer::decode gives it); never `special`.
TokenClass classify_token_text(std::string_view text);

// `special` for the tokenizer's special tokens, else classify_token_text of the token decoded alone.
// Throws Error for an id that has no token.
TokenClass classify_token(const Tokenizer& tokenizer, int32_t id);

}  // namespace moescope::analysis
