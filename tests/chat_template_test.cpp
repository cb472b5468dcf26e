// Chat template tests. Expected prompts were rendered from the real templates with Jinja2
// (trim_blocks, lstrip_blocks, as transformers does) and pasted here.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tokenizer/chat_template.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

// Qwen2-7B-Instruct's template.
constexpr const char* k_qwen2_template =
    R"({% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})";

// The start of Qwen2.5's template, whose default system message is longer.
constexpr const char* k_qwen25_template_start = R"({%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %})";

// Mixtral-8x7B-Instruct-v0.1's original template.
constexpr const char* k_mixtral_v1_template =
    R"({{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %})";

// Mixtral-8x7B-Instruct-v0.1's current template (optional system message).
constexpr const char* k_mixtral_v2_template = R"({%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
)";

const std::vector<ChatMessage> k_single = {{"user", "Hi!"}};
const std::vector<ChatMessage> k_with_system = {{"system", "Be brief."}, {"user", "Hi!"}};
const std::vector<ChatMessage> k_multi = {{"user", "What is 2+2?"}, {"assistant", "4"}, {"user", "And 3+3?"}};
const std::vector<ChatMessage> k_system_multi = {
    {"system", "Be brief."}, {"user", "Hi!"}, {"assistant", "Hello."}, {"user", "Bye"}};
const std::vector<ChatMessage> k_two_users = {{"user", "a"}, {"user", "b"}};

ChatTemplate make(const char* text) { return ChatTemplate::from_template(text, "<s>", "</s>", "test template"); }

// The Error message of apply(), or "" when it does not throw.
std::string apply_error(const ChatTemplate& chat_template, const std::vector<ChatMessage>& messages) {
  try {
    chat_template.apply(messages, true);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ChatTemplate, ChatMLInsertsQwen2DefaultSystemMessage) {
  const ChatTemplate chat_template = make(k_qwen2_template);
  EXPECT_EQ(chat_template.kind(), ChatTemplateKind::ChatML);
  EXPECT_EQ(chat_template.apply(k_single, false),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n");
  EXPECT_EQ(chat_template.apply(k_multi, true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n");
  // A system message of the caller's replaces the default.
  EXPECT_EQ(chat_template.apply(k_with_system, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
  // ChatML does not police the order of roles, but does reject unknown roles.
  EXPECT_EQ(chat_template.apply(k_two_users, false),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
            "<|im_start|>user\nb<|im_end|>\n");
  EXPECT_NE(apply_error(chat_template, {{"tool", "x"}}).find("tool"), std::string::npos);
}

TEST(ChatTemplate, ChatMLTakesTheDefaultSystemMessageFromTheTemplate) {
  const ChatTemplate chat_template = make(k_qwen25_template_start);
  EXPECT_EQ(chat_template.apply(k_single, true),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, ChatMLWithoutDefaultSystemMessage) {
  const ChatTemplate chat_template = make("{{ '<|im_start|>' + message['role'] }}");
  EXPECT_EQ(chat_template.apply(k_single, true), "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, Qwen3FromModelDir) {
  const fs::path dir = fs::path(MOESCOPE_SOURCE_DIR) / ".cache/qwen-tokenizer";
  ASSERT_TRUE(fs::exists(dir / "tokenizer_config.json"))
      << dir / "tokenizer_config.json" << " is missing: run scripts/fetch_fixtures.sh";
  const ChatTemplate chat_template = ChatTemplate::from_model_dir(dir);
  EXPECT_EQ(chat_template.kind(), ChatTemplateKind::ChatML);
  EXPECT_EQ(chat_template.eos_token(), "<|im_end|>");
  EXPECT_EQ(chat_template.bos_token(), "");
  // Qwen3 adds no default system message.
  EXPECT_EQ(chat_template.apply(k_single, true), "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(chat_template.apply(k_single, true, /*enable_thinking=*/false),
            "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(chat_template.apply(k_system_multi, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
            "Hello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n");
  // Reasoning of turns before the last user message is dropped; the last keeps it.
  const std::vector<ChatMessage> thinking = {{"user", "Q1"},
                                             {"assistant", "<think>\nr1\n</think>\n\nA1"},
                                             {"user", "Q2"},
                                             {"assistant", "<think>\nr2\n</think>\n\nA2"}};
  EXPECT_EQ(chat_template.apply(thinking, false),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n");
  // A final answer without reasoning gets an empty think block.
  EXPECT_EQ(chat_template.apply({{"system", "sys"}, {"user", "Q1"}, {"assistant", "A1"}}, true),
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
            "</think>\n\nA1<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, MixtralOriginal) {
  const ChatTemplate chat_template = make(k_mixtral_v1_template);
  EXPECT_EQ(chat_template.kind(), ChatTemplateKind::Mistral);
  EXPECT_EQ(chat_template.apply(k_single, true), "<s>[INST] Hi! [/INST]");
  EXPECT_EQ(chat_template.apply(k_multi, false), "<s>[INST] What is 2+2? [/INST]4</s>[INST] And 3+3? [/INST]");
  EXPECT_NE(apply_error(chat_template, k_two_users).find("Conversation roles must alternate"), std::string::npos);
  // The original template has no system message: it breaks the alternation.
  EXPECT_NE(apply_error(chat_template, k_with_system).find("Conversation roles must alternate"), std::string::npos);
  EXPECT_NE(apply_error(chat_template, {{"tool", "x"}}).find("Conversation roles must alternate"),
            std::string::npos);
  EXPECT_NE(apply_error(chat_template, {{"user", "x"}, {"tool", "y"}}).find("Only user and assistant roles"),
            std::string::npos);
}

TEST(ChatTemplate, MixtralWithSystemMessage) {
  const ChatTemplate chat_template = make(k_mixtral_v2_template);
  EXPECT_EQ(chat_template.kind(), ChatTemplateKind::Mistral);
  EXPECT_EQ(chat_template.apply(k_single, true), "<s> [INST] Hi! [/INST]");
  EXPECT_EQ(chat_template.apply(k_with_system, true), "<s> [INST] Be brief.\n\nHi! [/INST]");
  EXPECT_EQ(chat_template.apply(k_multi, true), "<s> [INST] What is 2+2? [/INST] 4</s> [INST] And 3+3? [/INST]");
  EXPECT_EQ(chat_template.apply(k_system_multi, false),
            "<s> [INST] Be brief.\n\nHi! [/INST] Hello.</s> [INST] Bye [/INST]");
  EXPECT_NE(apply_error(chat_template, k_two_users).find("After the optional system message"), std::string::npos);
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            (std::string("moescope_chat_") + testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

TEST(ChatTemplate, FromModelDirReadsTokensAndTemplate) {
  const TempDir dir;
  const Json config = {{"chat_template", k_mixtral_v1_template},
                       {"bos_token", {{"content", "<s>"}, {"lstrip", false}}},
                       {"eos_token", "</s>"}};
  write_text_file(dir.path() / "tokenizer_config.json", config.dump());
  const ChatTemplate chat_template = ChatTemplate::from_model_dir(dir.path());
  EXPECT_EQ(chat_template.kind(), ChatTemplateKind::Mistral);
  EXPECT_EQ(chat_template.bos_token(), "<s>");
  EXPECT_EQ(chat_template.eos_token(), "</s>");
  EXPECT_EQ(chat_template.apply(k_multi, true), "<s>[INST] What is 2+2? [/INST]4</s>[INST] And 3+3? [/INST]");

  // chat_template.jinja takes precedence over the config's template, as in transformers.
  write_text_file(dir.path() / "chat_template.jinja", k_qwen2_template);
  EXPECT_EQ(ChatTemplate::from_model_dir(dir.path()).kind(), ChatTemplateKind::ChatML);
}

TEST(ChatTemplate, NoTemplateIsAClearError) {
  const TempDir dir;
  const ChatTemplate empty_dir = ChatTemplate::from_model_dir(dir.path());
  EXPECT_EQ(empty_dir.kind(), ChatTemplateKind::None);
  EXPECT_NE(apply_error(empty_dir, k_single).find("model has no chat template"), std::string::npos);

  write_text_file(dir.path() / "tokenizer_config.json", R"({"eos_token": "</s>"})");
  const ChatTemplate no_template = ChatTemplate::from_model_dir(dir.path());
  EXPECT_EQ(no_template.kind(), ChatTemplateKind::None);
  EXPECT_EQ(no_template.eos_token(), "</s>");
  EXPECT_NE(apply_error(no_template, k_single).find("model has no chat template"), std::string::npos);

  const ChatTemplate unknown = make("{{ messages[0]['content'] }}");
  EXPECT_EQ(unknown.kind(), ChatTemplateKind::Unrecognized);
  EXPECT_NE(apply_error(unknown, k_single).find("not one moescope recognises"), std::string::npos);

  write_text_file(dir.path() / "tokenizer_config.json", R"({"eos_token": 5})");
  EXPECT_THROW(ChatTemplate::from_model_dir(dir.path()), Error);
  EXPECT_THROW(make(k_qwen2_template).apply({}, true), Error);
}

}  // namespace
}  // namespace moescope
