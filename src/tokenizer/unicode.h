#pragma once
// The UTF-8 and Unicode pieces the tokenizer needs: repairing invalid UTF-8, NFC (utf8proc), and
// walking code points.
#include <cstddef>
#include <string>
#include <string_view>

namespace moescope::unicode {

inline constexpr char32_t k_replacement_char = 0xFFFD;

bool is_valid_utf8(std::string_view bytes);

// Replaces every maximal invalid subpart with U+FFFD: the Unicode "substitution of maximal subparts"
// practice, which is what Rust's String::from_utf8_lossy (HF tokenizers' decode) and Python's
// bytes.decode("utf-8", errors="replace") do.
std::string to_valid_utf8(std::string_view bytes);

// NFC of valid UTF-8. Throws Error when utf8proc rejects the input.
std::string nfc(std::string_view valid_utf8);

void append_utf8(std::string& out, char32_t code_point);

// Decodes the code point starting at text[pos] of valid UTF-8 and advances pos past it.
char32_t next_code_point(std::string_view text, std::size_t& pos);

// Decodes the code point ending just before text[end] of valid UTF-8 and moves end back to its start.
char32_t previous_code_point(std::string_view text, std::size_t& end);

// The Unicode White_Space property (what Rust's char::is_whitespace tests).
bool is_whitespace(char32_t code_point);

// Letters, marks, numbers and connector punctuation: the characters a "word" is made of.
bool is_word_char(char32_t code_point);

// Letters only: the general categories Lu, Ll, Lt, Lm, Lo (Unicode's \p{L}).
bool is_letter(char32_t code_point);

}  // namespace moescope::unicode
