#pragma once
// Chat templates, recognised by kind rather than run: moescope has no Jinja engine. The template
// text of tokenizer_config.json (or chat_template.jinja) is matched against the families we know,
// and each family is rendered by C++ that reproduces its published template exactly:
//   ChatML  (contains "<|im_start|>"): Qwen1.5/2/2.5/3. Qwen1.5/2/2.5 insert a default system
//           message when the first message is not one; that sentence is read from the template.
//           Qwen3's reasoning handling (<think> blocks) is reproduced when the template has it.
//   Mistral (contains "[INST]"): Mixtral-8x7B-Instruct-v0.1, both the original template (user and
//           assistant only) and the current one (an optional leading system message).
// Tool calls and tool messages are not supported.
#include <filesystem>
#include <string>
#include <vector>

namespace moescope {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

enum class ChatTemplateKind {
  None,          // the model has no chat template
  ChatML,        // <|im_start|>role\ncontent<|im_end|>\n
  Mistral,       // <s>[INST] user [/INST]assistant</s>
  Unrecognized,  // a template that is neither of the above
};

const char* to_string(ChatTemplateKind kind);

class ChatTemplate {
 public:
  // Reads DIR/tokenizer_config.json (and DIR/chat_template.jinja, which newer checkpoints use);
  // a directory with neither gives kind None. Throws Error naming the file when it is malformed.
  static ChatTemplate from_model_dir(const std::filesystem::path& dir);
  // From the template text itself; `source` names where it came from, for errors.
  static ChatTemplate from_template(std::string template_text, std::string bos_token, std::string eos_token,
                                    std::string source);

  ChatTemplateKind kind() const { return kind_; }
  const std::string& bos_token() const { return bos_token_; }  // "" when the config has none
  const std::string& eos_token() const { return eos_token_; }  // "" when the config has none

  // The prompt text for `messages`, ending with the assistant's header when add_generation_prompt.
  // enable_thinking = false asks Qwen3 for an empty <think></think> block (its template's switch).
  // Throws Error for kind None or Unrecognized, and for messages the template would reject.
  std::string apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                    bool enable_thinking = true) const;

 private:
  std::string apply_chatml(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                           bool enable_thinking) const;
  std::string apply_mistral(const std::vector<ChatMessage>& messages) const;

  ChatTemplateKind kind_ = ChatTemplateKind::None;
  std::string source_;  // the file the template came from, for errors
  std::string bos_token_;
  std::string eos_token_;
  std::string default_system_message_;  // ChatML: inserted when the first message is not "system"; "" for none
  bool qwen3_reasoning_ = false;        // ChatML: Qwen3's <think> handling of assistant turns
  bool mistral_system_ = false;         // Mistral: the template accepts a leading system message
};

}  // namespace moescope
