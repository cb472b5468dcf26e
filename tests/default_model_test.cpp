// The trained model that ships with moescope (models/moescope-tiny-gsm8k, docs/DEFAULT_MODEL.md) against
// Hugging Face: its tokenizer against the `tokenizers` library on GSM8K-style and varied strings, its chat
// template against transformers' apply_chat_template, its greedy text against transformers' greedy
// generation, and (tests/fixtures/default_model/reference.json) greedy tokens and every MoE layer's routes
// for prompt and generated tokens against transformers. All expected values were made by
// tools/train_default_model.py with transformers 5.17 / tokenizers 0.23 on the GPU machine.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "test_util.h"
#include "tokenizer/unicode.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

constexpr double k_logit_rel_tol = 1e-4;  // max |ours - ref| / max |ref| over the reference's top logits
constexpr double k_route_tie = 1e-4;      // a top-k probability margin below this is a near-tie: reported
constexpr double k_greedy_tie = 1e-4;     // a top-1/top-2 logit gap below this is a near-tie: reported

fs::path model_dir() { return test::source_dir() / "models" / "moescope-tiny-gsm8k"; }
fs::path fixture(const std::string& name) { return test::source_dir() / "tests" / "fixtures" / "default_model" / name; }

// The shipped model, loaded once for the whole suite.
const LoadedModel& model() {
  static const LoadedModel m = load_model(model_dir());
  return m;
}

std::string quoted(const std::string& text) { return Json(text).dump(-1, ' ', true, Json::error_handler_t::replace); }

TEST(DefaultModel, IsFoundWhenNoModelIsNamed) {
  EXPECT_EQ(fs::canonical(default_model_dir()), fs::canonical(model_dir()));
}

TEST(DefaultModel, ShapeAndFilesAsDocumented) {
  const LoadedModel& m = model();
  const ModelConfig& c = m.weights->config;
  EXPECT_EQ(c.architecture, "Qwen2MoeForCausalLM");
  EXPECT_EQ(c.num_hidden_layers, 8);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.vocab_size, 4096);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_EQ(c.shared_expert_intermediate_size, 128);
  EXPECT_EQ(c.intermediate_size, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{true, true, true, false, true, true, true, true}));
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_LE(fs::file_size(model_dir() / "model.safetensors"), 20'000'000u);  // "at most 20 MB" (issue 8)

  ASSERT_TRUE(m.tokenizer.has_value());
  EXPECT_EQ(m.tokenizer->vocab_size(), 4096);
  EXPECT_EQ(m.tokenizer->token_to_id("<|endoftext|>"), 0);
  EXPECT_EQ(m.tokenizer->token_to_id("<|im_start|>"), 1);
  EXPECT_EQ(m.tokenizer->token_to_id("<|im_end|>"), 2);
  for (int32_t id : {0, 1, 2}) EXPECT_TRUE(m.tokenizer->is_special(id)) << id;
  EXPECT_EQ(m.chat_template.kind(), ChatTemplateKind::ChatML);
  // Generation stops at <|im_end|> (chat turns) and <|endoftext|> (raw text).
  auto has = [&](int32_t id) { return std::count(m.eos_token_ids.begin(), m.eos_token_ids.end(), id) == 1; };
  EXPECT_TRUE(has(0) && has(2)) << "eos ids: " << Json(m.eos_token_ids).dump();
}

TEST(DefaultModel, TokenizerEncodesLikeHuggingFaceTokenizers) {
  const Json golden = read_json_file(fixture("tokenizer_golden.json"));
  const Json& cases = golden.at("cases");
  ASSERT_GE(cases.size(), 700u);
  const Tokenizer& tokenizer = *model().tokenizer;
  int mismatches = 0;
  for (const Json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const auto want = c.at("ids").get<std::vector<int32_t>>();
    const auto got = tokenizer.encode(text);
    if (got != want) {
      if (++mismatches <= 5) ADD_FAILURE() << "ids differ for " << quoted(text) << "\n  want " << Json(want).dump()
                                           << "\n  got  " << Json(got).dump();
      continue;
    }
    EXPECT_EQ(tokenizer.decode(got), c.at("decoded").get<std::string>()) << quoted(text);
    EXPECT_EQ(tokenizer.decode(got, /*skip_special_tokens=*/true), c.at("decoded_skip_special").get<std::string>())
        << quoted(text);
    EXPECT_EQ(tokenizer.decode(got), unicode::nfc(text)) << quoted(text);
  }
  EXPECT_EQ(mismatches, 0) << "of " << cases.size() << " strings";
  std::printf("default model tokenizer: %zu strings, %d id mismatches (tokenizers %s)\n", cases.size(), mismatches,
              golden.value("tokenizers_version", "?").c_str());
}

std::vector<ChatMessage> messages_of(const Json& messages) {
  std::vector<ChatMessage> out;
  for (const Json& m : messages) out.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
  return out;
}

TEST(DefaultModel, ChatTemplateRendersLikeTransformers) {
  const Json golden = read_json_file(fixture("chat_template.json"));
  ASSERT_GE(golden.at("cases").size(), 5u);
  for (const Json& c : golden.at("cases")) {
    const bool generation_prompt = c.at("add_generation_prompt").get<bool>();
    const std::string text = model().chat_template.apply(messages_of(c.at("messages")), generation_prompt);
    EXPECT_EQ(text, c.at("text").get<std::string>());
    EXPECT_EQ(model().tokenizer->encode(text), c.at("ids").get<std::vector<int32_t>>()) << quoted(text);
  }
}

// Greedy generation through the engine (prefill, then one decode per token), stopping at eos as the CLI does.
RequestOutput generate(const std::vector<int32_t>& prompt, int max_tokens, bool ignore_eos, test::CaptureSink* sink) {
  cpu::CpuBackend backend(model().weights);
  Engine engine(backend, EngineOptions{256, model().eos_token_ids}, sink);
  engine.add_request({"r0", prompt, SamplingParams{}, max_tokens, ignore_eos});
  auto out = engine.run_to_completion();
  EXPECT_EQ(out.size(), 1u);
  return out.at(0);
}

// transformers' greedy generation with eos (samples printed by the training script's --evaluate run): the same text, the
// same length, the same stop.
TEST(DefaultModel, GreedyTextEqualsTransformersGeneration) {
  const Json golden = read_json_file(fixture("hf_greedy_samples.json"));
  ASSERT_GE(golden.at("samples").size(), 2u);
  for (const Json& s : golden.at("samples")) {
    const std::string prompt = s.at("prompt").get<std::string>();
    SCOPED_TRACE(prompt);
    ASSERT_EQ(s.at("kind").get<std::string>(), "raw");
    const RequestOutput out = generate(model().tokenizer->encode(prompt), 160, false, nullptr);
    EXPECT_EQ(model().tokenizer->decode(out.output_ids, /*skip_special_tokens=*/true), s.at("output").get<std::string>());
    const bool hf_stopped = s.at("finish").get<std::string>() == "eos";
    EXPECT_EQ(out.finish_reason, hf_stopped ? "stop" : "length");
    // transformers counts the eos token among its new tokens; the engine does not keep it.
    EXPECT_EQ(out.output_ids.size() + (hf_stopped ? 1 : 0), s.at("hf_new_tokens").get<size_t>());
  }
}

// The full reference: for each prompt (raw and chat-templated GSM8K test questions) the prompt ids, the
// largest last-position logits, 32 greedy tokens and every MoE layer's top-k ids and weights for every
// prompt token and every generated token fed back, all from transformers.
TEST(DefaultModel, GreedyTokensAndRoutesEqualTransformers) {
  ASSERT_TRUE(fs::exists(fixture("reference.json")))
      << fixture("reference.json") << " is missing: it comes from tools/train_default_model.py --evaluate "
      << "models/moescope-tiny-gsm8k on the GPU machine (docs/DEFAULT_MODEL.md)";
  const Json reference = read_json_file(fixture("reference.json"));
  const ModelConfig& c = model().weights->config;
  std::vector<int> sparse;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.layer_is_moe[l]) sparse.push_back(l);
  EXPECT_EQ(sparse, reference.at("sparse_layers").get<std::vector<int>>());
  ASSERT_GE(reference.at("prompts").size(), 5u);
  int near_ties = 0;
  for (const Json& p : reference.at("prompts")) {
    const std::string label = (p.at("chat").get<bool>() ? "chat" : "raw") + std::string(" test question ") +
                              std::to_string(p.at("test_index").get<int>());
    SCOPED_TRACE(label);
    const auto prompt = p.at("prompt_ids").get<std::vector<int32_t>>();
    // The prompt as moescope builds it from the text (and the chat template) is transformers' prompt.
    const std::string text = p.at("chat").get<bool>()
                                 ? model().chat_template.apply(messages_of(p.at("messages")), true)
                                 : p.at("text").get<std::string>();
    EXPECT_EQ(text, p.at("text").get<std::string>());
    EXPECT_EQ(model().tokenizer->encode(text), prompt);

    // Prefill alone: the largest logits of the last position.
    {
      cpu::CpuBackend backend(model().weights);
      Batch batch;
      batch.sequences.push_back({backend.create_cache(), 0, prompt, "r0"});
      std::vector<float> logits;
      backend.forward(batch, nullptr, logits);
      const auto ids = p.at("last_logits_top").at("ids").get<std::vector<int32_t>>();
      const auto values = p.at("last_logits_top").at("values").get<std::vector<double>>();
      const double max_ref = p.at("last_logits_max_abs").get<double>();
      double max_diff = 0.0;
      for (size_t i = 0; i < ids.size(); ++i) max_diff = std::max(max_diff, std::fabs(logits.at(ids[i]) - values[i]));
      std::printf("  %s: top-%zu last-position logits max |diff| %.3g, relative %.3g\n", label.c_str(), ids.size(),
                  max_diff, max_diff / max_ref);
      EXPECT_LE(max_diff / max_ref, k_logit_rel_tol);
    }

    // Greedy through the engine, every route captured: prefill rows, then one row per decode pass.
    test::CaptureSink sink;
    const auto ref_greedy = p.at("greedy_ids").get<std::vector<int32_t>>();
    const auto margins = p.at("greedy_margins").get<std::vector<double>>();
    const RequestOutput out = generate(prompt, static_cast<int>(ref_greedy.size()), true, &sink);
    ASSERT_EQ(out.output_ids.size(), ref_greedy.size());
    size_t same = ref_greedy.size();
    for (size_t i = 0; i < ref_greedy.size(); ++i) {
      if (out.output_ids[i] == ref_greedy[i]) continue;
      same = i;
      if (margins[i] < k_greedy_tie) {  // later tokens follow another prefix: nothing more to compare
        ++near_ties;
        std::printf("  near-tie reported: %s greedy step %zu margin %.3g; compared %zu tokens\n", label.c_str(), i,
                    margins[i], i);
      } else {
        ADD_FAILURE() << label << ": greedy token " << i << " is " << out.output_ids[i] << ", transformers "
                      << ref_greedy[i] << " (margin " << margins[i] << ")";
      }
      break;
    }
    test::expect_routes_equal(sink.routes, p.at("routes"), 0, prompt.size(), label + " prompt", &near_ties, k_route_tie);
    // Generated token i (i < 31) is fed back in decode pass i + 1; compare while the tokens agree.
    const size_t fed_back = std::min(same, ref_greedy.size() - 1);
    test::expect_routes_equal(sink.routes, p.at("decode_routes"), prompt.size(), fed_back, label + " generated",
                              &near_ties, k_route_tie);
  }
  RecordProperty("near_ties", near_ties);
  std::printf("default model: %d near-ties reported\n", near_ties);
}

Json first_json_line(const std::string& output) {
  size_t start = 0;
  while (start < output.size()) {
    const size_t end = std::min(output.find('\n', start), output.size());
    if (output[start] == '{') return Json::parse(output.substr(start, end - start));
    start = end + 1;
  }
  ADD_FAILURE() << "no JSON line in: " << output;
  return Json::object({{"prompt_ids", Json::array()}, {"output_ids", Json::array()}});
}

// The CLI with no model named runs the shipped model: same ids as naming it.
TEST(DefaultModel, GenerateUsesItWhenNoModelIsNamed) {
  const std::string args = " --prompt \"Janet has 16 eggs. She eats 3. How many are left?\" --max-tokens 6 --json";
  const auto unnamed = test::run_moescope("generate" + args);
  ASSERT_EQ(unnamed.exit_code, 0) << unnamed.output;
  const auto named = test::run_moescope("generate " + model_dir().string() + args);
  ASSERT_EQ(named.exit_code, 0) << named.output;
  const Json a = first_json_line(unnamed.output);
  const Json b = first_json_line(named.output);
  EXPECT_EQ(a.at("prompt_ids"), b.at("prompt_ids"));
  EXPECT_EQ(a.at("output_ids"), b.at("output_ids"));
  EXPECT_EQ(a.at("prompt_ids").get<std::vector<int32_t>>(),
            model().tokenizer->encode("Janet has 16 eggs. She eats 3. How many are left?"));
}

}  // namespace
}  // namespace moescope
