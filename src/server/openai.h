#pragma once
// The OpenAI-compatible API at the edge: JSON bodies parsed and checked into native structs (every
// field typed and ranged, unknown fields refused so a typo is an error rather than a silent default),
// and the response objects built from the engine's output. Nothing here touches the engine.
#include <optional>
#include <string>
#include <vector>

#include "server/engine_service.h"
#include "util/json.h"

namespace moescope::server {

// An error for the client: HTTP status, OpenAI error type, message.
struct ApiError {
  int status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::string param;  // the offending field, if one
};

// {"error":{"message","type","param","code"}}
Json error_body(const ApiError& e);

// What a completion or chat request asks for, checked.
struct GenerateParams {
  std::vector<std::vector<int32_t>> prompts;  // one or more prompts, as ids
  std::vector<std::string> prompt_texts;      // their text (for echo)
  std::optional<int> max_tokens;              // absent: up to the model's length
  SamplingParams sampling;                    // seed filled by the server when absent
  bool has_seed = false;
  std::vector<std::string> stop;
  int n = 1;
  bool echo = false;
  int logprobs = -1;                          // -1: none; else top-k alternatives
  bool stream = false;
  bool include_usage = false;                 // stream_options.include_usage
  bool ignore_eos = false;
  bool return_routed_experts = false;
};

struct ModelInfo {
  std::string served_model_name;
  int max_model_len = 0;
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  int vocab_size = 0;
};

// Parse and check a body; nullopt with *error set when the request is refused.
std::optional<GenerateParams> parse_completion_request(const std::string& body, const ModelInfo& model, ApiError* error);
std::optional<GenerateParams> parse_chat_request(const std::string& body, const ModelInfo& model, ApiError* error);

// The per-token logprobs of one choice as OpenAI shapes them.
Json completion_logprobs(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<float>& logprobs,
                         const std::vector<std::vector<std::pair<int32_t, float>>>& top, size_t text_offset);
Json chat_logprobs(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<float>& logprobs,
                   const std::vector<std::vector<std::pair<int32_t, float>>>& top);
// {"layers":[...],"top_k":K,"tokens":[{"token_idx","token_id","topk_ids":[[..]per layer],"topk_weights":[[..]]}]}
Json routed_experts_json(const RoutingShape& shape, const std::vector<TokenRoutes>& routes);

}  // namespace moescope::server
