#pragma once
// Routes joined with the token ids of each request (`report --tokens`): per MoE layer, how the
// selections of each token class and of prompt and generated tokens spread over the experts, the
// mutual information between class and expert, and the prompt-vs-generated shift. Formulas:
// docs/ANALYSIS.md, "Token classes".
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "analysis/outputs_file.h"
#include "analysis/route_line.h"
#include "analysis/token_class.h"
#include "util/json.h"

namespace moescope::analysis {

// One layer's counts. Every route adds one token to its class and to prompt or generated, and its
// top_k experts to their selections.
struct LayerClassCounts {
  std::array<std::vector<int64_t>, k_num_token_classes> class_counts;  // [class][num_experts] selections
  std::array<int64_t, k_num_token_classes> class_tokens{};             // [class] routed tokens
  std::vector<int64_t> prompt_counts;                                  // [num_experts]
  std::vector<int64_t> generated_counts;                               // [num_experts]
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
};

struct ClassRouting {
  int num_experts = 0;
  std::map<int, LayerClassCounts> layers;  // by layer
  int64_t requests = 0;                    // in the outputs file
  int64_t routed_requests = 0;             // with at least one route
  int64_t prompt_tokens = 0;               // distinct routed (req_id, token_idx) in the prompt
  int64_t generated_tokens = 0;            // ... and among the generated tokens
  // Tokens the model consumed that no route mentions: every token of a request but the sampled one that
  // ended it, which is the last output id with finish_reason "length" and not in output_ids with "stop"
  // (the eos); with another or no finish_reason the last output id is left out of this count.
  int64_t tokens_without_routes = 0;
  std::vector<std::string> notes;
};

class ClassRoutingJoin {
 public:
  // classify gives the class of a token id (classify_token with the model's tokenizer); it is called
  // here, once per distinct id of the outputs file, so that an id the tokenizer does not know fails
  // before the routes are read; its Error is rethrown naming the file, the line and the request.
  // outputs must outlive the join.
  ClassRoutingJoin(const OutputsFile& outputs, const std::function<TokenClass(int32_t)>& classify);

  // Adds one route (line: its line in the routes file, for messages). Throws Error for a route without
  // req_id or token_idx, a req_id the outputs file does not have, or a token_idx beyond its tokens.
  void add(const Route& route, int64_t line);

  // The counts, sized to num_experts (the routes reader's, known only at the end).
  ClassRouting finish(int num_experts);

 private:
  struct Request {
    const RequestTokens* tokens = nullptr;
    std::vector<TokenClass> classes;  // [prompt + output tokens]
    std::vector<bool> routed;         // [prompt + output tokens]: seen in some route
  };
  const OutputsFile& outputs_;
  std::unordered_map<std::string, Request> requests_;
  ClassRouting result_;
};

struct TopExpert {
  int expert = 0;
  int64_t count = 0;
  double share = 0.0;  // of the row's selections
  double lift = 0.0;   // share / the expert's share of all the layer's selections
};

// One row of a layer's table: a token class, or the prompt or generated tokens.
struct ExpertRow {
  int64_t tokens = 0;
  int64_t selections = 0;
  std::vector<int64_t> counts;   // [num_experts]
  std::vector<double> shares;    // [num_experts], all 0 without selections
  std::optional<TopExpert> top;  // the most selected expert (lower id on ties); none without selections
};

struct StrongestClass {
  TokenClass token_class = TokenClass::kOther;
  TopExpert top;
};

struct LayerClassMetrics {
  int layer = 0;
  ExpertRow all;                                       // every routed token of the layer (its top's lift is 1)
  std::array<ExpertRow, k_num_token_classes> classes;  // in k_token_classes order
  ExpertRow prompt, generated;
  double class_entropy_bits = 0.0;              // H(class) of the selections
  double mutual_information_bits = 0.0;         // I(class; expert)
  double normalized_mutual_information = 0.0;   // I / H(class); 0 when H(class) = 0
  double mutual_information_chance_bits = 0.0;  // what independence shows in a sample this size
  std::optional<StrongestClass> strongest;      // the class whose top expert has the largest lift
  std::optional<double> total_variation;        // prompt vs generated shares; none if either is empty
};

// Classes with fewer routed tokens than this in a layer are passed over for `strongest` (unless no
// class has as many): a lift measured on a handful of tokens is mostly noise.
inline constexpr int64_t k_strongest_min_tokens = 20;

LayerClassMetrics compute_layer_class_metrics(int layer, const LayerClassCounts& counts);

Json to_json(const ExpertRow& row);
Json to_json(const LayerClassMetrics& m);

}  // namespace moescope::analysis
