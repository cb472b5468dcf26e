// Model loading on real files: safetensors (single file and sharded), ModelWeights shape checks, every
// kind of bad input with an error that names the file and the tensor, and the CLI end to end.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "model/checkpoint_writer.h"
#include "model/config.h"
#include "model/make_model.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tensor/dtype.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed when the test ends.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    const std::string test = info ? std::string(info->test_suite_name()) + "_" + info->name() : "global";
    path_ = fs::temp_directory_path() /
            ("moescope_" + test + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot read " << path;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// A safetensors file by hand: little-endian u64 header length, header JSON, data bytes.
void write_raw_safetensors(const fs::path& path, const std::string& header, const std::string& data) {
  const uint64_t len = header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &len, 8);
  write_bytes(path, bytes + header + data);
}

uint64_t header_length(const std::string& file_bytes) {
  uint64_t len = 0;
  std::memcpy(&len, file_bytes.data(), 8);
  return len;
}

// One tensor as raw bytes, for rewriting a checkpoint tensor by tensor.
struct RawTensor {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  std::string bytes;
};

std::vector<RawTensor> read_raw_tensors(const fs::path& path) {
  const SafetensorsFile file(path);
  std::vector<RawTensor> out;
  for (const auto& [name, t] : file.tensors())
    out.push_back({name, std::string(dtype_name(t.dtype)), t.shape,
                   std::string(static_cast<const char*>(t.data), t.nbytes())});
  return out;
}

// Writes tensors back to back, with offsets that agree with their byte lengths.
void write_raw_tensors(const fs::path& path, const std::vector<RawTensor>& tensors) {
  Json header = Json::object();
  std::string data;
  for (const RawTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  write_raw_safetensors(path, header.dump(), data);
}

RawTensor* find_tensor(std::vector<RawTensor>& tensors, const std::string& name) {
  for (RawTensor& t : tensors)
    if (t.name == name) return &t;
  ADD_FAILURE() << "no tensor " << name;
  return nullptr;
}

// write_safetensors spec that copies `src`'s values (widened to f32) and stores them as `dtype`.
TensorSpec copy_spec(const std::string& name, const TensorView& src, DType dtype) {
  return {name, src.shape, dtype, [src](float* out, int64_t first, int64_t count) {
            const char* base = static_cast<const char*>(src.data) + static_cast<size_t>(first) * dtype_size(src.dtype);
            to_f32(src.dtype, base, out, static_cast<size_t>(count));
          }};
}

void write_tiny(const fs::path& dir, const std::string& arch = "qwen2_moe", uint64_t seed = 1) {
  write_random_checkpoint(dir, make_model_config(arch, "tiny"), seed);
}

std::string expect_load_error(const fs::path& dir, std::initializer_list<std::string> needles) {
  try {
    (void)ModelWeights::load(dir);
    ADD_FAILURE() << "expected moescope::Error loading " << dir;
    return {};
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& needle : needles)
      EXPECT_NE(message.find(needle), std::string::npos) << "\"" << message << "\" does not mention \"" << needle << "\"";
    return message;
  }
}

// Address ranges where this process maps `path` (from /proc/self/maps).
std::vector<std::pair<uintptr_t, uintptr_t>> mapped_ranges(const fs::path& path) {
  const std::string target = fs::canonical(path).string();
  std::ifstream maps("/proc/self/maps");
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::string line;
  while (std::getline(maps, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos || line.substr(slash) != target) continue;
    uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream(line) >> std::hex >> begin >> dash >> end;
    ranges.emplace_back(begin, end);
  }
  return ranges;
}

bool inside(const std::vector<std::pair<uintptr_t, uintptr_t>>& ranges, const TensorView& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data), end = begin + t.nbytes();
  for (const auto& [lo, hi] : ranges)
    if (begin >= lo && end <= hi) return true;
  return false;
}

std::string tensor_bytes(const TensorView& t) { return std::string(static_cast<const char*>(t.data), t.nbytes()); }

// ---------------------------------------------------------------------------------------------------
// Happy paths

TEST(ModelLoading, TinyQwen2MoeLoadsWithCheckedShapes) {
  TempDir dir;
  write_tiny(dir.path());
  const ModelWeights w = ModelWeights::load(dir.path());
  const ModelConfig& c = w.config;
  // The tiny preset: hidden 64, 4 layers, 4 heads (2 kv) of 16, 8 experts of 64, shared expert 128, vocab 512.
  ASSERT_EQ(c.hidden_size, 64);
  ASSERT_EQ(c.num_hidden_layers, 4);
  ASSERT_EQ(c.num_experts, 8);
  EXPECT_EQ(w.embed_tokens.shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(w.lm_head.shape, (std::vector<int64_t>{512, 64}));
  EXPECT_NE(w.lm_head.data, w.embed_tokens.data);  // not tied
  EXPECT_EQ(w.norm.shape, (std::vector<int64_t>{64}));
  ASSERT_EQ(w.layers.size(), 4u);
  for (const LayerWeights& l : w.layers) {
    EXPECT_EQ(l.input_layernorm.shape, (std::vector<int64_t>{64}));
    EXPECT_EQ(l.q_proj.shape, (std::vector<int64_t>{64, 64}));
    EXPECT_EQ(l.k_proj.shape, (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(l.v_proj.shape, (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(l.o_proj.shape, (std::vector<int64_t>{64, 64}));
    EXPECT_EQ(l.q_bias.shape, (std::vector<int64_t>{64}));
    EXPECT_EQ(l.k_bias.shape, (std::vector<int64_t>{32}));
    EXPECT_TRUE(l.q_norm.empty());
    EXPECT_TRUE(l.is_moe);
    EXPECT_EQ(l.router.shape, (std::vector<int64_t>{8, 64}));
    ASSERT_EQ(l.experts.size(), 8u);
    for (const MlpWeights& e : l.experts) {
      EXPECT_EQ(e.gate_proj.shape, (std::vector<int64_t>{64, 64}));
      EXPECT_EQ(e.down_proj.shape, (std::vector<int64_t>{64, 64}));
    }
    EXPECT_EQ(l.shared_expert.gate_proj.shape, (std::vector<int64_t>{128, 64}));
    EXPECT_EQ(l.shared_expert.down_proj.shape, (std::vector<int64_t>{64, 128}));
    EXPECT_EQ(l.shared_expert_gate.shape, (std::vector<int64_t>{1, 64}));
    EXPECT_TRUE(l.mlp.gate_proj.empty());
  }
  for (const auto& [name, t] : w.store.tensors()) {
    EXPECT_EQ(t.dtype, DType::BF16) << name;
    EXPECT_EQ(t.name, name);
  }
  EXPECT_EQ(w.layers[2].experts[5].up_proj.name, "model.layers.2.mlp.experts.5.up_proj.weight");
}

TEST(ModelLoading, ViewsPointIntoTheFileMapping) {
  TempDir dir;
  write_tiny(dir.path());
  const fs::path file = dir / "model.safetensors";
  const std::string bytes = read_bytes(file);
  const uint64_t header_len = header_length(bytes);
  const Json header = Json::parse(bytes.substr(8, header_len));

  const ModelWeights w = ModelWeights::load(dir.path());
  const auto ranges = mapped_ranges(file);
  ASSERT_FALSE(ranges.empty()) << file << " is not mapped";
  const char* data_start = static_cast<const char*>(w.embed_tokens.data) -
                           header[w.embed_tokens.name]["data_offsets"][0].get<uint64_t>();
  for (const auto& [name, t] : w.store.tensors()) {
    EXPECT_TRUE(inside(ranges, t)) << name << " does not point into the mapping of " << file;
    const uint64_t begin = header[name]["data_offsets"][0].get<uint64_t>();
    // Same layout as the file: the view is the mapped bytes, not a copy.
    EXPECT_EQ(static_cast<const char*>(t.data), data_start + begin) << name;
    EXPECT_EQ(0, std::memcmp(t.data, bytes.data() + 8 + header_len + begin, t.nbytes())) << name;
  }
  EXPECT_EQ(w.total_bytes(), bytes.size() - 8 - header_len);

  const ModelWeights again = ModelWeights::load(dir.path());
  ASSERT_EQ(again.store.tensors().size(), w.store.tensors().size());
  for (const auto& [name, t] : w.store.tensors()) EXPECT_EQ(tensor_bytes(again.store.get(name)), tensor_bytes(t)) << name;
}

TEST(ModelLoading, EveryArchitectureLoads) {
  for (const char* arch : {"qwen2_moe", "mixtral", "olmoe", "qwen3_moe"}) {
    SCOPED_TRACE(arch);
    TempDir dir;
    write_tiny(dir.path(), arch, 3);
    const ModelWeights w = ModelWeights::load(dir.path());
    const std::string bytes = read_bytes(dir / "model.safetensors");
    EXPECT_EQ(w.total_bytes(), bytes.size() - 8 - header_length(bytes));
    for (const LayerWeights& l : w.layers) {
      EXPECT_EQ(l.experts.size(), 8u);
      EXPECT_EQ(l.shared_expert_gate.empty(), std::string(arch) != "qwen2_moe");
      EXPECT_EQ(l.q_bias.empty(), std::string(arch) != "qwen2_moe");
    }
    if (std::string(arch) == "mixtral") {
      EXPECT_EQ(w.layers[0].experts[0].gate_proj.name, "model.layers.0.block_sparse_moe.experts.0.w1.weight");
    } else if (std::string(arch) == "olmoe") {
      EXPECT_EQ(w.layers[0].q_norm.shape, (std::vector<int64_t>{64}));  // Full: over q_size
    } else if (std::string(arch) == "qwen3_moe") {
      EXPECT_EQ(w.layers[0].q_norm.shape, (std::vector<int64_t>{16}));  // PerHead: over head_dim
    }
  }
}

TEST(ModelLoading, ShardedCheckpointEqualsSingleFile) {
  TempDir single, sharded;
  write_tiny(single.path());
  const ModelWeights reference = ModelWeights::load(single.path());
  fs::copy_file(single / "config.json", sharded / "config.json");

  std::vector<TensorSpec> shard[2];
  Json weight_map = Json::object();
  size_t i = 0;
  for (const auto& [name, t] : reference.store.tensors()) {
    const int s = i++ < reference.store.tensors().size() / 2 ? 0 : 1;
    shard[s].push_back(copy_spec(name, t, DType::BF16));
    weight_map[name] = fmt::format("model-{:05}-of-00002.safetensors", s + 1);
  }
  write_safetensors(sharded / "model-00001-of-00002.safetensors", shard[0]);
  write_safetensors(sharded / "model-00002-of-00002.safetensors", shard[1]);
  const Json index = {{"metadata", {{"total_size", reference.total_bytes()}}}, {"weight_map", weight_map}};
  write_text_file(sharded / "model.safetensors.index.json", index.dump(2));

  const ModelWeights w = ModelWeights::load(sharded.path());
  ASSERT_EQ(w.store.tensors().size(), reference.store.tensors().size());
  for (const auto& [name, t] : reference.store.tensors()) {
    ASSERT_TRUE(w.store.contains(name)) << name;
    const TensorView& got = w.store.get(name);
    EXPECT_EQ(got.dtype, DType::BF16) << name;
    EXPECT_EQ(got.shape, t.shape) << name;
    EXPECT_EQ(tensor_bytes(got), tensor_bytes(t)) << name;
    EXPECT_EQ(fs::path(w.store.file_of(name)).filename().string(), weight_map[name].get<std::string>()) << name;
  }
  EXPECT_EQ(w.total_bytes(), reference.total_bytes());
  EXPECT_TRUE(inside(mapped_ranges(sharded / "model-00001-of-00002.safetensors"), w.embed_tokens) ||
              inside(mapped_ranges(sharded / "model-00002-of-00002.safetensors"), w.embed_tokens));
}

void check_rewritten_dtype(DType dtype) {
  TempDir single, rewritten;
  write_tiny(single.path());
  const ModelWeights reference = ModelWeights::load(single.path());
  fs::copy_file(single / "config.json", rewritten / "config.json");
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : reference.store.tensors()) specs.push_back(copy_spec(name, t, dtype));
  write_safetensors(rewritten / "model.safetensors", specs);

  const ModelWeights w = ModelWeights::load(rewritten.path());
  EXPECT_EQ(w.total_bytes(), reference.total_bytes() * dtype_size(dtype) / 2);
  for (const auto& [name, t] : reference.store.tensors()) {
    const TensorView& got = w.store.get(name);
    ASSERT_EQ(got.dtype, dtype) << name;
    ASSERT_EQ(got.shape, t.shape) << name;
    std::vector<float> want(static_cast<size_t>(t.numel())), have(want.size());
    to_f32(t.dtype, t.data, want.data(), want.size());
    to_f32(got.dtype, got.data, have.data(), have.size());
    for (size_t k = 0; k < want.size(); ++k) {
      // bf16 values are exact in f32; in f16 they round to f16's nearest.
      const float expected = dtype == DType::F32 ? want[k] : f16_to_f32(f32_to_f16(want[k]));
      ASSERT_EQ(have[k], expected) << name << "[" << k << "]";
    }
  }
}

TEST(ModelLoading, F32CheckpointLoads) { check_rewritten_dtype(DType::F32); }
TEST(ModelLoading, F16CheckpointLoads) { check_rewritten_dtype(DType::F16); }

// ---------------------------------------------------------------------------------------------------
// Bad model directories

TEST(ModelLoadingErrors, MissingModelDirectory) {
  TempDir dir;
  const fs::path missing = dir / "no_such_model";
  expect_load_error(missing, {missing.string(), "does not exist"});
}

TEST(ModelLoadingErrors, MissingConfigJson) {
  TempDir dir;
  write_tiny(dir.path());
  fs::remove(dir / "config.json");
  expect_load_error(dir.path(), {dir.path().string(), "config.json"});
}

TEST(ModelLoadingErrors, NoSafetensors) {
  TempDir dir;
  write_tiny(dir.path());
  fs::remove(dir / "model.safetensors");
  expect_load_error(dir.path(), {dir.path().string(), "model.safetensors", "model.safetensors.index.json"});
}

TEST(ModelLoadingErrors, UnknownArchitectureInConfig) {
  TempDir dir;
  write_tiny(dir.path());
  Json config = read_json_file(dir / "config.json");
  config["architectures"] = {"GptOssForCausalLM"};
  write_text_file(dir / "config.json", config.dump());
  expect_load_error(dir.path(), {(dir / "config.json").string(), "GptOssForCausalLM", "Qwen2MoeForCausalLM"});
}

TEST(ModelLoadingErrors, MalformedConfigJson) {
  TempDir dir;
  write_tiny(dir.path());
  write_text_file(dir / "config.json", "{\"architectures\": [\"Qwen2MoeForCausalLM\"],");
  expect_load_error(dir.path(), {(dir / "config.json").string()});
}

// Drops one expert's down_proj: the file is valid safetensors, the model is incomplete.
void drop_expert_down_proj(const TempDir& dir) {
  write_tiny(dir.path());
  auto tensors = read_raw_tensors(dir / "model.safetensors");
  std::erase_if(tensors, [](const RawTensor& t) { return t.name == "model.layers.1.mlp.experts.3.down_proj.weight"; });
  write_raw_tensors(dir / "model.safetensors", tensors);
}

TEST(ModelLoadingErrors, MissingTensor) {
  TempDir dir;
  drop_expert_down_proj(dir);
  expect_load_error(dir.path(), {(dir / "model.safetensors").string(), "model.layers.1.mlp.experts.3.down_proj.weight",
                                 "missing"});
}

TEST(ModelLoadingErrors, WrongShape) {
  TempDir dir;
  write_tiny(dir.path());
  auto tensors = read_raw_tensors(dir / "model.safetensors");
  RawTensor* router = find_tensor(tensors, "model.layers.2.mlp.gate.weight");
  ASSERT_NE(router, nullptr);
  ASSERT_EQ(router->shape, (std::vector<int64_t>{8, 64}));
  router->shape = {8, 63};
  router->bytes.resize(8 * 63 * 2);
  write_raw_tensors(dir / "model.safetensors", tensors);
  expect_load_error(dir.path(), {(dir / "model.safetensors").string(), "model.layers.2.mlp.gate.weight", "[8, 63]",
                                 "[8, 64]"});
}

TEST(ModelLoadingErrors, UnsupportedDtype) {
  for (const auto& [dtype, width] : std::vector<std::pair<std::string, size_t>>{{"I8", 1}, {"F64", 8}}) {
    SCOPED_TRACE(dtype);
    TempDir dir;
    write_tiny(dir.path());
    auto tensors = read_raw_tensors(dir / "model.safetensors");
    RawTensor* norm = find_tensor(tensors, "model.norm.weight");
    ASSERT_NE(norm, nullptr);
    norm->dtype = dtype;
    norm->bytes.assign(64 * width, '\0');  // consistent length, so only the dtype is wrong
    write_raw_tensors(dir / "model.safetensors", tensors);
    expect_load_error(dir.path(), {(dir / "model.safetensors").string(), "model.norm.weight", dtype, "dtype"});
  }
}

TEST(ModelLoadingErrors, TruncatedFile) {
  TempDir dir;
  write_tiny(dir.path());
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 10);
  // write_safetensors writes lm_head last, so it is the tensor that runs past the end.
  expect_load_error(dir.path(), {file.string(), "lm_head.weight", "truncated"});
}

// A model directory with a valid tiny config.json and a hand-written model.safetensors.
fs::path bad_file(const TempDir& dir, const std::string& header, const std::string& data) {
  write_text_file(dir / "config.json", make_model_config("qwen2_moe", "tiny").dump());
  write_raw_safetensors(dir / "model.safetensors", header, data);
  return dir / "model.safetensors";
}

TEST(ModelLoadingErrors, HeaderLengthBeyondFile) {
  TempDir dir;
  const fs::path file = dir / "model.safetensors";
  write_text_file(dir / "config.json", make_model_config("qwen2_moe", "tiny").dump());
  std::string bytes(8, '\0');
  const uint64_t len = 1000000;
  std::memcpy(bytes.data(), &len, 8);
  write_bytes(file, bytes + "{}");
  expect_load_error(dir.path(), {file.string(), "header length 1000000", "10 bytes"});
}

TEST(ModelLoadingErrors, HugeHeaderLengthDoesNotOverflow) {
  TempDir dir;
  const fs::path file = dir / "model.safetensors";
  write_text_file(dir / "config.json", make_model_config("qwen2_moe", "tiny").dump());
  std::string bytes(8, '\xff');
  write_bytes(file, bytes + "{}");
  expect_load_error(dir.path(), {file.string(), "header length"});
}

TEST(ModelLoadingErrors, MalformedHeaderJson) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]})", "abcd");
  expect_load_error(dir.path(), {file.string(), "malformed header JSON"});
}

TEST(ModelLoadingErrors, HeaderNotAnObject) {
  TempDir dir;
  const fs::path file = bad_file(dir, "[1, 2, 3]", "");
  expect_load_error(dir.path(), {file.string(), "not a JSON object"});
}

TEST(ModelLoadingErrors, HeaderEntryMissingFields) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"x.weight": {"dtype": "BF16", "shape": [2]}})", "abcd");
  expect_load_error(dir.path(), {file.string(), "x.weight", "data_offsets"});
}

TEST(ModelLoadingErrors, NegativeDimension) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"x.weight": {"dtype": "BF16", "shape": [-2], "data_offsets": [0, 4]}})", "abcd");
  expect_load_error(dir.path(), {file.string(), "x.weight", "shape"});
}

TEST(ModelLoadingErrors, OverlappingOffsets) {
  TempDir dir;
  const fs::path file = bad_file(dir,
                                 R"({"__metadata__": {"format": "pt"},
                                     "a.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                                     "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [4, 12]}})",
                                 std::string(12, '\0'));
  expect_load_error(dir.path(), {file.string(), "a.weight", "b.weight", "overlap"});
}

TEST(ModelLoadingErrors, OffsetsOutOfRange) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                                 std::string(16, '\0'));
  expect_load_error(dir.path(), {file.string(), "a.weight", "[8, 24]", "out of range"});
}

TEST(ModelLoadingErrors, OffsetsReversed) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"a.weight": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})",
                                 std::string(16, '\0'));
  expect_load_error(dir.path(), {file.string(), "a.weight", "out of range"});
}

TEST(ModelLoadingErrors, OffsetsDisagreeWithShape) {
  TempDir dir;
  const fs::path file = bad_file(dir, R"({"a.weight": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 16]}})",
                                 std::string(24, '\0'));
  expect_load_error(dir.path(), {file.string(), "a.weight", "16 bytes", "needs 24"});
}

TEST(ModelLoadingErrors, FileShorterThanEightBytes) {
  TempDir dir;
  const fs::path file = dir / "model.safetensors";
  write_text_file(dir / "config.json", make_model_config("qwen2_moe", "tiny").dump());
  write_bytes(file, std::string("\x02\0\0", 3));
  expect_load_error(dir.path(), {file.string(), "truncated", "3 bytes"});
  write_bytes(file, "");
  expect_load_error(dir.path(), {file.string(), "truncated", "0 bytes"});
}

// A two-shard checkpoint of the tiny model: every tensor in shard 1 except lm_head.weight, which is in
// shard 2. Returns the weight_map.
Json write_two_shards(const TempDir& dir) {
  write_tiny(dir.path());
  auto tensors = read_raw_tensors(dir / "model.safetensors");
  fs::remove(dir / "model.safetensors");
  Json weight_map = Json::object();
  std::vector<RawTensor> first, second;
  for (RawTensor& t : tensors) {
    const bool last = t.name == "lm_head.weight";
    weight_map[t.name] = last ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
    (last ? second : first).push_back(std::move(t));
  }
  write_raw_tensors(dir / "model-00001-of-00002.safetensors", first);
  write_raw_tensors(dir / "model-00002-of-00002.safetensors", second);
  write_text_file(dir / "model.safetensors.index.json",
                  Json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump());
  return weight_map;
}

TEST(ModelLoading, TwoShardsLoad) {
  TempDir dir;
  write_two_shards(dir);
  const ModelWeights w = ModelWeights::load(dir.path());
  EXPECT_EQ(fs::path(w.store.file_of("lm_head.weight")).filename().string(), "model-00002-of-00002.safetensors");
}

TEST(ModelLoadingErrors, IndexNamesMissingShard) {
  TempDir dir;
  write_two_shards(dir);
  fs::remove(dir / "model-00002-of-00002.safetensors");
  expect_load_error(dir.path(), {(dir / "model.safetensors.index.json").string(), "model-00002-of-00002.safetensors",
                                 "lm_head.weight", "does not exist"});
}

TEST(ModelLoadingErrors, IndexNamesTensorAbsentFromShard) {
  TempDir dir;
  Json weight_map = write_two_shards(dir);
  weight_map["model.layers.0.mlp.experts.9.up_proj.weight"] = "model-00002-of-00002.safetensors";
  write_text_file(dir / "model.safetensors.index.json", Json{{"weight_map", weight_map}}.dump());
  expect_load_error(dir.path(), {(dir / "model-00002-of-00002.safetensors").string(),
                                 "model.layers.0.mlp.experts.9.up_proj.weight", "model.safetensors.index.json"});
}

TEST(ModelLoadingErrors, IndexMissingTensorNamesTheIndex) {
  TempDir dir;
  Json weight_map = write_two_shards(dir);
  weight_map.erase("model.layers.3.mlp.shared_expert_gate.weight");
  write_text_file(dir / "model.safetensors.index.json", Json{{"weight_map", weight_map}}.dump());
  expect_load_error(dir.path(), {(dir / "model.safetensors.index.json").string(),
                                 "model.layers.3.mlp.shared_expert_gate.weight", "missing"});
}

TEST(ModelLoadingErrors, IndexWithoutWeightMap) {
  TempDir dir;
  write_two_shards(dir);
  write_text_file(dir / "model.safetensors.index.json", R"({"metadata": {}})");
  expect_load_error(dir.path(), {(dir / "model.safetensors.index.json").string(), "weight_map"});
}

TEST(ModelLoadingErrors, BadShardNamesTheShard) {
  TempDir dir;
  write_two_shards(dir);
  const fs::path shard = dir / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 1);
  expect_load_error(dir.path(), {shard.string(), "lm_head.weight"});
}

// ---------------------------------------------------------------------------------------------------
// The CLI

struct CommandResult {
  int status = -1;     // exit status, or -1 when it did not exit normally
  std::string output;  // stdout (and stderr when the command redirects it)
};

CommandResult run_command(const std::string& command) {
  CommandResult r;
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) {
    ADD_FAILURE() << "popen failed: " << command;
    return r;
  }
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) r.output.append(buffer, n);
  const int wait_status = ::pclose(pipe);
  if (WIFEXITED(wait_status)) r.status = WEXITSTATUS(wait_status);
  return r;
}

// GCC 12 warns falsely (-Wrestrict) on "'" + std::string; fmt sidesteps it.
std::string quote(const fs::path& path) { return fmt::format("'{}'", path.string()); }

std::string moescope_command(const std::string& args) { return fmt::format("'{}' {}", MOESCOPE_BINARY, args); }

// The CLI fails with one line, "error: ...", that contains every needle.
void expect_cli_error(const fs::path& model_dir, std::initializer_list<std::string> needles) {
  const CommandResult r = run_command(moescope_command("generate " + quote(model_dir) + " --prompt-ids 1,2,3 2>&1"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, -1) << "did not exit normally: " << r.output;
  EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  ASSERT_FALSE(r.output.empty());
  EXPECT_EQ(r.output.back(), '\n') << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  for (const std::string& needle : needles)
    EXPECT_NE(r.output.find(needle), std::string::npos) << "\"" << r.output << "\" does not mention \"" << needle << "\"";
}

TEST(ModelLoadingCli, MissingDirectory) {
  TempDir dir;
  expect_cli_error(dir / "absent", {(dir / "absent").string()});
}

TEST(ModelLoadingCli, UnknownKvCacheDtypeIsRejected) {
  const CommandResult r = run_command(moescope_command("generate --prompt-ids 1,2 --kv-cache-dtype fp8 2>&1"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--kv-cache-dtype"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("fp8"), std::string::npos) << r.output;
}

TEST(ModelLoadingCli, UnknownMatmulPrecisionIsRejected) {
  const CommandResult r = run_command(moescope_command("generate --prompt-ids 1,2 --matmul-precision highest 2>&1"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--matmul-precision"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("highest"), std::string::npos) << r.output;
}

TEST(ModelLoadingCli, MissingTensor) {
  TempDir dir;
  drop_expert_down_proj(dir);
  expect_cli_error(dir.path(), {(dir / "model.safetensors").string(), "model.layers.1.mlp.experts.3.down_proj.weight"});
}

TEST(ModelLoadingCli, TruncatedFile) {
  TempDir dir;
  write_tiny(dir.path());
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 10);
  expect_cli_error(dir.path(), {file.string(), "lm_head.weight"});
}

TEST(ModelLoadingCli, UnknownArchitecture) {
  TempDir dir;
  write_tiny(dir.path());
  Json config = read_json_file(dir / "config.json");
  config["architectures"] = {"GptOssForCausalLM"};
  write_text_file(dir / "config.json", config.dump());
  expect_cli_error(dir.path(), {(dir / "config.json").string(), "GptOssForCausalLM"});
}

CommandResult make_model(const std::string& arch, uint64_t seed, const fs::path& out) {
  return run_command(moescope_command(fmt::format("make-model --arch {} --preset tiny --seed {} --out {} 2>&1", arch,
                                                  seed, quote(out))));
}

std::vector<int> generate_ids(const fs::path& model_dir) {
  const CommandResult r = run_command(moescope_command(
      "generate " + quote(model_dir) + " --prompt-ids 1,2,3 --max-tokens 4 --json --ignore-eos 2>/dev/null"));
  EXPECT_EQ(r.status, 0) << r.output;
  Json j;
  try {
    j = Json::parse(r.output);
  } catch (const Json::exception& e) {
    ADD_FAILURE() << "not JSON (" << e.what() << "): " << r.output;
    return {};
  }
  EXPECT_EQ(j.value("prompt_ids", Json()), Json({1, 2, 3})) << r.output;
  if (!j.contains("output_ids") || !j["output_ids"].is_array()) {
    ADD_FAILURE() << "no output_ids: " << r.output;
    return {};
  }
  return j["output_ids"].get<std::vector<int>>();
}

TEST(ModelLoadingCli, MakeModelThenGenerateForEveryArchitecture) {
  for (const char* arch : {"qwen2_moe", "mixtral", "olmoe", "qwen3_moe"}) {
    SCOPED_TRACE(arch);
    TempDir dir;
    const CommandResult made = make_model(arch, 11, dir / "model");
    ASSERT_EQ(made.status, 0) << made.output;
    const std::vector<int> ids = generate_ids(dir / "model");
    ASSERT_EQ(ids.size(), 4u);
    for (int id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 512);  // the tiny vocabulary
    }
    EXPECT_EQ(generate_ids(dir / "model"), ids) << "greedy generation is not deterministic";
  }
}

TEST(ModelLoadingCli, MakeModelIsDeterministicPerSeed) {
  TempDir dir;
  ASSERT_EQ(make_model("qwen3_moe", 5, dir / "a").status, 0);
  ASSERT_EQ(make_model("qwen3_moe", 5, dir / "b").status, 0);
  ASSERT_EQ(make_model("qwen3_moe", 6, dir / "c").status, 0);
  const std::string a = read_bytes(dir / "a" / "model.safetensors");
  const std::string b = read_bytes(dir / "b" / "model.safetensors");
  const std::string c = read_bytes(dir / "c" / "model.safetensors");
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the same seed wrote different bytes";
  EXPECT_EQ(a.size(), c.size());
  EXPECT_FALSE(a == c) << "a different seed wrote the same bytes";
  // Same header (names, shapes, offsets), different values.
  EXPECT_EQ(a.substr(0, 8 + header_length(a)), c.substr(0, 8 + header_length(c)));
  EXPECT_EQ(read_bytes(dir / "a" / "config.json"), read_bytes(dir / "c" / "config.json"));
}

}  // namespace
}  // namespace moescope
