#include "cli/toy_tokenizer.h"

#include <map>
#include <string>
#include <vector>

#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {
namespace {

constexpr const char* k_corpus =
    "Janet has 16 eggs. She eats 3 for breakfast and bakes muffins with 4. She sells the rest for $2 each. "
    "How much money does she make every day? A robe takes 2 bolts of blue fiber and half that much white fiber. "
    "How many bolts in total does it take? Josh buys a house for $80,000 and puts in $50,000 in repairs. "
    "This increased the value of the house by 150%. How much profit did he make? James runs 3 sprints 3 times "
    "a week. He runs 60 meters each sprint. How many total meters does he run a week? The answer is 540. "
    "If there are 5 apples and you take away 2, how many apples do you have? You have 2 apples. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token to a few experts. "
    "Each expert is a small feed-forward network, and a router chooses which experts see each token. "
    "Total = 12 * 4 + 7 - 3 = 52. Half of 48 is 24, and a third of 24 is 8. She had 10 dollars and spent 7. ";

// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 upwards.
std::vector<std::string> byte_level_alphabet() {
  std::vector<std::string> out(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) s += static_cast<char>(cp);
    else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    out[b] = s;
  }
  return out;
}

}  // namespace

void write_toy_tokenizer(const std::filesystem::path& dir, int vocab_size) {
  const std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  const int num_merges = vocab_size - 256 - static_cast<int>(specials.size());
  if (num_merges < 0) fail("make-model: vocab_size {} is too small for a byte-level tokenizer (at least 259)", vocab_size);
  const auto alphabet = byte_level_alphabet();

  // Words: a leading space sticks to the word after it, as the Split regex does.
  std::vector<std::vector<std::string>> words;
  const std::string corpus = k_corpus;
  size_t i = 0;
  while (i < corpus.size()) {
    size_t j = i + 1;
    while (j < corpus.size() && corpus[j] != ' ' && corpus[j] != '\n') ++j;
    std::vector<std::string> symbols;
    for (size_t k = i; k < j; ++k) symbols.push_back(alphabet[static_cast<unsigned char>(corpus[k])]);
    words.push_back(std::move(symbols));
    i = j;
  }

  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[alphabet[b]] = b;
  Json merges = Json::array();
  int next_id = 256;
  while (static_cast<int>(merges.size()) < num_merges) {
    std::map<std::pair<std::string, std::string>, int> counts;  // ordered: ties go to the smallest pair
    for (const auto& w : words)
      for (size_t k = 0; k + 1 < w.size(); ++k) ++counts[{w[k], w[k + 1]}];
    std::pair<std::string, std::string> best;
    int best_count = 0;
    for (const auto& [pair, count] : counts)
      if (count > best_count) best = pair, best_count = count;
    if (best_count < 1) break;
    const std::string merged = best.first + best.second;
    if (vocab.contains(merged)) {  // can happen only through a different split; never re-add
      for (auto& w : words)
        for (size_t k = 0; k + 1 < w.size(); ++k)
          if (w[k] == best.first && w[k + 1] == best.second) w[k] = merged, w.erase(w.begin() + static_cast<std::ptrdiff_t>(k) + 1);
      continue;
    }
    merges.push_back(best.first + " " + best.second);
    vocab[merged] = next_id++;
    for (auto& w : words)
      for (size_t k = 0; k + 1 < w.size(); ++k)
        if (w[k] == best.first && w[k + 1] == best.second) w[k] = merged, w.erase(w.begin() + static_cast<std::ptrdiff_t>(k) + 1);
  }
  // Pad with unused placeholder merges' worth of ids is not possible; fill the gap with reserved tokens.
  Json added = Json::array();
  for (int id = next_id; id < vocab_size - static_cast<int>(specials.size()); ++id) {
    const std::string name = "<|reserved_" + std::to_string(id) + "|>";
    added.push_back({{"id", id}, {"content", name}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
  }
  for (size_t s = 0; s < specials.size(); ++s)
    added.push_back({{"id", vocab_size - static_cast<int>(specials.size()) + static_cast<int>(s)}, {"content", specials[s]},
                     {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}});

  const char* qwen_regex =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  const Json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  Json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", qwen_regex}}}, {"behavior", "Isolated"}, {"invert", false}}, byte_level}}}},
      {"post_processor", nullptr},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", merges}}}};
  write_text_file(dir / "tokenizer.json", tokenizer.dump(1) + "\n");

  const char* chatml =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
      "are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
      "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
  const Json config = {{"tokenizer_class", "Qwen2Tokenizer"}, {"bos_token", nullptr},   {"eos_token", "<|im_end|>"},
                       {"pad_token", "<|endoftext|>"},       {"chat_template", chatml}, {"model_max_length", 4096}};
  write_text_file(dir / "tokenizer_config.json", config.dump(2) + "\n");
}

}  // namespace moescope::cli
