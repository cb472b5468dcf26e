// `moescope serve` as users run it, driven by the official openai npm client (tests/node/) and by the
// seed document's curl lines; then stopped with SIGTERM, which must end it cleanly.
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <sstream>
#include <regex>
#include <thread>

#include "test_util.h"
#include "util/json.h"

namespace moescope {
namespace {

namespace fs = std::filesystem;

// A `moescope serve` process on a free port.
class ServeProcess {
 public:
  explicit ServeProcess(const std::string& args) : ServeProcess("", args) {}
  ServeProcess(const std::string& env, const std::string& args) : log_(tmp_ / "serve.log") {
    pid_ = ::fork();
    if (pid_ == 0) {
      const std::string cmd = env + " exec " + test::binary().string() + " serve --port 0 " + args + " >" + log_.string() + " 2>&1";
      ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    const std::regex listening(R"(at http://127\.0\.0\.1:(\d+))");
    for (int i = 0; i < 600 && port_ == 0; ++i) {  // up to a minute on a loaded machine
      std::smatch m;
      const std::string text = log();
      if (std::regex_search(text, m, listening)) port_ = std::stoi(m[1]);
      else std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~ServeProcess() {
    if (pid_ > 0 && !stopped_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  std::string log() const {
    std::ifstream in(log_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  // SIGTERM, then the exit status.
  int stop() {
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    stopped_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  test::TempDir tmp_;
  fs::path log_;
  pid_t pid_ = -1;
  int port_ = 0;
  bool stopped_ = false;
};

class ServeCommand : public test::TinyModelSuite {};

TEST_F(ServeCommand, TheOfficialOpenAiClientWorksAgainstIt) {
  const fs::path node_dir = test::source_dir() / "tests" / "node";
  ASSERT_TRUE(fs::exists(node_dir / "node_modules" / "openai" / "package.json"))
      << "the openai npm package is missing: run scripts/fetch_fixtures.sh (npm ci in tests/node)";
  ServeProcess serve(dir_->path().string() + " --served-model-name tiny --api-key test-key");
  ASSERT_GT(serve.port(), 0) << serve.log();
  const auto r = test::run_command("node " + (node_dir / "openai_client.mjs").string() + " http://127.0.0.1:" +
                                   std::to_string(serve.port()) + "/v1 test-key");
  EXPECT_EQ(r.exit_code, 0) << r.output << "\nserver log:\n" << serve.log();
  EXPECT_NE(r.output.find("\"ok\":true"), std::string::npos) << r.output;
  EXPECT_EQ(serve.stop(), 0) << serve.log();
  EXPECT_NE(serve.log().find("shut down"), std::string::npos) << serve.log();
}

TEST_F(ServeCommand, TheSeedCurlLinesWorkVerbatimAndTheAutoJsonlIsWritten) {
  test::TempDir tmp;
  const fs::path jsonl = tmp / "passes.jsonl";
  ServeProcess serve(dir_->path().string() + " --served-model-name Qwen/Qwen1.5-MoE-A2.7B --expert-distribution-jsonl " + jsonl.string());
  ASSERT_GT(serve.port(), 0) << serve.log();
  const std::string base = "http://localhost:" + std::to_string(serve.port());
  // The seed document's five steps, as written there (only the port differs).
  auto curl = [](const std::string& line) {
    const auto r = test::run_command(line);
    EXPECT_EQ(r.exit_code, 0) << line << "\n" << r.output;
    return r.output;
  };
  EXPECT_NE(curl("curl -s -X POST \"" + base + "/configure_expert_distribution?mode=per_pass\"").find("\"success\""), std::string::npos);
  EXPECT_NE(curl("curl -s -X POST \"" + base + "/start_expert_distribution\"").find("\"success\""), std::string::npos);
  const std::string completion = curl("curl -s -X POST \"" + base + "/v1/completions\" -H \"Content-Type: application/json\" -d '{\"model\": "
                                      "\"Qwen/Qwen1.5-MoE-A2.7B\", \"prompt\": \"write Hello World in python\", \"max_tokens\": 100}'");
  const Json out = Json::parse(completion);
  const int generated = out["usage"]["completion_tokens"];
  EXPECT_GT(generated, 0);
  const std::string summary = curl("curl -s -X POST \"" + base + "/dump_expert_distribution?summary_only=true\" | python3 -m json.tool");
  EXPECT_NE(summary.find("\"recording_mode\": \"per_pass\""), std::string::npos) << summary;
  EXPECT_NE(summary.find("\"num_records\": " + std::to_string(generated)), std::string::npos) << summary;
  EXPECT_NE(curl("curl -s -X POST \"" + base + "/stop_expert_distribution\"").find("\"success\""), std::string::npos);
  EXPECT_EQ(serve.stop(), 0) << serve.log();
  // Auto-recording: one line per pass, every line whole.
  std::ifstream in(jsonl);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) {
    const Json j = Json::parse(line);
    EXPECT_EQ(j["forward_pass_id"], lines);
    ++lines;
  }
  EXPECT_EQ(lines, generated);
}

TEST_F(ServeCommand, GreedyOutputThroughTheServerEqualsGenerate) {
  ServeProcess serve(dir_->path().string());
  ASSERT_GT(serve.port(), 0) << serve.log();
  const std::string prompt = "Janet has 16 eggs. She eats 3.";
  const Json body = {{"prompt", prompt}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true}};
  const auto http = test::run_command("curl -sf http://127.0.0.1:" + std::to_string(serve.port()) +
                                      "/v1/completions -H 'Content-Type: application/json' -d '" + body.dump() + "'");
  ASSERT_EQ(http.exit_code, 0) << http.output;
  const auto cli = test::run_moescope("generate " + dir_->path().string() + " --prompt '" + prompt + "' --max-tokens 24 --ignore-eos --json");
  ASSERT_EQ(cli.exit_code, 0) << cli.output;
  EXPECT_EQ(Json::parse(http.output)["choices"][0]["text"], Json::parse(cli.output)["text"]);
  EXPECT_EQ(serve.stop(), 0);
}

TEST_F(ServeCommand, SigtermWhileServingAndRecordingEndsRequestsAndLeavesWholeFiles) {
  test::TempDir tmp;
  const std::string files = " --expert-distribution-jsonl " + (tmp / "passes.jsonl").string() +
                            " --expert-distribution-recorder-mode per_token --expert-distribution-dump " + (tmp / "tokens.jsonl").string();
  ServeProcess serve("MOESCOPE_LOG_MOE=" + (tmp / "routes.jsonl").string() + " MOESCOPE_LOG_MOE_LAYER=all", dir_->path().string() + files);
  ASSERT_GT(serve.port(), 0) << serve.log();
  // A long streamed request in flight when the signal comes.
  const std::string body = R"({"prompt": "a long story", "max_tokens": 4000, "n": 16, "stream": true, "ignore_eos": true})";
  std::string streamed;
  std::thread client([&] {
    streamed = test::run_command("curl -sN http://127.0.0.1:" + std::to_string(serve.port()) + "/v1/completions -H 'Content-Type: application/json' -d '" +
                                 body + "'")
                   .output;
  });
  for (int i = 0; i < 300 && (!fs::exists(tmp / "passes.jsonl") || fs::file_size(tmp / "passes.jsonl") < 5000); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(serve.stop(), 0) << serve.log();
  client.join();
  // The request ended: its stream says why and closes with [DONE].
  EXPECT_NE(streamed.find("shutting down"), std::string::npos) << streamed.substr(0, 300);
  EXPECT_NE(streamed.find("data: [DONE]"), std::string::npos);
  for (const char* name : {"passes.jsonl", "routes.jsonl", "tokens.jsonl"}) {
    const std::string text = read_text_file(tmp / name);
    ASSERT_FALSE(text.empty()) << name;
    EXPECT_EQ(text.back(), '\n') << name;
    std::istringstream lines(text);
    std::string line;
    int n = 0;
    while (std::getline(lines, line)) {
      EXPECT_NO_THROW(Json::parse(line)) << name << " line " << n;
      ++n;
    }
    EXPECT_GT(n, 1) << name;
  }
}

TEST_F(ServeCommand, BadFlagsAndABusyPortAreOneLineErrors) {
  auto r = test::run_moescope("serve " + dir_->path().string() + " --tensor-parallel-size 2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--tensor-parallel-size 2"), std::string::npos) << r.output;
  r = test::run_moescope("serve " + dir_->path().string() + " --max-model-len 100000");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("beyond the model's"), std::string::npos) << r.output;
  ServeProcess first(dir_->path().string());
  ASSERT_GT(first.port(), 0);
  r = test::run_moescope("serve " + dir_->path().string() + " --port " + std::to_string(first.port()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("cannot listen on 127.0.0.1:" + std::to_string(first.port())), std::string::npos) << r.output;
}

}  // namespace
}  // namespace moescope
