#pragma once
// Shared test helpers: temporary directories, running the moescope binary, and a routing sink that
// keeps every route it sees.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "routing/routing_sink.h"
#include "util/json.h"

namespace moescope::test {

inline std::filesystem::path source_dir() { return MOESCOPE_SOURCE_DIR; }
// The moescope binary the CLI tests run: this build's, or MOESCOPE_TEST_BINARY (the sanitizer builds use
// the main build's binary and sanitize only the code linked into the test).
inline std::filesystem::path binary() {
  const char* other = std::getenv("MOESCOPE_TEST_BINARY");
  return other != nullptr && *other != '\0' ? std::filesystem::path(other) : std::filesystem::path(MOESCOPE_BINARY);
}

// A fresh directory under the system temp dir, removed when the object goes out of scope.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("moescope-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command line, capturing its output.
inline CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) result.output.append(buffer, n);
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// Runs `moescope ARGS`.
inline CommandResult run_moescope(const std::string& args) { return run_command(binary().string() + " " + args); }

// The reference fixtures that transformers made (tests/fixtures/reference/<case>/, tools/README.md).
inline std::filesystem::path reference_fixtures_dir() { return source_dir() / "tests" / "fixtures" / "reference"; }

// The cases there, sorted; "missing_fixtures" when there are none, so a suite fails rather than being empty.
inline std::vector<std::string> reference_case_names() {
  std::vector<std::string> names;
  if (std::filesystem::is_directory(reference_fixtures_dir()))
    for (const auto& entry : std::filesystem::directory_iterator(reference_fixtures_dir()))
      if (std::filesystem::exists(entry.path() / "reference.json")) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  if (names.empty()) names.push_back("missing_fixtures");
  return names;
}

// A tiny random Qwen2-MoE written by `moescope make-model` into dir: weights and the small byte-level
// tokenizer make-model writes beside them (the server needs a tokenizer).
inline void make_tiny_model(const std::filesystem::path& dir, int seed = 3) {
  const auto made = run_moescope("make-model --arch qwen2_moe --preset tiny --seed " + std::to_string(seed) + " --out " + dir.string());
  ASSERT_EQ(made.exit_code, 0) << made.output;
}

// A suite whose tests share one tiny random-weight model (make_tiny_model), written once per suite.
class TinyModelSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    make_tiny_model(dir_->path());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static inline TempDir* dir_ = nullptr;
};

// Keeps every (layer -> [tokens][k]) route of the passes it sees, in pass order.
class CaptureSink : public RoutingSink {
 public:
  struct LayerRoutes {
    std::vector<std::vector<int32_t>> ids;     // [tokens][top_k]
    std::vector<std::vector<float>> weights;   // [tokens][top_k]
  };
  void begin_pass(const PassInfo& pass) override { passes.push_back(pass); }
  void on_layer(int layer, int num_tokens, int top_k, std::span<const int32_t> topk_ids,
                std::span<const float> topk_weights) override {
    LayerRoutes& r = routes[layer];
    for (int t = 0; t < num_tokens; ++t) {
      r.ids.emplace_back(topk_ids.begin() + t * top_k, topk_ids.begin() + (t + 1) * top_k);
      r.weights.emplace_back(topk_weights.begin() + t * top_k, topk_weights.begin() + (t + 1) * top_k);
    }
  }
  void end_pass(const PassInfo&, double latency) override { latencies.push_back(latency); }

  std::map<int, LayerRoutes> routes;
  std::vector<PassInfo> passes;
  std::vector<double> latencies;
};

// Golden routes (tests/fixtures/reference/*/reference.json, "routes" of one prompt) against recorded
// ones: ids equal and weights within k_weight_tol; a top-k margin below k_route_tie in the reference is a
// near-tie, printed and counted, not failed.
constexpr double k_weight_tol = 1e-5;  // routing weights, absolute
constexpr double k_route_tie = 1e-5;

// Compares one prompt's routes with the reference; near-ties are printed and counted, not failed.
// tie_margin: a reference margin below it makes differing ids a near-tie (default k_route_tie).
inline void expect_routes_equal(const std::map<int, CaptureSink::LayerRoutes>& routes, const Json& ref_routes, size_t token_offset, size_t num_tokens,
                         const std::string& label, int* near_ties, double tie_margin = k_route_tie) {
  double max_weight_diff = 0.0;
  for (const Json& layer_ref : ref_routes) {
    const int layer = layer_ref["layer"].get<int>();
    ASSERT_TRUE(routes.count(layer)) << label << ": no routes recorded for MoE layer " << layer;
    const auto& got = routes.at(layer);
    ASSERT_GE(got.ids.size(), token_offset + num_tokens) << label << " layer " << layer;
    for (size_t t = 0; t < num_tokens; ++t) {
      const auto ref_ids = layer_ref["topk_ids"][t].get<std::vector<int32_t>>();
      const auto ref_weights = layer_ref["topk_weights"][t].get<std::vector<double>>();
      const double margin = layer_ref["margin"][t].get<double>();
      const auto& ids = got.ids[token_offset + t];
      const auto& weights = got.weights[token_offset + t];
      if (ids != ref_ids) {
        if (margin < tie_margin) {
          ++*near_ties;
          std::printf("  near-tie reported: %s layer %d token %zu margin %.3g (ids differ)\n", label.c_str(), layer, t, margin);
          continue;
        }
        ADD_FAILURE() << label << " layer " << layer << " token " << t << ": top-k ids differ (margin " << margin << ")";
        continue;
      }
      for (size_t j = 0; j < ids.size(); ++j) {
        const double diff = std::fabs(weights[j] - ref_weights[j]);
        max_weight_diff = std::max(max_weight_diff, diff);
        EXPECT_LE(diff, k_weight_tol) << label << " layer " << layer << " token " << t << " slot " << j;
      }
    }
  }
  std::printf("  %s: routes of %zu tokens x %zu MoE layers, max weight diff %.3g\n", label.c_str(), num_tokens,
              ref_routes.size(), max_weight_diff);
}

}  // namespace moescope::test
