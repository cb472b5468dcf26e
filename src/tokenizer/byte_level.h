#pragma once
// GPT-2's byte-level alphabet (HF's ByteLevel pre-tokenizer and decoder): every byte maps to one
// visible Unicode character, so BPE works on bytes while its vocabulary stays printable text.
#include <optional>
#include <string>
#include <string_view>

namespace moescope::byte_level {

// Each byte of `bytes` replaced by the UTF-8 of its character ("hello world" -> "helloĠworld").
std::string encode(std::string_view bytes);

// The bytes a byte-level token stands for; nullopt when a character of it is outside the alphabet.
std::optional<std::string> decode(std::string_view token);

}  // namespace moescope::byte_level
