#pragma once
// The BPE model of an HF tokenizer.json: vocab, merges by rank, and a per-word cache.
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "util/json.h"

namespace moescope {

// Hash that lets unordered_map<std::string, ...> be searched with a string_view.
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenIds = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object; `source` names the file for errors.
  BpeModel(const Json& model, const std::filesystem::path& source);

  // Appends the ids of one pre-tokenized piece. Thread-safe.
  void encode_piece(std::string_view piece, std::vector<int32_t>& ids) const;

  const TokenIds& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;       // position in the merges list: lower merges first
    int32_t merged_id;  // id of left + right
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  std::vector<int32_t> merge_piece(std::string_view piece) const;

  TokenIds vocab_;
  std::unordered_map<uint64_t, Merge> merges_;  // pair_key(left_id, right_id) -> merge
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;  // a piece found whole in the vocab skips merging (Llama 3 style)

  // Words repeat, so a piece's ids are cached; bounded so a server's memory does not grow forever.
  static constexpr std::size_t k_max_cached_pieces = 1 << 17;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace moescope
