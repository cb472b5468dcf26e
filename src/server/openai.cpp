#include "server/openai.h"

#include <fmt/format.h>

#include <cmath>
#include <set>

#include "routing/records.h"
#include "util/error.h"

namespace moescope::server {

Json error_body(const ApiError& e) {
  return {{"error", {{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? Json(nullptr) : Json(e.param)}, {"code", e.status}}}};
}

namespace {

// Thrown inside the parsers, turned into the ApiError at their edge.
struct Refusal {
  ApiError error;
};

[[noreturn]] void refuse(const std::string& param, const std::string& message, int status = 400,
                         const std::string& type = "invalid_request_error") {
  throw Refusal{{status, type, message, param}};
}

// Typed, ranged reads of a JSON object's fields; every field read is marked known.
class Fields {
 public:
  explicit Fields(const Json& obj) : obj_(obj) {}

  const Json* get(const std::string& name) {
    known_.insert(name);
    auto it = obj_.find(name);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  std::optional<bool> boolean(const std::string& name) {
    const Json* v = get(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) refuse(name, fmt::format("'{}' must be a boolean", name));
    return v->get<bool>();
  }
  std::optional<double> number(const std::string& name, double lo, double hi, const char* range) {
    const Json* v = get(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) refuse(name, fmt::format("'{}' must be a number", name));
    const double x = v->get<double>();
    if (!std::isfinite(x) || x < lo || x > hi) refuse(name, fmt::format("'{}' must be {}; got {}", name, range, v->dump()));
    return x;
  }
  std::optional<int64_t> integer(const std::string& name, int64_t lo, int64_t hi) {
    const Json* v = get(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number_integer()) refuse(name, fmt::format("'{}' must be an integer", name));
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      refuse(name, fmt::format("'{}' must be between {} and {}", name, lo, hi));
    const int64_t x = v->get<int64_t>();
    if (x < lo || x > hi) refuse(name, fmt::format("'{}' must be between {} and {}; got {}", name, lo, hi, x));
    return x;
  }
  std::optional<std::string> string(const std::string& name) {
    const Json* v = get(name);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) refuse(name, fmt::format("'{}' must be a string", name));
    return v->get<std::string>();
  }
  // Fields OpenAI defines that moescope does not implement: accepted only at their neutral value.
  void neutral(const std::string& name, const Json& neutral_value) {
    const Json* v = get(name);
    if (v != nullptr && *v != neutral_value)
      refuse(name, fmt::format("'{}' is not supported (only {} is accepted)", name, neutral_value.dump()));
  }
  void refuse_unknown() const {
    for (const auto& [key, value] : obj_.items())
      if (!known_.count(key)) refuse(key, fmt::format("unknown field '{}'", key));
  }

 private:
  const Json& obj_;
  std::set<std::string> known_;
};

Json parse_body(const std::string& body) {
  Json j;
  try {
    j = Json::parse(body);
  } catch (const Json::parse_error& e) {
    refuse("", fmt::format("the body is not valid JSON: {}", e.what()));
  }
  if (!j.is_object()) refuse("", "the body must be a JSON object");
  return j;
}

// The fields completions and chat share.
void parse_common(Fields& f, const ModelInfo& model, GenerateParams& p) {
  if (auto name = f.string("model"); name && *name != model.served_model_name)
    refuse("model", fmt::format("The model `{}` does not exist (this server serves `{}`)", *name, model.served_model_name), 404,
           "not_found_error");
  if (auto t = f.number("temperature", 0.0, 1e6, "a number >= 0")) p.sampling.temperature = static_cast<float>(*t);
  else p.sampling.temperature = 1.0f;  // OpenAI's default
  if (auto v = f.get("top_p"); v != nullptr && v->is_number() && v->get<double>() == 0.0)
    refuse("top_p", "'top_p' must be in (0, 1]; got 0");
  if (auto t = f.number("top_p", 0.0, 1.0, "in (0, 1]")) p.sampling.top_p = static_cast<float>(*t);
  if (auto k = f.integer("top_k", -1, 1 << 30)) p.sampling.top_k = static_cast<int>(*k);
  if (auto s = f.integer("seed", INT64_MIN, INT64_MAX)) {
    p.sampling.seed = static_cast<uint64_t>(*s);
    p.has_seed = true;
  }
  if (auto n = f.integer("n", 1, 64)) p.n = static_cast<int>(*n);
  if (const Json* b = f.get("best_of"); b != nullptr && !(b->is_number_integer() && b->get<int64_t>() == p.n))
    refuse("best_of", "'best_of' is not supported (only equal to n)");
  if (const Json* stop = f.get("stop")) {
    if (stop->is_string()) p.stop.push_back(stop->get<std::string>());
    else if (stop->is_array()) {
      for (const Json& s : *stop) {
        if (!s.is_string()) refuse("stop", "'stop' must be a string or a list of strings");
        p.stop.push_back(s.get<std::string>());
      }
    } else {
      refuse("stop", "'stop' must be a string or a list of strings");
    }
    for (const auto& s : p.stop)
      if (s.empty()) refuse("stop", "'stop' strings must not be empty");
  }
  p.stream = f.boolean("stream").value_or(false);
  if (const Json* so = f.get("stream_options")) {
    if (!so->is_object()) refuse("stream_options", "'stream_options' must be an object");
    if (!p.stream) refuse("stream_options", "'stream_options' is only allowed with stream: true");
    Fields o(*so);
    p.include_usage = o.boolean("include_usage").value_or(false);
    o.refuse_unknown();
  }
  p.ignore_eos = f.boolean("ignore_eos").value_or(false);
  p.return_routed_experts = f.boolean("return_routed_experts").value_or(false);
  f.string("user");  // accepted and ignored, as by OpenAI's own servers for generation
  f.neutral("presence_penalty", 0);
  f.neutral("frequency_penalty", 0);
  f.neutral("repetition_penalty", 1);
  if (const Json* lb = f.get("logit_bias"); lb != nullptr && !(lb->is_object() && lb->empty()))
    refuse("logit_bias", "'logit_bias' is not supported");
}

// Ids of one prompt given as text or ids, checked against the vocabulary.
std::vector<int32_t> prompt_ids(const Json& prompt, const ModelInfo& model, std::string* text) {
  if (prompt.is_string()) {
    *text = prompt.get<std::string>();
    if (text->empty()) refuse("prompt", "the prompt must not be empty");
    return model.tokenizer->encode(*text);
  }
  std::vector<int32_t> ids;
  for (const Json& id : prompt) {
    if (!id.is_number_integer()) refuse("prompt", "'prompt' must be a string, a list of strings, or token ids");
    const int64_t v = id.get<int64_t>();
    if (v < 0 || v >= model.vocab_size)
      refuse("prompt", fmt::format("token id {} is out of vocabulary (vocab_size {})", v, model.vocab_size));
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) refuse("prompt", "the prompt must not be empty");
  *text = model.tokenizer->decode(ids);
  return ids;
}

void check_lengths(GenerateParams& p, const ModelInfo& model) {
  for (const auto& ids : p.prompts) {
    const int64_t len = static_cast<int64_t>(ids.size());
    if (len >= model.max_model_len)
      refuse("prompt", fmt::format("This model's maximum context length is {} tokens. However, your prompt has {} tokens.",
                                   model.max_model_len, len));
    if (p.max_tokens && len + *p.max_tokens > model.max_model_len)
      refuse("max_tokens", fmt::format("This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the "
                                       "prompt, {} for the completion). Please reduce the prompt or max_tokens.",
                                       model.max_model_len, len + *p.max_tokens, len, *p.max_tokens));
  }
}

template <typename Parse>
std::optional<GenerateParams> guarded(Parse&& parse, ApiError* error) {
  try {
    return parse();
  } catch (const Refusal& r) {
    *error = r.error;
  } catch (const Error& e) {
    *error = {400, "invalid_request_error", e.what(), ""};
  }
  return std::nullopt;
}

}  // namespace

std::optional<GenerateParams> parse_completion_request(const std::string& body, const ModelInfo& model, ApiError* error) {
  return guarded(
      [&] {
        const Json j = parse_body(body);
        Fields f(j);
        GenerateParams p;
        const Json* prompt = f.get("prompt");
        if (prompt == nullptr) refuse("prompt", "'prompt' is required");
        const bool batch = prompt->is_array() && !prompt->empty() && ((*prompt)[0].is_string() || (*prompt)[0].is_array());
        if (!prompt->is_string() && !prompt->is_array()) refuse("prompt", "'prompt' must be a string, a list of strings, or token ids");
        if (prompt->is_array() && prompt->empty()) refuse("prompt", "the prompt must not be empty");
        for (const Json& one : batch ? *prompt : Json::array({*prompt})) {
          if (!one.is_string() && !one.is_array()) refuse("prompt", "'prompt' must be a string, a list of strings, or token ids");
          std::string text;
          p.prompts.push_back(prompt_ids(one, model, &text));
          p.prompt_texts.push_back(std::move(text));
        }
        p.max_tokens = static_cast<int>(f.integer("max_tokens", 1, 1 << 30).value_or(16));  // OpenAI's default
        parse_common(f, model, p);
        p.echo = f.boolean("echo").value_or(false);
        if (auto lp = f.integer("logprobs", 0, 20)) p.logprobs = static_cast<int>(*lp);
        if (p.echo && p.logprobs >= 0) refuse("echo", "'echo' with 'logprobs' (prompt logprobs) is not supported");
        f.neutral("suffix", nullptr);
        f.refuse_unknown();
        check_lengths(p, model);
        return p;
      },
      error);
}

std::optional<GenerateParams> parse_chat_request(const std::string& body, const ModelInfo& model, ApiError* error) {
  return guarded(
      [&] {
        const Json j = parse_body(body);
        Fields f(j);
        GenerateParams p;
        const Json* messages = f.get("messages");
        if (messages == nullptr || !messages->is_array() || messages->empty())
          refuse("messages", "'messages' must be a non-empty list");
        std::vector<ChatMessage> chat;
        for (const Json& m : *messages) {
          if (!m.is_object()) refuse("messages", "each message must be an object");
          Fields mf(m);
          const auto role = mf.string("role");
          if (!role || (*role != "system" && *role != "user" && *role != "assistant"))
            refuse("messages", "a message's 'role' must be \"system\", \"user\" or \"assistant\"");
          std::string content;
          const Json* c = mf.get("content");
          if (c != nullptr && c->is_string()) {
            content = c->get<std::string>();
          } else if (c != nullptr && c->is_array()) {
            for (const Json& part : *c) {  // [{"type":"text","text":...}]
              if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
                refuse("messages", "only text content parts are supported");
              content += part["text"].get<std::string>();
            }
          } else {
            refuse("messages", "a message's 'content' must be a string or a list of text parts");
          }
          mf.string("name");
          mf.refuse_unknown();
          chat.push_back({*role, content});
        }
        bool thinking = true;
        if (const Json* kw = f.get("chat_template_kwargs")) {
          if (!kw->is_object()) refuse("chat_template_kwargs", "'chat_template_kwargs' must be an object");
          Fields kf(*kw);
          thinking = kf.boolean("enable_thinking").value_or(true);
          kf.refuse_unknown();
        }
        if (model.chat_template == nullptr || model.chat_template->kind() == ChatTemplateKind::None)
          refuse("messages", "this model has no chat template; use /v1/completions");
        const std::string text = model.chat_template->apply(chat, /*add_generation_prompt=*/true, thinking);
        p.prompts.push_back(model.tokenizer->encode(text));
        p.prompt_texts.push_back(text);
        if (auto m = f.integer("max_completion_tokens", 1, 1 << 30)) p.max_tokens = static_cast<int>(*m);
        if (auto m = f.integer("max_tokens", 1, 1 << 30)) p.max_tokens = static_cast<int>(*m);
        parse_common(f, model, p);
        const bool lp = f.boolean("logprobs").value_or(false);
        const auto top = f.integer("top_logprobs", 0, 20);
        if (top && !lp) refuse("top_logprobs", "'top_logprobs' needs 'logprobs': true");
        if (lp) p.logprobs = static_cast<int>(top.value_or(0));
        f.refuse_unknown();
        check_lengths(p, model);
        return p;
      },
      error);
}

Json completion_logprobs(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<float>& logprobs,
                         const std::vector<std::vector<std::pair<int32_t, float>>>& top, size_t text_offset) {
  Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(), offsets = Json::array();
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string piece = tok.decode(std::span<const int32_t>(&ids[i], 1));
    tokens.push_back(piece);
    token_logprobs.push_back(json_float(logprobs[i]));
    Json alternatives = Json::object();
    for (const auto& [id, lp] : top[i]) alternatives[tok.decode(std::span<const int32_t>(&id, 1))] = json_float(lp);
    top_logprobs.push_back(alternatives);
    offsets.push_back(text_offset);
    text_offset += piece.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top_logprobs}, {"text_offset", offsets}};
}

Json chat_logprobs(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<float>& logprobs,
                   const std::vector<std::vector<std::pair<int32_t, float>>>& top) {
  auto entry = [&](int32_t id, float lp) {
    const std::string piece = tok.decode(std::span<const int32_t>(&id, 1));
    return Json{{"token", piece}, {"logprob", json_float(lp)}, {"bytes", std::vector<unsigned char>(piece.begin(), piece.end())}};
  };
  Json content = Json::array();
  for (size_t i = 0; i < ids.size(); ++i) {
    Json e = entry(ids[i], logprobs[i]);
    Json alternatives = Json::array();
    for (const auto& [id, lp] : top[i]) alternatives.push_back(entry(id, lp));
    e["top_logprobs"] = alternatives;
    content.push_back(e);
  }
  return {{"content", content}};
}

Json routed_experts_json(const RoutingShape& shape, const std::vector<TokenRoutes>& routes) {
  Json tokens = Json::array();
  const size_t k = static_cast<size_t>(shape.top_k);
  for (const TokenRoutes& r : routes) {
    Json ids = Json::array(), weights = Json::array();
    for (size_t m = 0; m * k < r.topk_ids.size(); ++m) {
      ids.push_back(std::vector<int32_t>(r.topk_ids.begin() + m * k, r.topk_ids.begin() + (m + 1) * k));
      weights.push_back(json_floats(std::span<const float>(r.topk_weights).subspan(m * k, k)));
    }
    tokens.push_back({{"token_idx", r.token_idx}, {"token_id", r.token_id}, {"topk_ids", ids}, {"topk_weights", weights}});
  }
  return {{"layers", shape.moe_layers}, {"top_k", shape.top_k}, {"tokens", tokens}};
}

}  // namespace moescope::server
