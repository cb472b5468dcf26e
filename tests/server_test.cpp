// The HTTP server on loopback: the seed's expert-distribution flow, the OpenAI API (completions, chat,
// streaming, n, stop, logprobs, echo, return_routed_experts), every bad input answering the right 4xx
// while the server keeps serving, client disconnects freeing their sequences, and a load of hundreds of
// concurrent requests that each get exactly the tokens they get alone while recording is switched.
#include <gtest/gtest.h>
#include <httplib.h>

#include <future>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "engine/loaded_model.h"
#include "model/make_model.h"
#include "routing/expert_recorder.h"
#include "server/engine_service.h"
#include "server/http_server.h"
#include "test_util.h"

namespace moescope {
namespace {

using server::EngineService;
using server::HttpServer;
using server::ServerOptions;

// A server on a free loopback port over a tiny random Qwen2-MoE, in this process.
class Server {
 public:
  Server(const std::filesystem::path& model_dir, ServerOptions options = {}, int max_num_seqs = 256, int64_t kv_tokens = 0)
      : model_(load_model(model_dir)), recorder_(routing_shape(model_.weights->config, "tiny")) {
    options.port = 0;
    options.served_model_name = "tiny";
    if (options.max_model_len == 0) options.max_model_len = 512;
    engine_ = std::make_unique<EngineService>(std::make_unique<cpu::CpuBackend>(model_.weights), model_,
                                              EngineOptions{max_num_seqs, model_.eos_token_ids, kv_tokens, 16}, &recorder_);
    http_ = std::make_unique<HttpServer>(*engine_, recorder_, options);
    port_ = http_->bind();
    thread_ = std::thread([this] { http_->listen(); });
  }
  ~Server() {
    http_->stop();
    thread_.join();
    engine_->stop();
    http_->close();
  }
  httplib::Client client(const std::string& key = "") const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(120, 0);
    if (!key.empty()) c.set_bearer_token_auth(key.c_str());
    return c;
  }
  int port() const { return port_; }
  ExpertRecorder& recorder() { return recorder_; }
  EngineService& engine() { return *engine_; }
  const LoadedModel& model() const { return model_; }

 private:
  LoadedModel model_;
  ExpertRecorder recorder_;
  std::unique_ptr<EngineService> engine_;
  std::unique_ptr<HttpServer> http_;
  int port_ = 0;
  std::thread thread_;
};

Json post_json(httplib::Client& c, const std::string& path, const Json& body, int expect_status = 200) {
  auto r = c.Post(path, body.dump(), "application/json");
  EXPECT_TRUE(r) << "no answer from " << path;
  if (!r) return {};
  EXPECT_EQ(r->status, expect_status) << path << " " << body.dump() << " -> " << r->body;
  return Json::parse(r->body, nullptr, false);
}

// POST with no body and no Content-Length, as `curl -X POST URL` sends it.
int bare_post(int port, const std::string& target, std::string* body) {
  httplib::Client c("127.0.0.1", port);
  httplib::Request req;
  req.method = "POST";
  req.path = target;
  auto r = c.send(req);
  if (!r) return -1;
  *body = r->body;
  return r->status;
}

// The data lines of an SSE body.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> events;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    events.push_back(body.substr(at + 6, end - at - 6));
    at = end;
  }
  return events;
}

class ServerTest : public test::TinyModelSuite {};

TEST_F(ServerTest, SeedFlowInEveryMode) {
  Server s(dir_->path());
  const std::string completion = R"({"model": "tiny", "prompt": "write Hello World in python", "max_tokens": 20, "ignore_eos": true})";
  auto c = s.client();
  for (const char* mode : {"per_pass", "stat", "per_token"}) {
    std::string body;
    ASSERT_EQ(bare_post(s.port(), std::string("/configure_expert_distribution?mode=") + mode, &body), 200) << body;
    EXPECT_EQ(Json::parse(body)["status"], "success");
    ASSERT_EQ(bare_post(s.port(), "/start_expert_distribution", &body), 200) << body;
    auto r = c.Post("/v1/completions", completion, "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    const Json out = Json::parse(r->body);
    const int prompt_tokens = out["usage"]["prompt_tokens"], completion_tokens = out["usage"]["completion_tokens"];
    EXPECT_EQ(completion_tokens, 20);
    // While recording, /metrics carries the recorder's per-layer, per-expert counts.
    const std::string metrics = c.Get("/metrics")->body;
    EXPECT_NE(metrics.find("moescope_expert_recording 1"), std::string::npos);
    EXPECT_NE(metrics.find("moescope_expert_tokens_total{model_name=\"tiny\",layer=\"3\",expert=\"7\"}"), std::string::npos) << metrics;
    ASSERT_EQ(bare_post(s.port(), "/dump_expert_distribution?summary_only=true", &body), 200) << body;
    const Json summary = Json::parse(body);
    EXPECT_EQ(summary["status"], "success");
    EXPECT_EQ(summary["num_workers"], 1);
    const Json& w = summary["summary"]["workers"][0];
    EXPECT_EQ(w["rank"], 0);
    EXPECT_EQ(w["recording_mode"], mode);
    EXPECT_EQ(w["num_layers"], 4);
    EXPECT_EQ(w["num_experts"], 8);
    // 20 passes: the prefill and 19 decodes (the 20th token is sampled, never fed back).
    const int64_t tokens = prompt_tokens + completion_tokens - 1;
    const int64_t want = std::string(mode) == "per_token" ? tokens * 4 : 20;
    EXPECT_EQ(w["num_records"], want) << mode;
    for (const char* field : {"forward_pass_id", "rank", "total_activated_experts", "avg_activated_per_layer", "expert_utilization"})
      EXPECT_TRUE(w["sample_record"].contains(field)) << field;
    ASSERT_EQ(bare_post(s.port(), "/stop_expert_distribution", &body), 200) << body;
    ASSERT_EQ(bare_post(s.port(), "/dump_expert_distribution?summary_only=false", &body), 200);
    const Json full = Json::parse(body);
    const Json& fw = full["dump"]["workers"][0];
    for (const auto& row : fw["counts"]) {
      int64_t sum = 0;
      for (int64_t v : row) sum += v;
      EXPECT_EQ(sum, tokens * 2);  // tokens x top_k in every MoE layer
    }
    if (std::string(mode) == "per_token") {
      EXPECT_EQ(fw["records"].size(), static_cast<size_t>(tokens * 4));
    } else if (std::string(mode) == "per_pass") {
      EXPECT_EQ(fw["records"].size(), 20u);
    }
  }
  auto status = c.Get("/expert_distribution_status");
  ASSERT_TRUE(status);
  const Json st = Json::parse(status->body);
  EXPECT_EQ(st["available"], true);
  EXPECT_EQ(st["state"], "stopped");
  EXPECT_EQ(st["mode"], "per_token");
}

TEST_F(ServerTest, ExpertEndpointsRefuseBadParametersAndWrongStatesWithoutChangingThem) {
  Server s(dir_->path());
  std::string body;
  EXPECT_EQ(bare_post(s.port(), "/dump_expert_distribution", &body), 409) << body;  // never started
  EXPECT_NE(body.find("start recording first"), std::string::npos);
  EXPECT_EQ(bare_post(s.port(), "/stop_expert_distribution", &body), 409);
  EXPECT_EQ(bare_post(s.port(), "/configure_expert_distribution?mode=bogus", &body), 400);
  EXPECT_EQ(Json::parse(body)["error"]["param"], "mode");
  EXPECT_EQ(bare_post(s.port(), "/configure_expert_distribution?mode=per_pass&x=1", &body), 400);
  EXPECT_EQ(s.recorder().state(), RecorderState::Idle);  // nothing changed
  EXPECT_EQ(bare_post(s.port(), "/configure_expert_distribution?mode=per_pass", &body), 200);
  EXPECT_EQ(bare_post(s.port(), "/start_expert_distribution", &body), 200);
  EXPECT_EQ(bare_post(s.port(), "/start_expert_distribution", &body), 409);
  EXPECT_EQ(bare_post(s.port(), "/configure_expert_distribution?mode=stat", &body), 409);
  EXPECT_EQ(s.recorder().mode(), RecordingMode::PerPass);
  EXPECT_EQ(bare_post(s.port(), "/dump_expert_distribution?summary_only=maybe", &body), 400);
  EXPECT_EQ(bare_post(s.port(), "/configure_expert_distribution", &body), 409);  // default mode, but recording
  auto c = s.client();
  auto get = c.Get("/start_expert_distribution");
  ASSERT_TRUE(get);
  EXPECT_EQ(get->status, 405);
  EXPECT_EQ(s.recorder().state(), RecorderState::Recording);
}

TEST_F(ServerTest, BadRequestsAnswerTheRight4xxAndTheServerKeepsServing) {
  ServerOptions options;
  options.max_body_bytes = 4096;
  Server s(dir_->path(), options);
  auto c = s.client();
  struct Case {
    const char* path;
    std::string body;
    int status;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", 400, "not valid JSON"},
      {"/v1/completions", "[1,2]", 400, "JSON object"},
      {"/v1/completions", R"({"prompt": 5})", 400, "'prompt' must be"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": -3})", 400, "'max_tokens' must be between"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": 100000})", 400, "maximum context length"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": "ten"})", 400, "'max_tokens' must be an integer"},
      {"/v1/completions", R"({"prompt": "hi", "temperature": -0.5})", 400, "'temperature' must be"},
      {"/v1/completions", R"({"prompt": "hi", "top_p": 0})", 400, "'top_p'"},
      {"/v1/completions", R"({"prompt": "hi", "n": 0})", 400, "'n' must be"},
      {"/v1/completions", R"({"prompt": "hi", "temprature": 0})", 400, "unknown field 'temprature'"},
      {"/v1/completions", R"({"prompt": "hi", "presence_penalty": 0.5})", 400, "not supported"},
      {"/v1/completions", R"({"prompt": ""})", 400, "must not be empty"},
      {"/v1/completions", R"({"prompt": []})", 400, "must not be empty"},
      {"/v1/completions", R"({"prompt": [1, 2, 512]})", 400, "out of vocabulary"},
      {"/v1/completions", R"({"prompt": [1, -1]})", 400, "out of vocabulary"},
      {"/v1/completions", std::string(R"({"prompt": "bad )") + "\xff\xfe" + R"("})", 400, "not valid JSON"},
      {"/v1/completions", R"({"prompt": "hi", "model": "gpt-4"})", 404, "does not exist"},
      {"/v1/completions", R"({"prompt": "hi", "stop": [1]})", 400, "'stop'"},
      {"/v1/completions", R"({"prompt": "hi", "stream_options": {"include_usage": true}})", 400, "only allowed with stream"},
      {"/v1/completions", R"({"prompt": "hi", "echo": true, "logprobs": 1})", 400, "not supported"},
      {"/v1/completions", std::string(R"({"prompt": ")") + std::string(5000, 'a') + "\"}", 413, "larger than 4096"},
      {"/v1/chat/completions", R"({"messages": []})", 400, "'messages'"},
      {"/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "x"}]})", 400, "'role'"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", 400, "needs 'logprobs'"},
  };
  for (const Case& k : cases) {
    auto r = c.Post(k.path, k.body, "application/json");
    ASSERT_TRUE(r) << k.body.substr(0, 80);
    EXPECT_EQ(r->status, k.status) << k.body.substr(0, 80) << " -> " << r->body;
    const Json e = Json::parse(r->body, nullptr, false);
    ASSERT_TRUE(e.is_object() && e.contains("error")) << r->body;
    EXPECT_EQ(e["error"]["code"], k.status);
    EXPECT_NE(e["error"]["message"].get<std::string>().find(k.says), std::string::npos)
        << k.body.substr(0, 80) << " -> " << e["error"]["message"];
  }
  auto nope = c.Get("/v2/nothing");
  ASSERT_TRUE(nope);
  EXPECT_EQ(nope->status, 404);
  EXPECT_EQ(Json::parse(nope->body)["error"]["type"], "not_found_error");
  // Still serving.
  const Json ok = post_json(c, "/v1/completions", {{"prompt", "hello"}, {"max_tokens", 3}, {"temperature", 0}});
  EXPECT_EQ(ok["choices"].size(), 1u);
  auto health = c.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST_F(ServerTest, ApiKeyProtectsEveryRoute) {
  ServerOptions options;
  options.api_key = "sekret";
  Server s(dir_->path(), options);
  auto anon = s.client();
  auto wrong = s.client("nope");
  auto right = s.client("sekret");
  for (const char* path : {"/health", "/v1/models", "/metrics", "/expert_distribution_status"}) {
    auto a = anon.Get(path);
    ASSERT_TRUE(a);
    EXPECT_EQ(a->status, 401) << path;
    EXPECT_EQ(Json::parse(a->body)["error"]["type"], "authentication_error");
    EXPECT_EQ(wrong.Get(path)->status, 401) << path;
    EXPECT_EQ(right.Get(path)->status, 200) << path;
  }
  EXPECT_EQ(anon.Post("/v1/completions", R"({"prompt":"x"})", "application/json")->status, 401);
}

TEST_F(ServerTest, CompletionsChatStreamingAndOptions) {
  Server s(dir_->path());
  auto c = s.client();
  const Json models = Json::parse(c.Get("/v1/models")->body);
  EXPECT_EQ(models["data"][0]["id"], "tiny");
  EXPECT_EQ(Json::parse(c.Get("/version")->body)["version"], MOESCOPE_VERSION);

  // Greedy is reproducible; streaming gives the same text in pieces, then usage, then [DONE].
  const Json req = {{"prompt", "Janet has 16 eggs"}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}};
  const Json a = post_json(c, "/v1/completions", req);
  const Json b = post_json(c, "/v1/completions", req);
  EXPECT_EQ(a["choices"][0]["text"], b["choices"][0]["text"]);
  EXPECT_EQ(a["object"], "text_completion");
  EXPECT_EQ(a["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(a["usage"]["completion_tokens"], 12);
  Json sreq = req;
  sreq["stream"] = true;
  sreq["stream_options"] = {{"include_usage", true}};
  auto r = c.Post("/v1/completions", sreq.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
  const auto events = sse_events(r->body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 2 < events.size(); ++i) text += Json::parse(events[i])["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(text, a["choices"][0]["text"]);
  EXPECT_EQ(Json::parse(events[events.size() - 2])["usage"]["completion_tokens"], 12);

  // n, seeds: a seeded sampled request is reproducible, choice 0 equals the same request with n = 1.
  const Json sampled = {{"prompt", "x y z"}, {"max_tokens", 8}, {"temperature", 1.0}, {"seed", 42}, {"n", 3}, {"ignore_eos", true}};
  const Json s1 = post_json(c, "/v1/completions", sampled);
  const Json s2 = post_json(c, "/v1/completions", sampled);
  ASSERT_EQ(s1["choices"].size(), 3u);
  EXPECT_EQ(s1["choices"], s2["choices"]);
  Json one = sampled;
  one["n"] = 1;
  EXPECT_EQ(post_json(c, "/v1/completions", one)["choices"][0]["text"], s1["choices"][0]["text"]);

  // A list of prompts; echo; logprobs.
  const Json batch = post_json(c, "/v1/completions", {{"prompt", {"one", "two"}}, {"max_tokens", 2}, {"temperature", 0}, {"echo", true}});
  ASSERT_EQ(batch["choices"].size(), 2u);
  EXPECT_EQ(batch["choices"][1]["text"].get<std::string>().rfind("two", 0), 0u);
  const Json lp = post_json(c, "/v1/completions", {{"prompt", "hello"}, {"max_tokens", 4}, {"temperature", 0}, {"logprobs", 2}, {"ignore_eos", true}});
  const Json& l = lp["choices"][0]["logprobs"];
  ASSERT_EQ(l["tokens"].size(), 4u);
  ASSERT_EQ(l["top_logprobs"][0].size(), 2u);
  for (const auto& v : l["token_logprobs"]) EXPECT_LE(v.get<double>(), 0.0);

  // Stop strings end the text before them.
  const std::string full = a["choices"][0]["text"];
  ASSERT_GE(full.size(), 4u);
  const std::string stop = full.substr(full.size() / 2, 2);
  Json stopped_req = req;
  stopped_req["stop"] = stop;
  const Json stopped = post_json(c, "/v1/completions", stopped_req);
  EXPECT_EQ(stopped["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(stopped["choices"][0]["text"], full.substr(0, full.find(stop)));
  stopped_req["stream"] = true;
  const auto stop_events = sse_events(c.Post("/v1/completions", stopped_req.dump(), "application/json")->body);
  std::string streamed;
  for (size_t i = 0; i + 1 < stop_events.size(); ++i) streamed += Json::parse(stop_events[i])["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(streamed, stopped["choices"][0]["text"]);

  // Chat, plain and streamed.
  const Json chat_req = {{"messages", {{{"role", "user"}, {"content", "How many eggs?"}}}}, {"max_tokens", 6}, {"temperature", 0}, {"ignore_eos", true}};
  const Json chat = post_json(c, "/v1/chat/completions", chat_req);
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  Json chat_stream = chat_req;
  chat_stream["stream"] = true;
  const auto chat_events = sse_events(c.Post("/v1/chat/completions", chat_stream.dump(), "application/json")->body);
  std::string content;
  for (size_t i = 0; i + 1 < chat_events.size(); ++i) {
    const Json e = Json::parse(chat_events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (i == 0) {
      EXPECT_EQ(e["choices"][0]["delta"]["role"], "assistant");
    }
    content += e["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(content, chat["choices"][0]["message"]["content"]);
}

TEST_F(ServerTest, ReturnedRoutesAreTheRecordedRoutes) {
  Server s(dir_->path());
  s.recorder().configure(RecordingMode::PerToken);
  s.recorder().start();
  auto c = s.client();
  const Json out = post_json(c, "/v1/completions",
                             {{"prompt", {5, 6, 7, 8}}, {"max_tokens", 5}, {"temperature", 0}, {"ignore_eos", true}, {"return_routed_experts", true}});
  s.recorder().stop();
  const Json& routed = out["choices"][0]["routed_experts"];
  EXPECT_EQ(routed["layers"], Json({0, 1, 2, 3}));
  EXPECT_EQ(routed["top_k"], 2);
  const Json& tokens = routed["tokens"];
  ASSERT_EQ(tokens.size(), 4u + 5u - 1u);  // every prompt token and every generated token but the last
  EXPECT_EQ(tokens[0]["token_id"], 5);
  const Json records = Json::parse(s.recorder().dump())["records"];
  ASSERT_EQ(records.size(), tokens.size() * 4);
  for (const Json& rec : records) {
    EXPECT_EQ(rec["req_id"], out["id"]);
    const Json& t = tokens[rec["token_idx"].get<size_t>()];
    EXPECT_EQ(t["token_idx"], rec["token_idx"]);
    EXPECT_EQ(t["topk_ids"][rec["layer"].get<size_t>()], rec["topk_ids"]);
    EXPECT_EQ(t["topk_weights"][rec["layer"].get<size_t>()], rec["topk_weights"]);
  }
}

TEST_F(ServerTest, AClientThatDisconnectsMidStreamFreesItsSequence) {
  Server s(dir_->path());
  {
    httplib::Client c("127.0.0.1", s.port());
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = R"({"prompt": "a long story", "max_tokens": 400, "stream": true, "ignore_eos": true})";
    req.set_header("Content-Type", "application/json");
    int chunks = 0;
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 3; };  // hang up after 3
    c.send(req);
    EXPECT_GE(chunks, 3);
  }
  // The engine lets the sequence go within a few passes.
  for (int i = 0; i < 200 && (s.engine().stats().running > 0 || s.engine().stats().waiting > 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.engine().stats().running, 0);
  const std::string metrics = s.client().Get("/metrics")->body;
  EXPECT_NE(metrics.find("moescope_request_success_total{finished_reason=\"abort\"} 1"), std::string::npos) << metrics;
}

TEST_F(ServerTest, HundredsOfConcurrentRequestsGetTheirSoloTokensWhileRecordingIsSwitched) {
  // Solo references through the engine alone, then the same requests all at once over HTTP.
  const LoadedModel m = load_model(dir_->path());
  constexpr int k_requests = 240;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int> lengths;
  for (int i = 0; i < k_requests; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 2 + i % 9; ++j) p.push_back((i * 37 + j * 11) % 500);
    prompts.push_back(p);
    lengths.push_back(1 + (i * 7) % 12);
  }
  std::vector<std::string> solo(k_requests);
  {
    cpu::CpuBackend backend(m.weights);
    Engine engine(backend, EngineOptions{256, {}});
    for (int i = 0; i < k_requests; ++i) engine.add_request({std::to_string(i), prompts[i], SamplingParams{}, lengths[i], true});
    for (const auto& out : engine.run_to_completion()) solo[std::stoi(out.req_id)] = m.tokenizer->decode(out.output_ids, true);
  }
  // A small KV budget too, so that requests also wait for room and get preempted.
  Server s(dir_->path(), {}, 64, 64 * 8);
  std::atomic<bool> done{false};
  std::atomic<int> dumps{0};
  std::thread control([&] {  // switch modes, dump and check conservation while the load runs
    const char* modes[] = {"stat", "per_pass", "per_token"};
    std::string body;
    for (int i = 0; !done.load(); ++i) {
      bare_post(s.port(), std::string("/configure_expert_distribution?mode=") + modes[i % 3], &body);
      bare_post(s.port(), "/start_expert_distribution", &body);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      if (bare_post(s.port(), "/dump_expert_distribution?summary_only=false", &body) == 200) {
        const Json w = Json::parse(body)["dump"]["workers"][0];
        for (const auto& row : w["counts"]) {
          int64_t sum = 0;
          for (int64_t v : row) sum += v;
          EXPECT_EQ(sum, w["num_tokens"].get<int64_t>() * 2);
        }
        ++dumps;
      }
      bare_post(s.port(), "/stop_expert_distribution", &body);
    }
  });
  std::vector<std::future<std::string>> results;
  for (int i = 0; i < k_requests; ++i) {
    results.push_back(std::async(std::launch::async, [&, i] {
      auto c = s.client();
      Json req = {{"prompt", prompts[i]}, {"max_tokens", lengths[i]}, {"temperature", 0}, {"ignore_eos", true}};
      if (i % 2) req["stream"] = true;
      auto r = c.Post("/v1/completions", req.dump(), "application/json");
      if (!r || r->status != 200) return std::string("<failed>");
      if (i % 2 == 0) return Json::parse(r->body)["choices"][0]["text"].get<std::string>();
      std::string text;
      for (const auto& e : sse_events(r->body))
        if (e != "[DONE]") text += Json::parse(e)["choices"][0]["text"].get<std::string>();
      return text;
    }));
  }
  int equal = 0;
  for (int i = 0; i < k_requests; ++i) {
    const std::string got = results[i].get();
    EXPECT_EQ(got, solo[i]) << "request " << i;
    equal += got == solo[i];
  }
  done = true;
  control.join();
  EXPECT_GT(dumps.load(), 0);
  const std::string metrics = s.client().Get("/metrics")->body;
  std::printf("  %d of %d requests equal their solo run; %d dumps checked under load\n", equal, k_requests, dumps.load());
  EXPECT_NE(metrics.find("moescope_num_requests_running 0"), std::string::npos);
}

}  // namespace
}  // namespace moescope
