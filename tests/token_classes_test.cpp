// report --tokens, the library side: the token-class rule on hand-picked texts and on the shipped
// tokenizer's ids, the outputs-file reader and its errors, the join of routes with token ids against
// counts worked out by hand, mutual information and total variation on cases with known answers.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

#include "analysis/class_routing.h"
#include "analysis/metrics.h"
#include "analysis/outputs_file.h"
#include "analysis/route_reader.h"
#include "analysis/token_class.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

namespace fs = std::filesystem;

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// The Error message of f(), or "" when it does not throw.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_ERROR_HAS(expr, needle)                                                        \
  do {                                                                                        \
    const std::string message_ = error_of([&] { (void)(expr); });                             \
    EXPECT_NE(message_.find(needle), std::string::npos) << "message: \"" << message_ << "\""; \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The rule

TEST(TokenClass, RuleOnHandPickedTexts) {
  const std::pair<const char*, TokenClass> cases[] = {
      {"7", TokenClass::kDigit},
      {" 42", TokenClass::kDigit},  // a leading space (byte-level "Ġ") is stripped
      {"2024\n", TokenClass::kDigit},
      {" +", TokenClass::kOperator},
      {"=", TokenClass::kOperator},
      {"/", TokenClass::kOperator},
      {"%", TokenClass::kOperator},
      {"^", TokenClass::kOperator},
      {"<<", TokenClass::kOperator},  // GSM8K's calculator brackets are made of operator symbols
      {" $<<", TokenClass::kOperator},
      {".", TokenClass::kPunctuation},
      {".\n", TokenClass::kPunctuation},  // punctuation with its newline
      {",", TokenClass::kPunctuation},
      {"?)", TokenClass::kPunctuation},
      {" (", TokenClass::kPunctuation},
      {"\"", TokenClass::kPunctuation},
      {"####", TokenClass::kPunctuation},
      {"+.", TokenClass::kPunctuation},      // an operator symbol with other punctuation
      {"\u2019", TokenClass::kPunctuation},  // right single quotation mark
      {"\u2014", TokenClass::kPunctuation},  // em dash
      {"\u00d7", TokenClass::kPunctuation},  // the multiplication sign is not in the operator set
      {" ", TokenClass::kWhitespace},
      {"\n\n", TokenClass::kWhitespace},
      {"\t \r\n", TokenClass::kWhitespace},
      {" the", TokenClass::kWord},
      {"The", TokenClass::kWord},
      {"3rd", TokenClass::kWord},  // any letter makes a word
      {"'s", TokenClass::kWord},
      {" x", TokenClass::kWord},
      {"\u00e9", TokenClass::kWord},        // é
      {"\u65e5\u672c", TokenClass::kWord},  // 日本
      {"", TokenClass::kOther},
      {"\ufffd", TokenClass::kOther},  // a piece of a character cut between tokens, as decoded
      {"\xc3", TokenClass::kOther},    // not UTF-8 at all
      {"1.5", TokenClass::kOther},     // digits mixed with punctuation
      {"5%", TokenClass::kOther},      // digits mixed with an operator
      {"\u00b2", TokenClass::kOther},  // superscript two: a number, but not 0-9
      {"\x01", TokenClass::kOther},    // a control character
  };
  for (const auto& [text, expected] : cases)
    EXPECT_EQ(classify_token_text(text), expected)
        << "\"" << text << "\" is " << to_string(classify_token_text(text)) << ", expected " << to_string(expected);
}

TEST(TokenClass, NamesRoundTrip) {
  ASSERT_EQ(k_token_classes.size(), 7u);
  const char* names[] = {"digit", "operator", "punctuation", "whitespace", "word", "special", "other"};
  for (size_t k = 0; k < k_token_classes.size(); ++k) {
    EXPECT_STREQ(to_string(k_token_classes[k]), names[k]);
    EXPECT_EQ(token_class_from_string(names[k]), k_token_classes[k]);
  }
  EXPECT_FALSE(token_class_from_string("number"));
}

TEST(TokenClass, ShippedTokenizerIds) {
  const std::optional<Tokenizer> tok = Tokenizer::from_model_dir(test::source_dir() / "models" / "moescope-tiny-gsm8k");
  ASSERT_TRUE(tok);
  // Tokens as the vocab spells them (byte-level: "Ġ" is a space, "Ċ" a newline) and their classes.
  const std::pair<const char*, TokenClass> cases[] = {
      {"7", TokenClass::kDigit},
      {"\u0120+", TokenClass::kOperator},
      {"\u0120$<<", TokenClass::kOperator},
      {".\u010a", TokenClass::kPunctuation},
      {"####", TokenClass::kPunctuation},
      {"\u010a", TokenClass::kWhitespace},
      {"\u0120the", TokenClass::kWord},
      {"<|im_start|>", TokenClass::kSpecial},
      {"<|endoftext|>", TokenClass::kSpecial},
  };
  for (const auto& [token, expected] : cases) {
    const std::optional<int32_t> id = tok->token_to_id(token);
    ASSERT_TRUE(id) << token;
    EXPECT_EQ(classify_token(*tok, *id), expected) << token;
  }
  EXPECT_THROW(classify_token(*tok, tok->vocab_size()), Error);
  EXPECT_THROW(classify_token(*tok, -1), Error);
}

// ---------------------------------------------------------------------------------------------
// Mutual information and total variation

TEST(ClassMetrics, MutualInformationOfIndependentVariablesIsZero) {
  // Row 1 is half of row 0, so p(r, c) = p(r) p(c) in every cell: rows 8/12, 4/12; columns 3/12, 6/12, 3/12.
  EXPECT_NEAR(mutual_information_bits({{2, 4, 2}, {1, 2, 1}}), 0.0, 1e-12);
  // One row or one column: nothing to learn.
  EXPECT_NEAR(mutual_information_bits({{3, 5, 0, 9}}), 0.0, 1e-12);
  EXPECT_NEAR(mutual_information_bits({{3}, {5}}), 0.0, 1e-12);
  EXPECT_EQ(mutual_information_bits({{0, 0}, {0, 0}}), 0.0);
  EXPECT_EQ(mutual_information_bits({}), 0.0);
}

TEST(ClassMetrics, MutualInformationOfDependentVariables) {
  // Each row only in its own column: knowing the row gives the column, I = H(row).
  // Rows 5/8 and 3/8: H = -(5/8 log2 5/8 + 3/8 log2 3/8) = 0.954434 bits.
  const double h = -(5.0 / 8 * std::log2(5.0 / 8) + 3.0 / 8 * std::log2(3.0 / 8));
  EXPECT_NEAR(mutual_information_bits({{5, 0, 0}, {0, 3, 0}}), h, 1e-12);
  EXPECT_NEAR(h, 0.954434, 1e-6);
  // Four equal rows on four columns: 2 bits.
  EXPECT_NEAR(mutual_information_bits({{7, 0, 0, 0}, {0, 7, 0, 0}, {0, 0, 7, 0}, {0, 0, 0, 7}}), 2.0, 1e-12);
  // Partly dependent, N = 4: p = (1/4, 1/4; 0, 1/2), rows 1/2, 1/2, columns 1/4, 3/4:
  //   1/4 log2((1/4)/(1/2 * 1/4)) + 1/4 log2((1/4)/(1/2 * 3/4)) + 1/2 log2((1/2)/(1/2 * 3/4))
  //   = 1/4 * 1 + 1/4 (1 - log2 3) + 1/2 (2 - log2 3) = 1.5 - 0.75 log2 3 = 0.311278 bits.
  EXPECT_NEAR(mutual_information_bits({{1, 1}, {0, 2}}), 1.5 - 0.75 * std::log2(3.0), 1e-12);
  EXPECT_THROW(mutual_information_bits({{1, 2}, {3}}), Error);
  EXPECT_THROW(mutual_information_bits({{1, -2}}), Error);
}

TEST(ClassMetrics, TotalVariationDistance) {
  // p = (1/2, 1/2, 0, 0), q = (0, 1/4, 1/4, 1/2): |d| = 1/2 + 1/4 + 1/4 + 1/2 = 3/2, TV = 3/4.
  const std::vector<int64_t> a = {2, 2, 0, 0}, b = {0, 1, 1, 2};
  EXPECT_NEAR(*total_variation_distance(a, b), 0.75, 1e-12);
  const std::vector<int64_t> c = {4, 4, 0, 0}, d = {0, 0, 5, 1}, none = {0, 0, 0, 0};
  EXPECT_NEAR(*total_variation_distance(a, c), 0.0, 1e-12);  // the same shares at another scale
  EXPECT_NEAR(*total_variation_distance(a, d), 1.0, 1e-12);  // no expert in common
  EXPECT_FALSE(total_variation_distance(a, none));
  const std::vector<int64_t> shorter = {1, 1};
  EXPECT_THROW(total_variation_distance(a, shorter), Error);
}

// ---------------------------------------------------------------------------------------------
// The outputs file

TEST(OutputsFile, ReadsRequestsInOrder) {
  test::TempDir dir;
  write_file(dir / "o.jsonl",
             R"({"req_id":"r0","prompt_ids":[5,6,7],"output_ids":[8,9],"finish_reason":"length","text":"x"})"
             "\n"
             "\n"
             R"({"req_id":12,"prompt_ids":[1],"output_ids":[]})"
             "\r\n");
  const OutputsFile o = read_outputs_file(dir / "o.jsonl");
  ASSERT_EQ(o.order, (std::vector<std::string>{"r0", "12"}));  // an integer req_id as its digits, as routes keep it
  const RequestTokens& r0 = o.requests.at("r0");
  EXPECT_EQ(r0.size(), 5);
  EXPECT_EQ(r0.line, 1);
  EXPECT_TRUE(r0.is_prompt(2));
  EXPECT_FALSE(r0.is_prompt(3));
  EXPECT_EQ(r0.id_at(0), 5);
  EXPECT_EQ(r0.id_at(2), 7);
  EXPECT_EQ(r0.id_at(3), 8);  // output_ids[0]
  EXPECT_EQ(r0.id_at(4), 9);
  EXPECT_EQ(o.requests.at("12").line, 3);
}

TEST(OutputsFile, BadFilesNameTheFileAndLine) {
  test::TempDir dir;
  const std::string good = R"({"req_id":"r0","prompt_ids":[1],"output_ids":[2]})"
                           "\n";
  const std::pair<std::string, std::string> cases[] = {
      {good + "not json\n", "o.jsonl:2: not valid JSON"},
      {good + "[1,2]\n", "o.jsonl:2: not a JSON object"},
      {R"({"prompt_ids":[1],"output_ids":[2]})"
       "\n",
       "o.jsonl:1: no \"req_id\""},
      {R"({"req_id":1.5,"prompt_ids":[1],"output_ids":[2]})"
       "\n",
       "\"req_id\" is neither a string nor an integer"},
      {R"({"req_id":"r0","output_ids":[2]})"
       "\n",
       "o.jsonl:1: no \"prompt_ids\""},
      {R"({"req_id":"r0","prompt_ids":[1]})"
       "\n",
       "o.jsonl:1: no \"output_ids\""},
      {R"({"req_id":"r0","prompt_ids":[1,-3],"output_ids":[2]})"
       "\n",
       "\"prompt_ids\" is not a list of token ids"},
      {R"({"req_id":"r0","prompt_ids":[1],"output_ids":"2 3"})"
       "\n",
       "\"output_ids\" is not a list of token ids"},
      {R"({"req_id":"r0","prompt_ids":[1],"output_ids":[4294967296]})"
       "\n",
       "\"output_ids\" is not a list"},
      {R"({"req_id":"r0","prompt_ids":[1],"output_ids":[2],"finish_reason":3})"
       "\n",
       "o.jsonl:1: \"finish_reason\" is not a string"},
      {good + good, "o.jsonl:2: req_id \"r0\" again (first on line 1)"},
      {good + R"({"req_id":"r1","prompt_ids":[1],"out)", "o.jsonl:2: truncated last line"},
      {"", "no requests"},
      {"\n  \n", "no requests"},
  };
  for (const auto& [text, needle] : cases) {
    write_file(dir / "o.jsonl", text);
    EXPECT_ERROR_HAS(read_outputs_file(dir / "o.jsonl"), needle);
  }
  EXPECT_ERROR_HAS(read_outputs_file(dir / "missing.jsonl"), "missing.jsonl: cannot open the tokens file");
  EXPECT_ERROR_HAS(read_outputs_file(dir.path()), "is a directory");
}

// ---------------------------------------------------------------------------------------------
// The join, on a hand-made run

// Token ids of the hand-made vocabulary and their classes.
constexpr int32_t k_word = 10, k_digit = 11, k_op = 12, k_punct = 13, k_space = 14, k_special = 15;
TokenClass hand_class(int32_t id) {
  static const std::map<int32_t, TokenClass> classes = {
      {k_word, TokenClass::kWord},         {k_digit, TokenClass::kDigit},      {k_op, TokenClass::kOperator},
      {k_punct, TokenClass::kPunctuation}, {k_space, TokenClass::kWhitespace}, {k_special, TokenClass::kSpecial}};
  const auto it = classes.find(id);
  if (it == classes.end()) fail("token id {} is out of range", id);
  return it->second;
}

// Two requests (token_idx: class, p = prompt, g = generated), both ended by length, so that their last
// output token was sampled but never fed back and has no route:
//   r0: prompt [special, word, digit], output [operator, digit, punctuation]
//       0: special p   1: word p   2: digit p   3: operator g   4: digit g   (5: punctuation, no route)
//   r1: prompt [word, digit], output [digit, whitespace]
//       0: word p   1: digit p   2: digit g   (3: whitespace, no route)
const char* k_outputs = R"({"req_id":"r0","prompt_ids":[15,10,11],"output_ids":[12,11,13],"finish_reason":"length"})"
                        "\n"
                        R"({"req_id":"r1","prompt_ids":[10,11],"output_ids":[11,14],"finish_reason":"length"})"
                        "\n";

std::string route_line(const std::string& req, int token, int layer, std::pair<int, int> ids) {
  return fmt::format(
      R"({{"type":"route","req_id":"{}","token_idx":{},"layer":{},"topk_ids":[{},{}],"topk_weights":[0.6,0.4]}})"
      "\n",
      req, token, layer, ids.first, ids.second);
}

// 4 experts, top-2. Layer 0 routes every consumed token:
//   r0 t0 special [0,1]   r0 t1 word [0,2]   r0 t2 digit [3,2]   r0 t3 operator [1,0]   r0 t4 digit [3,1]
//   r1 t0 word [0,2]      r1 t1 digit [3,0]  r1 t2 digit [3,2]
// Layer 1 routes two of them: r0 t0 special [1,2], r1 t2 digit [0,3].
std::string hand_routes() {
  std::string s = R"({"type":"meta","model_id":"test/hand","num_layers":2,"num_experts":4,"top_k":2,"layers":[0,1]})"
                  "\n";
  s += route_line("r0", 0, 0, {0, 1});
  s += route_line("r0", 0, 1, {1, 2});
  s += route_line("r0", 1, 0, {0, 2});
  s += route_line("r0", 2, 0, {3, 2});
  s += route_line("r1", 0, 0, {0, 2});
  s += route_line("r1", 1, 0, {3, 0});
  s += route_line("r0", 3, 0, {1, 0});
  s += route_line("r1", 2, 0, {3, 2});
  s += route_line("r1", 2, 1, {0, 3});
  s += route_line("r0", 4, 0, {3, 1});
  return s;
}

// Reads routes through the join, as the report does.
ClassRouting join_routes(const OutputsFile& outputs, const std::string& routes) {
  ClassRoutingJoin join(outputs, hand_class);
  RouteReadOptions options;
  options.on_route = [&](const Route& r, int64_t line) { join.add(r, line); };
  std::istringstream in(routes);
  const RouteData d = read_routes(in, options);
  return join.finish(d.num_experts);
}

TEST(ClassRouting, JoinCountsMatchTheHandCount) {
  test::TempDir dir;
  write_file(dir / "o.jsonl", k_outputs);
  const OutputsFile outputs = read_outputs_file(dir / "o.jsonl");
  const ClassRouting c = join_routes(outputs, hand_routes());
  using V = std::vector<int64_t>;
  const auto k = [](TokenClass t) { return static_cast<size_t>(t); };

  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.requests, 2);
  EXPECT_EQ(c.routed_requests, 2);
  EXPECT_EQ(c.prompt_tokens, 5);     // r0 t0-t2, r1 t0-t1
  EXPECT_EQ(c.generated_tokens, 3);  // r0 t3-t4, r1 t2
  EXPECT_EQ(c.tokens_without_routes, 0);
  EXPECT_TRUE(c.notes.empty());
  ASSERT_EQ(c.layers.size(), 2u);

  const LayerClassCounts& l0 = c.layers.at(0);
  EXPECT_EQ(l0.class_counts[k(TokenClass::kSpecial)], (V{1, 1, 0, 0}));   // r0 t0 [0,1]
  EXPECT_EQ(l0.class_counts[k(TokenClass::kWord)], (V{2, 0, 2, 0}));      // [0,2] twice
  EXPECT_EQ(l0.class_counts[k(TokenClass::kDigit)], (V{1, 1, 2, 4}));     // [3,2] [3,1] [3,0] [3,2]
  EXPECT_EQ(l0.class_counts[k(TokenClass::kOperator)], (V{1, 1, 0, 0}));  // [1,0]
  EXPECT_EQ(l0.class_counts[k(TokenClass::kPunctuation)], (V{0, 0, 0, 0}));
  EXPECT_EQ(l0.class_tokens, (std::array<int64_t, 7>{4, 1, 0, 0, 2, 1, 0}));  // digit, operator, ..., word, special
  EXPECT_EQ(l0.prompt_counts, (V{4, 1, 3, 2}));                               // [0,1] [0,2] [3,2] [0,2] [3,0]
  EXPECT_EQ(l0.generated_counts, (V{1, 2, 1, 2}));                            // [1,0] [3,1] [3,2]
  EXPECT_EQ(l0.prompt_tokens, 5);
  EXPECT_EQ(l0.generated_tokens, 3);

  const LayerClassCounts& l1 = c.layers.at(1);
  EXPECT_EQ(l1.class_counts[k(TokenClass::kSpecial)], (V{0, 1, 1, 0}));
  EXPECT_EQ(l1.class_counts[k(TokenClass::kDigit)], (V{1, 0, 0, 1}));
  EXPECT_EQ(l1.prompt_counts, (V{0, 1, 1, 0}));
  EXPECT_EQ(l1.generated_counts, (V{1, 0, 0, 1}));
}

TEST(ClassRouting, LayerMetricsMatchTheHandComputation) {
  test::TempDir dir;
  write_file(dir / "o.jsonl", k_outputs);
  const OutputsFile outputs = read_outputs_file(dir / "o.jsonl");
  const ClassRouting c = join_routes(outputs, hand_routes());
  const LayerClassMetrics m = compute_layer_class_metrics(0, c.layers.at(0));
  const auto row = [&](TokenClass t) -> const ExpertRow& { return m.classes[static_cast<size_t>(t)]; };

  // Layer 0: 8 tokens, 16 selections, per expert 5, 3, 4, 4 (the class rows summed).
  EXPECT_EQ(m.all.tokens, 8);
  EXPECT_EQ(m.all.selections, 16);
  EXPECT_EQ(m.all.counts, (std::vector<int64_t>{5, 3, 4, 4}));
  EXPECT_EQ(m.all.shares, (std::vector<double>{5.0 / 16, 3.0 / 16, 4.0 / 16, 4.0 / 16}));
  EXPECT_EQ(m.all.top->expert, 0);
  EXPECT_DOUBLE_EQ(m.all.top->lift, 1.0);
  // digit: (1, 1, 2, 4) of 8: expert 3 with 1/2, against 4/16 = 1/4 over all tokens: lift 2.
  ASSERT_TRUE(row(TokenClass::kDigit).top);
  EXPECT_EQ(row(TokenClass::kDigit).tokens, 4);
  EXPECT_EQ(row(TokenClass::kDigit).selections, 8);
  EXPECT_EQ(row(TokenClass::kDigit).top->expert, 3);
  EXPECT_EQ(row(TokenClass::kDigit).top->count, 4);
  EXPECT_DOUBLE_EQ(row(TokenClass::kDigit).top->share, 0.5);
  EXPECT_DOUBLE_EQ(row(TokenClass::kDigit).top->lift, 2.0);
  // word: (2, 0, 2, 0): experts 0 and 2 tie at 1/2, the lower id wins; 0.5 / (5/16) = 1.6.
  EXPECT_EQ(row(TokenClass::kWord).top->expert, 0);
  EXPECT_DOUBLE_EQ(row(TokenClass::kWord).top->lift, 1.6);
  EXPECT_EQ(row(TokenClass::kSpecial).top->expert, 0);
  EXPECT_FALSE(row(TokenClass::kPunctuation).top);  // no tokens
  EXPECT_EQ(row(TokenClass::kPunctuation).shares, (std::vector<double>{0, 0, 0, 0}));
  // No class has 20 tokens, so the strongest is taken among all: digit -> 3 with lift 2 beats 1.6.
  ASSERT_TRUE(m.strongest);
  EXPECT_EQ(m.strongest->token_class, TokenClass::kDigit);
  EXPECT_EQ(m.strongest->top.expert, 3);

  // I(class; expert), N = 16, rows special 2, word 4, digit 8, operator 2, columns 5, 3, 4, 4; each cell
  // n/N log2(n N / (row col)):
  //   special  1/16 log2(16/10) + 1/16 log2(16/6)
  //   word     2/16 log2(32/20) + 2/16 log2(32/16)
  //   digit    1/16 log2(16/40) + 1/16 log2(16/24) + 2/16 log2(32/32) + 4/16 log2(64/32)
  //   operator as special
  const double mi = 2 * (std::log2(1.6) + std::log2(8.0 / 3)) / 16 + (2 * std::log2(1.6) + 2) / 16 +
                    (std::log2(0.4) + std::log2(2.0 / 3) + 4) / 16;
  EXPECT_NEAR(mi, 0.602217, 1e-6);
  EXPECT_NEAR(m.mutual_information_bits, mi, 1e-12);
  // H(class) of (2, 4, 8, 2)/16 = (1/8, 1/4, 1/2, 1/8): 3/8 + 1/2 + 1/2 + 3/8 = 1.75 bits.
  EXPECT_NEAR(m.class_entropy_bits, 1.75, 1e-12);
  EXPECT_NEAR(m.normalized_mutual_information, mi / 1.75, 1e-12);
  // Chance level: 4 classes and 4 experts in use, 16 selections: 3 * 3 / (2 * 16 * ln 2).
  EXPECT_NEAR(m.mutual_information_chance_bits, 9.0 / (32.0 * std::log(2.0)), 1e-12);

  // Prompt (4, 1, 3, 2)/10 = (12, 3, 9, 6)/30, generated (1, 2, 1, 2)/6 = (5, 10, 5, 10)/30:
  // |d| = (7 + 7 + 4 + 4)/30 = 22/30, TV = 11/30.
  EXPECT_EQ(m.prompt.tokens, 5);
  EXPECT_EQ(m.prompt.selections, 10);
  EXPECT_DOUBLE_EQ(m.prompt.shares[0], 0.4);
  EXPECT_EQ(m.generated.tokens, 3);
  ASSERT_TRUE(m.total_variation);
  EXPECT_NEAR(*m.total_variation, 11.0 / 30, 1e-12);

  // Layer 1: special -> (0, 1, 1, 0), digit -> (1, 0, 0, 1): the class gives the experts, I = H(class) = 1 bit.
  const LayerClassMetrics m1 = compute_layer_class_metrics(1, c.layers.at(1));
  EXPECT_NEAR(m1.mutual_information_bits, 1.0, 1e-12);
  EXPECT_NEAR(m1.normalized_mutual_information, 1.0, 1e-12);
  EXPECT_NEAR(*m1.total_variation, 1.0, 1e-12);  // the prompt token and the generated one share no expert
  // Lifts: each class's top expert has share 1/2 against 1/4 over the layer: 2 for both; the first class
  // listed (digit) wins the tie.
  EXPECT_EQ(m1.strongest->token_class, TokenClass::kDigit);
  EXPECT_EQ(m1.strongest->top.expert, 0);
  EXPECT_DOUBLE_EQ(m1.strongest->top.lift, 2.0);

  const Json j = to_json(m);
  EXPECT_EQ(j["classes"][0]["class"], "digit");
  EXPECT_EQ(j["classes"][0]["counts"], Json({1, 1, 2, 4}));
  EXPECT_EQ(j["classes"][0]["top_expert"]["expert"], 3);
  EXPECT_TRUE(j["classes"][2]["top_expert"].is_null());  // punctuation: no tokens
  EXPECT_EQ(j["strongest"]["class"], "digit");
  EXPECT_NEAR(j["prompt_vs_generated"]["total_variation"].get<double>(), 11.0 / 30, 1e-12);
}

TEST(ClassRouting, MissingRoutesAreNoted) {
  test::TempDir dir;
  // r2 ended by "stop" has no routes: output_ids leave out the eos that ended it, so the model consumed all
  // of its 4 tokens. r3 has no finish_reason: its last output token may or may not have been fed back, so a
  // route for it is fine and its absence too. r0 ended by length has a route for its last output token (5),
  // which the model never consumes.
  write_file(dir / "o.jsonl", std::string(k_outputs) +
                                  R"({"req_id":"r2","prompt_ids":[10,10],"output_ids":[11,11],"finish_reason":"stop"})"
                                  "\n"
                                  R"({"req_id":"r3","prompt_ids":[10,10],"output_ids":[11,11]})"
                                  "\n");
  const OutputsFile outputs = read_outputs_file(dir / "o.jsonl");
  EXPECT_EQ(outputs.requests.at("r2").finish_reason, "stop");
  EXPECT_EQ(outputs.requests.at("r3").finish_reason, "");
  const std::string routes = hand_routes() + route_line("r0", 5, 0, {0, 1}) + route_line("r3", 0, 0, {0, 1}) +
                             route_line("r3", 1, 0, {0, 1}) + route_line("r3", 3, 0, {0, 1});
  const ClassRouting c = join_routes(outputs, routes);
  EXPECT_EQ(c.requests, 4);
  EXPECT_EQ(c.routed_requests, 3);
  // r2: 4; r3: token 2 of 0..2 (3 is not counted either way).
  EXPECT_EQ(c.tokens_without_routes, 5);
  EXPECT_EQ(c.prompt_tokens, 5 + 2);     // r3's two prompt tokens added
  EXPECT_EQ(c.generated_tokens, 3 + 2);  // r0 t5 and r3 t3 added: routed generated tokens
  ASSERT_EQ(c.notes.size(), 3u);
  EXPECT_NE(c.notes[0].find("1 of the 4 requests"), std::string::npos) << c.notes[0];
  EXPECT_NE(c.notes[1].find("5 tokens that the model consumed have no routes"), std::string::npos) << c.notes[1];
  EXPECT_NE(c.notes[2].find("1 requests that ended by length have routes for their last output token"),
            std::string::npos)
      << c.notes[2];
}

TEST(ClassRouting, JoinErrors) {
  test::TempDir dir;
  write_file(dir / "o.jsonl", k_outputs);
  const OutputsFile outputs = read_outputs_file(dir / "o.jsonl");
  const std::string meta = R"({"type":"meta","num_layers":2,"num_experts":4,"top_k":2})"
                           "\n";
  // A req_id the tokens file does not have (line 3 of the routes).
  EXPECT_ERROR_HAS(join_routes(outputs, meta + route_line("r0", 0, 0, {0, 1}) + route_line("r7", 0, 0, {0, 1})),
                   "line 3: req_id \"r7\" is not in the tokens file");
  // token_idx 6 of r0, which has 3 + 3 tokens (0..5).
  EXPECT_ERROR_HAS(join_routes(outputs, meta + route_line("r0", 6, 0, {0, 1})),
                   "line 2: token_idx 6 of request \"r0\" is beyond its 6 tokens");
  EXPECT_ERROR_HAS(join_routes(outputs, meta + R"({"layer":0,"token_idx":1,"topk_ids":[0,1]})"
                                               "\n"),
                   "line 2: the route has no req_id");
  EXPECT_ERROR_HAS(join_routes(outputs, meta + R"({"layer":0,"req_id":"r0","topk_ids":[0,1]})"
                                               "\n"),
                   "line 2: the route has no token_idx");
  // An id the classifier (the tokenizer) does not know fails when the join is made, naming the request.
  write_file(dir / "bad.jsonl", R"({"req_id":"r0","prompt_ids":[10],"output_ids":[99]})"
                                "\n");
  const OutputsFile bad = read_outputs_file(dir / "bad.jsonl");
  EXPECT_ERROR_HAS(ClassRoutingJoin(bad, hand_class), "bad.jsonl:1: request \"r0\": token id 99 is out of range");
}

}  // namespace
}  // namespace moescope::analysis
