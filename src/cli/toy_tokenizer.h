#pragma once
// A small byte-level BPE tokenizer for random-weight checkpoints: trained at make-model time on a
// built-in text, written as a standard tokenizer.json (NFC, Qwen's Split regex, ByteLevel) with a
// ChatML tokenizer_config.json, so the same tokenizer path as Qwen's is exercised.
#include <filesystem>

namespace moescope::cli {

// Writes tokenizer.json and tokenizer_config.json with exactly vocab_size ids: 256 bytes, merges,
// and <|endoftext|>, <|im_start|>, <|im_end|> as the last three ids.
void write_toy_tokenizer(const std::filesystem::path& dir, int vocab_size);

}  // namespace moescope::cli
