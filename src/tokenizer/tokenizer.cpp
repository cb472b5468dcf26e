#include "tokenizer/tokenizer.h"

#include <algorithm>

#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/unicode.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

// True for NFC; false for no normalization. Anything else is an Error naming the file.
bool parse_normalizer(const Json& config, const std::filesystem::path& source) {
  if (config.is_null()) return false;
  const std::string type = config.value("type", "");
  if (type == "NFC") return true;
  if (type == "Sequence") {
    bool nfc = false;
    for (const Json& inner : config.at("normalizers")) nfc = parse_normalizer(inner, source) || nfc;
    return nfc;
  }
  fail("{}: normalizer type {:?} is not supported (NFC, Sequence of NFC, or null)", source.string(), type);
}

// True for a ByteLevel decoder; false for none. Anything else is an Error naming the file.
bool parse_decoder(const Json& config, const std::filesystem::path& source) {
  if (config.is_null()) return false;
  const std::string type = config.value("type", "");
  if (type == "ByteLevel") return true;
  fail("{}: decoder type {:?} is not supported (ByteLevel or null)", source.string(), type);
}

std::vector<AddedToken> parse_added_tokens(const Json& config, const std::filesystem::path& source) {
  std::vector<AddedToken> tokens;
  if (config.is_null()) return tokens;
  if (!config.is_array()) fail("{}: added_tokens is not an array", source.string());
  for (std::size_t i = 0; i < config.size(); ++i) {
    const Json& entry = config[i];
    if (!entry.contains("id") || !entry.at("id").is_number_integer() || !entry.contains("content") ||
        !entry.at("content").is_string()) {
      fail("{}: added_tokens[{}] needs an integer id and a string content", source.string(), i);
    }
    const int64_t id = entry.at("id").get<int64_t>();
    if (id < 0 || id > INT32_MAX) fail("{}: added_tokens[{}] has id {} out of range", source.string(), i, id);
    tokens.push_back({.content = entry.at("content").get<std::string>(),
                      .id = static_cast<int32_t>(id),
                      .special = entry.value("special", false),
                      .lstrip = entry.value("lstrip", false),
                      .rstrip = entry.value("rstrip", false),
                      .single_word = entry.value("single_word", false)});
  }
  return tokens;
}

}  // namespace

struct Tokenizer::Impl {
  Impl(const Json& config, const std::filesystem::path& source)
      : nfc(parse_normalizer(config.value("normalizer", Json()), source)),
        pre_tokenizer(config.value("pre_tokenizer", Json()), source),
        model(config.at("model"), source),
        byte_level_decoder(parse_decoder(config.value("decoder", Json()), source)),
        added_tokens(parse_added_tokens(config.value("added_tokens", Json()), source)),
        added_token_matcher(added_tokens) {
    int32_t max_id = -1;
    for (const auto& [token, id] : model.vocab()) max_id = std::max(max_id, id);
    for (const AddedToken& token : added_tokens) max_id = std::max(max_id, token.id);
    id_to_token.resize(static_cast<std::size_t>(max_id) + 1);
    has_token.resize(id_to_token.size(), false);
    special.resize(id_to_token.size(), false);
    for (const auto& [token, id] : model.vocab()) {
      id_to_token[id] = token;
      has_token[id] = true;
    }
    for (const AddedToken& token : added_tokens) {
      id_to_token[token.id] = token.content;
      has_token[token.id] = true;
      special[token.id] = token.special;
    }
  }

  void check_id(int32_t id) const {
    if (id < 0 || id >= static_cast<int32_t>(id_to_token.size()) || !has_token[id]) {
      fail("token id {} is out of range (vocab size {})", id, id_to_token.size());
    }
  }

  bool nfc;
  PreTokenizer pre_tokenizer;
  BpeModel model;
  bool byte_level_decoder;
  std::vector<AddedToken> added_tokens;
  AddedTokenMatcher added_token_matcher;
  std::vector<std::string> id_to_token;  // [vocab_size]
  std::vector<bool> has_token;           // [vocab_size]: false for ids no token uses
  std::vector<bool> special;             // [vocab_size]
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_file(const std::filesystem::path& tokenizer_json) {
  const Json config = read_json_file(tokenizer_json);
  if (!config.is_object()) fail("{}: expected a JSON object", tokenizer_json.string());
  if (!config.contains("model") || !config.at("model").is_object()) {
    fail("{}: has no \"model\" object (is this a tokenizer.json?)", tokenizer_json.string());
  }
  try {
    return Tokenizer(std::make_unique<Impl>(config, tokenizer_json));
  } catch (const Json::exception& e) {
    // A field of the wrong JSON type deep inside the file.
    fail("{}: unexpected structure: {}", tokenizer_json.string(), e.what());
  }
}

std::optional<Tokenizer> Tokenizer::from_model_dir(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "tokenizer.json";
  if (!std::filesystem::exists(path)) return std::nullopt;
  return from_file(path);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  const std::string valid = unicode::is_valid_utf8(text) ? std::string(text) : unicode::to_valid_utf8(text);
  std::vector<int32_t> ids;
  for (const AddedTokenMatcher::Segment& segment : impl_->added_token_matcher.split(valid)) {
    if (segment.added_id >= 0) {
      ids.push_back(segment.added_id);
      continue;
    }
    const std::string normalized = impl_->nfc ? unicode::nfc(segment.text) : std::string(segment.text);
    for (const std::string& piece : impl_->pre_tokenizer.pre_tokenize(normalized)) {
      impl_->model.encode_piece(piece, ids);
    }
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  bool first = true;
  for (const int32_t id : ids) {
    impl_->check_id(id);
    if (skip_special_tokens && impl_->special[id]) continue;
    const std::string& token = impl_->id_to_token[id];
    if (impl_->byte_level_decoder) {
      // Like HF's ByteLevel decoder, a token with a character outside the byte alphabet (an added
      // token such as "<|im start|>" with a space) is taken as its own UTF-8 text.
      const std::optional<std::string> token_bytes = byte_level::decode(token);
      bytes += token_bytes ? *token_bytes : token;
    } else {
      // With no decoder HF joins the tokens with spaces.
      if (!first) bytes += ' ';
      bytes += token;
    }
    first = false;
  }
  return unicode::is_valid_utf8(bytes) ? bytes : unicode::to_valid_utf8(bytes);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  for (const AddedToken& added : impl_->added_tokens) {
    if (added.content == token) return added.id;
  }
  const auto it = impl_->model.vocab().find(token);
  if (it == impl_->model.vocab().end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
  impl_->check_id(id);
  return impl_->id_to_token[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id];
}

}  // namespace moescope
