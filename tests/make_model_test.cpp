// make-model writes checkpoints that Hugging Face transformers loads and runs to the same tokens as
// moescope, and a tokenizer that the Hugging Face `tokenizers` library encodes to the same ids.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

TEST(MakeModel, GreedyTokensEqualTransformersOnEveryArchitecture) {
  const Json golden = read_json_file(test::source_dir() / "tests/fixtures/make_model_hf_greedy.json");
  ASSERT_EQ(golden["cases"].size(), 4u);
  for (const Json& c : golden["cases"]) {
    const std::string arch = c["arch"].get<std::string>();
    SCOPED_TRACE(arch);
    test::TempDir dir;
    const auto made = test::run_moescope("make-model --arch " + arch + " --preset tiny --seed 7 --out " + (dir / "m").string());
    ASSERT_EQ(made.exit_code, 0) << made.output;
    const LoadedModel m = load_model(dir / "m");
    cpu::CpuBackend backend(m.weights);
    Engine engine(backend, EngineOptions{});
    const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    const auto expected = c["output_ids"].get<std::vector<int32_t>>();
    engine.add_request({"r0", prompt, SamplingParams{}, static_cast<int>(expected.size()), true});
    const auto out = engine.run_to_completion();
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].output_ids, expected);
  }
}

TEST(MakeModel, ToyTokenizerEncodesLikeHuggingFaceTokenizers) {
  const Json golden = read_json_file(test::source_dir() / "tests/fixtures/tokenizer/toy_golden.json");
  test::TempDir dir;
  const auto made = test::run_moescope("make-model --arch qwen2_moe --preset tiny --seed 7 --out " + (dir / "m").string());
  ASSERT_EQ(made.exit_code, 0) << made.output;
  const Tokenizer tokenizer = Tokenizer::from_file(dir / "m" / "tokenizer.json");
  int mismatches = 0;
  for (const Json& c : golden["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto ids = tokenizer.encode(text);
    if (ids != c["ids"].get<std::vector<int32_t>>() && ++mismatches <= 5)
      ADD_FAILURE() << "ids differ for " << Json(text).dump()
                    << " (if the built-in tokenizer changed on purpose, regenerate toy_golden.json)";
    EXPECT_EQ(tokenizer.decode(ids), c["decoded"].get<std::string>()) << Json(text).dump();
  }
  EXPECT_EQ(mismatches, 0) << "of " << golden["cases"].size() << " strings";
  EXPECT_GE(golden["cases"].size(), 100u);
}

TEST(MakeModel, SameSeedSameBytesOtherSeedOtherBytes) {
  test::TempDir dir;
  for (const char* name : {"a", "b", "c"}) {
    const std::string seed = std::string(name) == "c" ? "2" : "1";
    ASSERT_EQ(test::run_moescope("make-model --arch olmoe --preset tiny --seed " + seed + " --out " + (dir / name).string()).exit_code, 0);
  }
  auto bytes = [&](const char* name) { return read_text_file(dir / name / "model.safetensors"); };
  EXPECT_EQ(bytes("a"), bytes("b"));
  EXPECT_NE(bytes("a"), bytes("c"));
}

}  // namespace
}  // namespace moescope
