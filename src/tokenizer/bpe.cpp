#include "tokenizer/bpe.h"

#include <queue>

#include "tokenizer/unicode.h"
#include "util/error.h"

namespace moescope {
namespace {

// One merge's two sides: "a b" (older files) or ["a", "b"] (tokenizers >= 0.20).
std::pair<std::string, std::string> parse_merge(const Json& merge, std::size_t rank,
                                                const std::filesystem::path& source) {
  if (merge.is_string()) {
    const std::string text = merge.get<std::string>();
    const std::size_t space = text.find(' ');
    if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
      fail("{}: model.merges[{}] = {:?}: expected two tokens separated by one space", source.string(), rank, text);
    }
    return {text.substr(0, space), text.substr(space + 1)};
  }
  if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
    return {merge[0].get<std::string>(), merge[1].get<std::string>()};
  }
  fail("{}: model.merges[{}] = {}: expected \"a b\" or [\"a\", \"b\"]", source.string(), rank, merge.dump());
}

}  // namespace

BpeModel::BpeModel(const Json& model, const std::filesystem::path& source) {
  const std::string type = model.value("type", "BPE");
  if (type != "BPE") fail("{}: model type {:?} is not supported (only BPE)", source.string(), type);
  if (!model.contains("vocab") || !model.at("vocab").is_object()) {
    fail("{}: model.vocab is missing or not an object", source.string());
  }
  if (!model.contains("merges") || !model.at("merges").is_array()) {
    fail("{}: model.merges is missing or not an array", source.string());
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && model.at(key).is_string() && !model.at(key).get<std::string>().empty()) {
      fail("{}: model.{} is not supported", source.string(), key);
    }
  }
  if (model.value("byte_fallback", false)) fail("{}: model.byte_fallback is not supported", source.string());
  if (model.contains("dropout") && !model.at("dropout").is_null()) {
    fail("{}: model.dropout is not supported", source.string());
  }

  for (const auto& [token, id] : model.at("vocab").items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      fail("{}: model.vocab[{:?}] = {}: expected a non-negative 32-bit id", source.string(), token, id.dump());
    }
    vocab_.emplace(token, id.get<int32_t>());
  }

  const Json& merges = model.at("merges");
  merges_.reserve(merges.size());
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const auto [left, right] = parse_merge(merges[rank], rank, source);
    const auto id_of = [&](const std::string& token) {
      const auto it = vocab_.find(token);
      if (it == vocab_.end()) {
        fail("{}: model.merges[{}] = {:?} {:?}: token {:?} is not in the vocab", source.string(), rank, left,
             right, token);
      }
      return it->second;
    };
    const Merge merge{static_cast<int32_t>(rank), id_of(left + right)};
    // A pair listed twice keeps its last rank: HF collects the merges into a HashMap, last one wins.
    merges_[pair_key(id_of(left), id_of(right))] = merge;
  }

  if (model.contains("unk_token") && model.at("unk_token").is_string()) {
    const auto it = vocab_.find(model.at("unk_token").get<std::string>());
    if (it == vocab_.end()) fail("{}: model.unk_token is not in the vocab", source.string());
    unk_id_ = it->second;
  }
  fuse_unk_ = model.value("fuse_unk", false);
  ignore_merges_ = model.value("ignore_merges", false);
}

void BpeModel::encode_piece(std::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.empty()) return;
  {
    const std::lock_guard lock(cache_mutex_);
    const auto it = cache_.find(piece);
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> piece_ids = merge_piece(piece);
  ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  const std::lock_guard lock(cache_mutex_);
  if (cache_.size() < k_max_cached_pieces) cache_.emplace(std::string(piece), std::move(piece_ids));
}

// HF's Word::merge_all: repeatedly apply the lowest-ranked merge present, leftmost first, with a
// heap over candidate pairs and a linked list of symbols, so long pieces stay O(n log n).
std::vector<int32_t> BpeModel::merge_piece(std::string_view piece) const {
  if (ignore_merges_) {
    const auto it = vocab_.find(piece);
    if (it != vocab_.end()) return {it->second};
  }

  struct Symbol {
    int32_t id;
    int32_t prev;  // index of the previous live symbol, or -1
    int32_t next;  // index of the next live symbol, or -1
    bool live;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (std::size_t pos = 0; pos < piece.size();) {
    const std::size_t start = pos;
    unicode::next_code_point(piece, pos);
    const auto it = vocab_.find(piece.substr(start, pos - start));
    int32_t id = 0;
    if (it != vocab_.end()) {
      id = it->second;
    } else if (unk_id_) {
      if (fuse_unk_ && !symbols.empty() && symbols.back().id == *unk_id_) continue;
      id = *unk_id_;
    } else {
      continue;  // HF drops a character that has no token and no unk to stand for it
    }
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, true});
    if (index > 0) symbols[index - 1].next = index;
  }

  struct Candidate {
    int32_t rank;
    int32_t pos;  // index of the left symbol
    int32_t merged_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto push_pair = [&](int32_t left) {
    if (left < 0 || symbols[left].next < 0) return;
    const auto it = merges_.find(pair_key(symbols[left].id, symbols[symbols[left].next].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.merged_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.live || left.next < 0) continue;
    // The pair may have changed since it was queued; only merge if it is still this merge.
    const auto it = merges_.find(pair_key(left.id, symbols[left.next].id));
    if (it == merges_.end() || it->second.rank != top.rank) continue;
    Symbol& right = symbols[left.next];
    left.id = top.merged_id;
    right.live = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push_pair(left.prev);
    push_pair(top.pos);
  }

  std::vector<int32_t> ids;
  for (const Symbol& symbol : symbols) {
    if (symbol.live) ids.push_back(symbol.id);
  }
  return ids;
}

}  // namespace moescope
