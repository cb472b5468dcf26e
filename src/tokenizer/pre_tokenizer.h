#pragma once
// Pre-tokenization: cutting normalized text into the pieces BPE encodes one at a time. Supports
// what byte-level BPE tokenizers use: Split (regex, "Isolated") and ByteLevel, alone or in a
// Sequence. The regexes run on PCRE2 (UTF + UCP, JIT when available) in place of HF's Oniguruma.
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "util/json.h"

namespace moescope {

// A compiled regex that cuts text into its matches and the gaps between them, both kept
// (HF's SplitDelimiterBehavior::Isolated with invert false).
class RegexSplitter {
 public:
  // `literal` treats the pattern as a plain string (HF's {"String": ...} patterns).
  RegexSplitter(const std::string& pattern, bool literal, const std::filesystem::path& source);
  ~RegexSplitter();
  RegexSplitter(RegexSplitter&&) noexcept;
  RegexSplitter& operator=(RegexSplitter&&) noexcept;

  // Appends the non-empty pieces of `text` (valid UTF-8) to `pieces`, in order; they concatenate to `text`.
  void split(std::string_view text, std::vector<std::string>& pieces) const;

 private:
  struct Compiled;
  std::unique_ptr<Compiled> compiled_;
};

class PreTokenizer {
 public:
  // `config` is tokenizer.json's "pre_tokenizer" (null allowed); `source` names the file for errors.
  PreTokenizer(const Json& config, const std::filesystem::path& source);

  // The pieces of `text`; with a ByteLevel step each piece is already mapped to byte-level characters.
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  bool byte_level() const { return byte_level_; }

 private:
  void add_step(const Json& step, const std::filesystem::path& source);

  std::vector<RegexSplitter> splits_;  // applied in order, each to every piece of the previous
  bool byte_level_ = false;            // map bytes to the byte-level alphabet at the end
  bool add_prefix_space_ = false;      // ByteLevel: prepend " " to a piece that does not start with one
  std::size_t prefix_space_after_ = 0; // the number of splits that run before the prefix space is added
};

}  // namespace moescope
