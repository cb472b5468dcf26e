#pragma once
// A Hugging Face tokenizer.json tokenizer, byte-level BPE (Qwen2/Qwen3, GPT-2 style).
//
// Supported: normalizer NFC (alone, in a Sequence, or null); pre_tokenizer Split (regex,
// "Isolated") and ByteLevel, alone or in a Sequence; model BPE (merges as "a b" or ["a", "b"]);
// decoder ByteLevel or null; added tokens (special or not). Anything else in the file is an Error
// naming it, not a silent difference. The post_processor is not applied: encode() is HF's
// encode(text, add_special_tokens=False).
//
// Invalid UTF-8: HF tokenizers takes Rust &str, so it never sees invalid UTF-8. encode() first
// replaces each maximal invalid subpart with U+FFFD (what Python's bytes.decode(errors="replace")
// would hand HF), so any bytes can be encoded and valid UTF-8 is unaffected. decode() turns token
// bytes that do not form valid UTF-8 (a character cut between ids) into U+FFFD the same way, as HF does.
//
// Thread-safe: encode and decode are const; the per-piece cache is guarded by a mutex.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moescope {

class Tokenizer {
 public:
  // Throws Error naming the file when it is missing, malformed or uses an unsupported feature.
  static Tokenizer from_file(const std::filesystem::path& tokenizer_json);
  // Loads DIR/tokenizer.json when it exists; nullopt otherwise (a model dir without a tokenizer still loads).
  static std::optional<Tokenizer> from_model_dir(const std::filesystem::path& dir);

  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Ids of `text` (any bytes; see the invalid UTF-8 note above). Added tokens in the text, special
  // ones included, become their ids.
  std::vector<int32_t> encode(std::string_view text) const;

  // Text of `ids`; throws Error for an id that has no token.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // Max id + 1 over the vocab and the added tokens.
  int32_t vocab_size() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token's string as the vocab spells it (byte-level characters, e.g. "Ġthe"); throws Error for an id with no token.
  const std::string& id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moescope
