#include "tokenizer/byte_level.h"

#include <array>
#include <cstdint>

#include "tokenizer/unicode.h"

namespace moescope::byte_level {
namespace {

// The alphabet has 256 characters, all below U+0144.
constexpr char32_t k_alphabet_end = 0x144;

struct Alphabet {
  std::array<std::string, 256> byte_to_utf8;                // [byte] -> UTF-8 of its character
  std::array<int16_t, k_alphabet_end> char_to_byte;          // [character] -> byte, or -1
};

// bytes_to_unicode() of GPT-2's encoder.py: printable Latin-1 bytes stand for themselves; the other
// 68 (controls, space, 0x7F-0xA0, soft hyphen) take U+0100 upward in byte order.
Alphabet make_alphabet() {
  Alphabet alphabet;
  alphabet.char_to_byte.fill(-1);
  char32_t next_extra = 0x100;
  for (int byte = 0; byte < 256; ++byte) {
    const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || (byte >= 0xAE);
    const char32_t c = printable ? static_cast<char32_t>(byte) : next_extra++;
    unicode::append_utf8(alphabet.byte_to_utf8[byte], c);
    alphabet.char_to_byte[c] = static_cast<int16_t>(byte);
  }
  return alphabet;
}

const Alphabet& alphabet() {
  static const Alphabet instance = make_alphabet();
  return instance;
}

}  // namespace

std::string encode(std::string_view bytes) {
  const Alphabet& table = alphabet();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char c : bytes) out += table.byte_to_utf8[static_cast<unsigned char>(c)];
  return out;
}

std::optional<std::string> decode(std::string_view token) {
  const Alphabet& table = alphabet();
  std::string out;
  out.reserve(token.size());
  for (std::size_t pos = 0; pos < token.size();) {
    const char32_t c = unicode::next_code_point(token, pos);
    if (c >= k_alphabet_end || table.char_to_byte[c] < 0) return std::nullopt;
    out.push_back(static_cast<char>(table.char_to_byte[c]));
  }
  return out;
}

}  // namespace moescope::byte_level
