#include "tokenizer/chat_template.h"

#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

constexpr std::string_view k_helpful_assistant = "You are a helpful assistant.";

// bos_token / eos_token in tokenizer_config.json: a string, {"content": ...}, or null.
std::string token_string(const Json& config, const char* key, const std::filesystem::path& source) {
  if (!config.contains(key) || config.at(key).is_null()) return "";
  const Json& value = config.at(key);
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value.at("content").is_string()) {
    return value.at("content").get<std::string>();
  }
  fail("{}: {} is neither a string nor an object with a string \"content\"", source.string(), key);
}

// The Jinja string literal around text[pos], unescaped; "" when pos is not inside one.
std::string enclosing_string_literal(std::string_view text, std::size_t pos) {
  const std::size_t open = text.find_last_of("'\"", pos);
  if (open == std::string_view::npos) return "";
  const char quote = text[open];
  std::string literal;
  for (std::size_t i = open + 1; i < text.size(); ++i) {
    if (text[i] == quote) return literal;
    if (text[i] == '\\' && i + 1 < text.size()) {
      const char escaped = text[++i];
      literal += escaped == 'n' ? '\n' : escaped == 't' ? '\t' : escaped;
    } else {
      literal += text[i];
    }
  }
  return "";
}

// Qwen1.5/2/2.5 templates print a default system message when the conversation has none. Its text is
// the string literal holding "You are a helpful assistant." (Qwen2.5 prefixes "You are Qwen, ..."),
// less the ChatML markers around it when the literal carries them.
std::string find_default_system_message(std::string_view template_text) {
  const std::size_t at = template_text.find(k_helpful_assistant);
  if (at == std::string_view::npos) return "";
  std::string message = enclosing_string_literal(template_text, at);
  if (message.find(k_helpful_assistant) == std::string::npos) return std::string(k_helpful_assistant);
  for (const std::string_view prefix : {"<|im_start|>system\n"}) {
    if (message.starts_with(prefix)) message.erase(0, prefix.size());
  }
  for (const std::string_view suffix : {"<|im_end|>\n", "<|im_end|>"}) {
    if (message.ends_with(suffix)) {
      message.erase(message.size() - suffix.size());
      break;
    }
  }
  return message;
}

std::string_view strip_newlines_left(std::string_view s) {
  while (!s.empty() && s.front() == '\n') s.remove_prefix(1);
  return s;
}
std::string_view strip_newlines_right(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}

// Qwen3's split of an assistant turn into reasoning and answer, as its template does it:
// answer = content.split('</think>')[-1].lstrip('\n'),
// reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n').
std::pair<std::string, std::string> split_reasoning(std::string_view content) {
  const std::size_t first_end = content.find("</think>");
  if (first_end == std::string_view::npos) return {"", std::string(content)};
  const std::size_t last_end = content.rfind("</think>");
  const std::string_view answer = strip_newlines_left(content.substr(last_end + 8));
  std::string_view reasoning = strip_newlines_right(content.substr(0, first_end));
  const std::size_t think = reasoning.rfind("<think>");
  if (think != std::string_view::npos) reasoning.remove_prefix(think + 7);
  return {std::string(strip_newlines_left(reasoning)), std::string(answer)};
}

bool is_tool_response(std::string_view content) {
  return content.starts_with("<tool_response>") && content.ends_with("</tool_response>");
}

}  // namespace

const char* to_string(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::None: return "none";
    case ChatTemplateKind::ChatML: return "chatml";
    case ChatTemplateKind::Mistral: return "mistral";
    case ChatTemplateKind::Unrecognized: return "unrecognized";
  }
  return "unknown";
}

ChatTemplate ChatTemplate::from_model_dir(const std::filesystem::path& dir) {
  const std::filesystem::path config_path = dir / "tokenizer_config.json";
  const std::filesystem::path jinja_path = dir / "chat_template.jinja";
  Json config = Json::object();
  if (std::filesystem::exists(config_path)) {
    config = read_json_file(config_path);
    if (!config.is_object()) fail("{}: expected a JSON object", config_path.string());
  }
  std::string bos = token_string(config, "bos_token", config_path);
  std::string eos = token_string(config, "eos_token", config_path);

  // Newer checkpoints keep the template in its own file, which transformers prefers.
  if (std::filesystem::exists(jinja_path)) {
    return from_template(read_text_file(jinja_path), std::move(bos), std::move(eos), jinja_path.string());
  }
  std::string template_text;
  if (config.contains("chat_template") && !config.at("chat_template").is_null()) {
    const Json& value = config.at("chat_template");
    if (value.is_string()) {
      template_text = value.get<std::string>();
    } else if (value.is_array()) {
      // Several named templates: transformers uses the one named "default".
      for (const Json& entry : value) {
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template")) {
          template_text = entry.at("template").get<std::string>();
        }
      }
      if (template_text.empty()) fail("{}: chat_template list has no template named \"default\"", config_path.string());
    } else {
      fail("{}: chat_template is neither a string nor a list of named templates", config_path.string());
    }
  }
  return from_template(std::move(template_text), std::move(bos), std::move(eos), config_path.string());
}

ChatTemplate ChatTemplate::from_template(std::string template_text, std::string bos_token, std::string eos_token,
                                         std::string source) {
  ChatTemplate result;
  result.source_ = std::move(source);
  result.bos_token_ = std::move(bos_token);
  result.eos_token_ = std::move(eos_token);
  if (template_text.empty()) {
    result.kind_ = ChatTemplateKind::None;
  } else if (template_text.find("<|im_start|>") != std::string::npos) {
    result.kind_ = ChatTemplateKind::ChatML;
    result.default_system_message_ = find_default_system_message(template_text);
    result.qwen3_reasoning_ = template_text.find("reasoning_content") != std::string::npos;
  } else if (template_text.find("[INST]") != std::string::npos) {
    result.kind_ = ChatTemplateKind::Mistral;
    result.mistral_system_ = template_text.find("system_message") != std::string::npos;
  } else {
    result.kind_ = ChatTemplateKind::Unrecognized;
  }
  return result;
}

std::string ChatTemplate::apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                bool enable_thinking) const {
  switch (kind_) {
    case ChatTemplateKind::None:
      fail("{}: model has no chat template", source_);
    case ChatTemplateKind::Unrecognized:
      fail("{}: chat template is not one moescope recognises (ChatML with <|im_start|>, or Mistral [INST])",
           source_);
    case ChatTemplateKind::ChatML:
      break;
    case ChatTemplateKind::Mistral:
      break;
  }
  if (messages.empty()) fail("{}: chat template applied to no messages", source_);
  if (kind_ == ChatTemplateKind::Mistral) return apply_mistral(messages);
  return apply_chatml(messages, add_generation_prompt, enable_thinking);
}

std::string ChatTemplate::apply_chatml(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                       bool enable_thinking) const {
  for (const ChatMessage& message : messages) {
    if (message.role != "system" && message.role != "user" && message.role != "assistant") {
      fail("{}: chat template: role {:?} is not supported (system, user or assistant)", source_, message.role);
    }
  }
  const auto turn = [](std::string_view role, std::string_view content) {
    return fmt::format("<|im_start|>{}\n{}<|im_end|>\n", role, content);
  };

  std::string prompt;
  if (messages.front().role != "system" && !default_system_message_.empty()) {
    prompt += turn("system", default_system_message_);
  }
  // Qwen3 keeps the reasoning only of assistant turns after the last user query.
  std::size_t last_query = messages.size() - 1;
  for (std::size_t i = messages.size(); i-- > 0;) {
    if (messages[i].role == "user" && !is_tool_response(messages[i].content)) {
      last_query = i;
      break;
    }
  }
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if (message.role != "assistant" || !qwen3_reasoning_) {
      prompt += turn(message.role, message.content);
      continue;
    }
    const auto [reasoning, answer] = split_reasoning(message.content);
    const bool last = i + 1 == messages.size();
    if (i > last_query && (last || !reasoning.empty())) {
      prompt += fmt::format("<|im_start|>assistant\n<think>\n{}\n</think>\n\n{}<|im_end|>\n",
                            strip_newlines_right(strip_newlines_left(reasoning)), strip_newlines_left(answer));
    } else {
      prompt += turn("assistant", answer);
    }
  }
  if (add_generation_prompt) {
    prompt += "<|im_start|>assistant\n";
    if (qwen3_reasoning_ && !enable_thinking) prompt += "<think>\n\n</think>\n\n";
  }
  return prompt;
}

// Mixtral-8x7B-Instruct-v0.1's template. The original: "<s>[INST] u [/INST]a</s>[INST] u2 [/INST]",
// user and assistant only. The current one: " [INST] " and " a</s>" carry a leading space, and an
// optional first system message is put before the first user message with a blank line.
// Neither uses add_generation_prompt: a prompt ending in [/INST] already asks for the answer.
std::string ChatTemplate::apply_mistral(const std::vector<ChatMessage>& messages) const {
  std::size_t first = 0;
  std::string system_message;
  if (mistral_system_ && messages.front().role == "system") {
    system_message = messages.front().content;
    first = 1;
  }
  const std::string alternate_error = mistral_system_
                                          ? "After the optional system message, conversation roles must "
                                            "alternate user/assistant/user/assistant/..."
                                          : "Conversation roles must alternate user/assistant/user/assistant/...";
  const std::string role_error = mistral_system_
                                     ? "Only user and assistant roles are supported, with the exception of an "
                                       "initial optional system message!"
                                     : "Only user and assistant roles are supported!";
  const std::string space = mistral_system_ ? " " : "";

  std::string prompt = bos_token_;
  for (std::size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if ((message.role == "user") != ((i - first) % 2 == 0)) fail("{}: chat template: {}", source_, alternate_error);
    if (message.role == "user") {
      const bool with_system = i == first && first == 1;
      prompt += space + "[INST] " + (with_system ? system_message + "\n\n" : "") + message.content + " [/INST]";
    } else if (message.role == "assistant") {
      prompt += space + message.content + eos_token_;
    } else {
      fail("{}: chat template: {}", source_, role_error);
    }
  }
  return prompt;
}

}  // namespace moescope
