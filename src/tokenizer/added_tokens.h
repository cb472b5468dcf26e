#pragma once
// Added tokens (tokenizer.json "added_tokens"): strings such as <|im_start|> that become one id
// wherever they appear, found in the raw text before normalization and pre-tokenization.
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moescope {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;      // skipped by decode(skip_special_tokens = true)
  bool lstrip = false;       // the match also takes the whitespace before it
  bool rstrip = false;       // the match also takes the whitespace after it
  bool single_word = false;  // only matches when not inside a word
};

class AddedTokenMatcher {
 public:
  explicit AddedTokenMatcher(const std::vector<AddedToken>& tokens);

  struct Segment {
    std::string_view text;     // a slice of the input
    int32_t added_id = -1;     // the added token's id, or -1 for ordinary text
  };

  // Cuts `text` (valid UTF-8) into ordinary text and added tokens. Like HF's Aho-Corasick
  // (MatchKind::LeftmostLongest): the leftmost match wins, the longest of those starting there.
  std::vector<Segment> split(std::string_view text) const;

 private:
  std::vector<AddedToken> tokens_;                       // longest first
  std::array<std::vector<uint32_t>, 256> by_first_byte_; // [first byte] -> indexes into tokens_, longest first
};

}  // namespace moescope
