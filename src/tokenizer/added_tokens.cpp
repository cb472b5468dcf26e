#include "tokenizer/added_tokens.h"

#include <algorithm>

#include "tokenizer/unicode.h"

namespace moescope {

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>& tokens) : tokens_(tokens) {
  std::erase_if(tokens_, [](const AddedToken& token) { return token.content.empty(); });
  std::stable_sort(tokens_.begin(), tokens_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    by_first_byte_[static_cast<unsigned char>(tokens_[i].content[0])].push_back(i);
  }
}

std::vector<AddedTokenMatcher::Segment> AddedTokenMatcher::split(std::string_view text) const {
  std::vector<Segment> segments;
  std::size_t emitted = 0;  // text before this is already in segments
  std::size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* found = nullptr;
    for (const uint32_t index : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      if (text.substr(pos).starts_with(tokens_[index].content)) {
        found = &tokens_[index];
        break;
      }
    }
    if (found == nullptr) {
      ++pos;
      continue;
    }
    std::size_t start = pos;
    std::size_t end = pos + found->content.size();
    if (found->single_word) {
      std::size_t before = start;
      std::size_t after = end;
      const bool word_before = start > emitted && unicode::is_word_char(unicode::previous_code_point(text, before));
      const bool word_after = end < text.size() && unicode::is_word_char(unicode::next_code_point(text, after));
      if (word_before || word_after) {
        pos = end;  // like a skipped Aho-Corasick match, the search resumes after it
        continue;
      }
    }
    if (found->lstrip) {
      while (start > emitted) {
        std::size_t before = start;
        if (!unicode::is_whitespace(unicode::previous_code_point(text, before))) break;
        start = before;
      }
    }
    if (found->rstrip) {
      while (end < text.size()) {
        std::size_t after = end;
        if (!unicode::is_whitespace(unicode::next_code_point(text, after))) break;
        end = after;
      }
    }
    if (start > emitted) segments.push_back({text.substr(emitted, start - emitted), -1});
    segments.push_back({text.substr(start, end - start), found->id});
    emitted = end;
    pos = end;
  }
  if (emitted < text.size()) segments.push_back({text.substr(emitted), -1});
  return segments;
}

}  // namespace moescope
