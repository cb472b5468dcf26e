#include "server/http_server.h"

#include <fmt/format.h>

#include <algorithm>
#include <ctime>

#include "server/openai.h"
#include "util/error.h"

namespace moescope::server {
namespace {

std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

void send_json(HttpResponse& res, int status, const Json& body) {
  res.status = status;
  res.content_type = "application/json";
  res.body = dump(body);
}

void send_error(HttpResponse& res, const ApiError& e) { send_json(res, e.status, error_body(e)); }

// One choice of a response: what its channel has delivered so far.
struct Choice {
  std::shared_ptr<Channel> channel;
  int index = 0;
  size_t prompt = 0;  // which prompt it continues
  std::string text;
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  std::vector<std::vector<std::pair<int32_t, float>>> top;
  std::vector<TokenRoutes> routes;
  std::string finish_reason, error;
  bool started = false;  // a stream has sent its first chunk

  void apply(ChoiceDelta& d) {
    text += d.text;
    ids.insert(ids.end(), d.token_ids.begin(), d.token_ids.end());
    logprobs.insert(logprobs.end(), d.logprobs.begin(), d.logprobs.end());
    top.insert(top.end(), d.top_logprobs.begin(), d.top_logprobs.end());
    routes.insert(routes.end(), d.routes.begin(), d.routes.end());
    if (!d.finish_reason.empty()) finish_reason = d.finish_reason;
    if (!d.error.empty()) error = d.error;
  }
  bool done() const { return !finish_reason.empty(); }
};

// A generation request in flight: its parameters and its choices.
struct Generation {
  bool chat = false;
  std::string id, model;
  int64_t created = 0;
  GenerateParams params;
  std::vector<Choice> choices;

  Json usage() const {
    int64_t prompt = 0, completion = 0;
    for (const auto& p : params.prompts) prompt += static_cast<int64_t>(p.size());
    for (const Choice& c : choices) completion += static_cast<int64_t>(c.ids.size());
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
  }
  Json chunk(Json choices_json) const {
    return {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created}, {"model", model},
            {"choices", std::move(choices_json)}};
  }
  void cancel_all() {
    for (Choice& c : choices)
      if (!c.done()) c.channel->cancel();
  }
};

}  // namespace

HttpServer::HttpServer(EngineService& engine, ExpertRecorder& recorder, ServerOptions options)
    : engine_(engine), recorder_(recorder), options_(std::move(options)), rng_(options_.seed) {
  engine_.on_finish = [this](const GenerationRequest& r, const std::string& reason, int prompt_tokens, int completion_tokens,
                             double first_token_seconds) {
    const double e2e = std::chrono::duration<double>(std::chrono::steady_clock::now() - r.arrival).count();
    metrics_.request_finished(reason, prompt_tokens, completion_tokens, e2e, first_token_seconds);
  };
  routes();
  listener_ = std::make_unique<HttpListener>(
      options_.host, options_.port, options_.max_body_bytes, options_.max_connections,
      [this](const HttpRequest& req, HttpResponse& res) { dispatch(req, res); },
      [this](int status, const std::string& message) {
        metrics_.request_refused(status);
        return dump(error_body({status, status >= 500 ? "server_error" : "invalid_request_error", message, ""}));
      });
}

HttpServer::~HttpServer() { close(); }

int HttpServer::bind() { return listener_->bind(); }
void HttpServer::listen() { listener_->serve(); }
void HttpServer::stop() { listener_->stop(); }
void HttpServer::close() { listener_->close(); }

std::string HttpServer::next_id(const char* prefix) {
  // Ids are unique across restarts (random_device); --seed only fixes the sampling of unseeded requests.
  thread_local std::mt19937_64 ids(std::random_device{}());
  return fmt::format("{}{:016x}{:016x}", prefix, ids(), ids());
}

uint64_t HttpServer::next_seed() {
  std::lock_guard lock(rng_mutex_);
  return rng_();
}

void HttpServer::dispatch(const HttpRequest& req, HttpResponse& res) {
  try {
    if (!options_.api_key.empty() && req.authorization != "Bearer " + options_.api_key) {
      send_error(res, {401, "authentication_error", "missing or wrong API key (send Authorization: Bearer <key>)", ""});
    } else if (auto path = routes_.find(req.path); path == routes_.end()) {
      send_error(res, {404, "not_found_error", fmt::format("no route {} {}", req.method, req.path), ""});
    } else if (auto route = path->second.find(req.method); route == path->second.end()) {
      send_error(res, {405, "invalid_request_error", fmt::format("method {} is not allowed on {}", req.method, req.path), ""});
    } else {
      route->second(req, res);
    }
  } catch (const std::exception& e) {  // handlers do not throw by design; this is the last net
    send_error(res, {500, "server_error", e.what(), ""});
  }
  if (res.status >= 400) metrics_.request_refused(res.status);
}

void HttpServer::generate(const HttpRequest& req, HttpResponse& res, bool chat) {
  const LoadedModel& m = engine_.model();
  const ModelInfo info{options_.served_model_name, options_.max_model_len, &*m.tokenizer, &m.chat_template, m.weights->config.vocab_size};
  ApiError error;
  auto params = chat ? parse_chat_request(req.body, info, &error) : parse_completion_request(req.body, info, &error);
  if (!params) return send_error(res, error);
  auto g = std::make_shared<Generation>();
  g->chat = chat;
  g->id = next_id(chat ? "chatcmpl-" : "cmpl-");
  g->model = options_.served_model_name;
  g->created = static_cast<int64_t>(std::time(nullptr));
  g->params = std::move(*params);
  const GenerateParams& p = g->params;
  const auto arrival = std::chrono::steady_clock::now();
  const int total = static_cast<int>(p.prompts.size()) * p.n;
  const uint64_t base_seed = p.has_seed ? p.sampling.seed : next_seed();
  for (size_t i = 0; i < p.prompts.size(); ++i) {
    for (int j = 0; j < p.n; ++j) {
      const int index = static_cast<int>(i) * p.n + j;
      GenerationRequest r;
      r.request.req_id = total == 1 ? g->id : fmt::format("{}-{}", g->id, index);
      r.request.prompt_ids = p.prompts[i];
      r.request.sampling = p.sampling;
      r.request.sampling.seed = base_seed + static_cast<uint64_t>(index);  // choice i of a seeded request draws with seed + i
      r.request.max_tokens = p.max_tokens.value_or(options_.max_model_len - static_cast<int>(p.prompts[i].size()));
      r.request.ignore_eos = p.ignore_eos;
      r.request.logprobs = p.logprobs;
      r.stop = p.stop;
      r.return_routed_experts = p.return_routed_experts;
      r.arrival = arrival;
      Choice c;
      c.index = index;
      c.prompt = i;
      try {
        c.channel = engine_.submit(std::move(r));
      } catch (const Error& e) {
        g->cancel_all();
        return send_error(res, {400, "invalid_request_error", e.what(), "prompt"});
      }
      g->choices.push_back(std::move(c));
    }
  }
  const Tokenizer& tok = *m.tokenizer;
  const RoutingShape& shape = engine_.shape();

  if (!p.stream) {
    for (Choice& c : g->choices)
      while (!c.done())
        for (ChoiceDelta& d : c.channel->pop(std::chrono::milliseconds(100))) c.apply(d);
    for (const Choice& c : g->choices)
      if (!c.error.empty()) return send_error(res, {500, "server_error", c.error, ""});
    Json choices = Json::array();
    for (const Choice& c : g->choices) {
      Json j = {{"index", c.index}, {"finish_reason", c.finish_reason}};
      if (chat) {
        j["message"] = {{"role", "assistant"}, {"content", c.text}};
        j["logprobs"] = p.logprobs >= 0 ? chat_logprobs(tok, c.ids, c.logprobs, c.top) : Json(nullptr);
      } else {
        const std::string prefix = p.echo ? p.prompt_texts[c.prompt] : "";
        j["text"] = prefix + c.text;
        j["logprobs"] = p.logprobs >= 0 ? completion_logprobs(tok, c.ids, c.logprobs, c.top, prefix.size()) : Json(nullptr);
      }
      if (p.return_routed_experts) j["routed_experts"] = routed_experts_json(shape, c.routes);
      choices.push_back(std::move(j));
    }
    return send_json(res, 200, {{"id", g->id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", g->created},
                                {"model", g->model}, {"choices", choices}, {"usage", g->usage()}});
  }

  // Streaming: server-sent events, one chunk per delta, the usage chunk if asked, then [DONE]. A client
  // that goes away cancels its choices, which frees their sequences in the engine.
  res.content_type = "text/event-stream";
  res.stream = [g, &tok, &shape](const std::function<bool(std::string_view)>& write) {
    const GenerateParams& p = g->params;
    auto send = [&](const Json& j) { return write("data: " + dump(j) + "\n\n"); };
    while (!std::all_of(g->choices.begin(), g->choices.end(), [](const Choice& c) { return c.done(); })) {
      bool waited = false;
      for (Choice& c : g->choices) {
        if (c.done()) continue;
        auto deltas = c.channel->pop(std::chrono::milliseconds(waited ? 0 : 20));
        waited = true;
        for (ChoiceDelta& d : deltas) {
          const auto first = static_cast<std::ptrdiff_t>(c.ids.size());
          c.apply(d);
          bool ok = true;
          if (!c.error.empty()) {
            ok = send(error_body({500, "server_error", c.error, ""}));
          } else {
            Json choice = {{"index", c.index}, {"finish_reason", d.finish_reason.empty() ? Json(nullptr) : Json(d.finish_reason)}};
            if (p.logprobs >= 0) {
              const std::vector<int32_t> ids(c.ids.begin() + first, c.ids.end());
              const std::vector<float> lp(c.logprobs.begin() + first, c.logprobs.end());
              const std::vector<std::vector<std::pair<int32_t, float>>> top(c.top.begin() + first, c.top.end());
              choice["logprobs"] = g->chat ? chat_logprobs(tok, ids, lp, top) : completion_logprobs(tok, ids, lp, top, 0);
            } else {
              choice["logprobs"] = nullptr;
            }
            if (g->chat) {
              Json delta = {{"content", d.text}};
              if (!c.started) delta["role"] = "assistant";
              choice["delta"] = delta;
            } else {
              choice["text"] = (!c.started && p.echo ? p.prompt_texts[c.prompt] : "") + d.text;
            }
            if (p.return_routed_experts) choice["routed_experts"] = routed_experts_json(shape, d.routes);
            c.started = true;
            ok = send(g->chunk(Json::array({std::move(choice)})));
          }
          if (!ok) {
            g->cancel_all();
            return;
          }
        }
      }
    }
    if (p.include_usage) {
      Json last = g->chunk(Json::array());
      last["usage"] = g->usage();
      if (!send(last)) return;
    }
    write("data: [DONE]\n\n");
  };
}

void HttpServer::routes() {
  auto& r = routes_;
  r["/v1/completions"]["POST"] = [this](const HttpRequest& req, HttpResponse& res) { generate(req, res, false); };
  r["/v1/chat/completions"]["POST"] = [this](const HttpRequest& req, HttpResponse& res) { generate(req, res, true); };
  r["/v1/models"]["GET"] = [this](const HttpRequest&, HttpResponse& res) {
    send_json(res, 200, {{"object", "list"},
                         {"data", Json::array({{{"id", options_.served_model_name}, {"object", "model"}, {"created", 0},
                                                {"owned_by", "moescope"}, {"root", engine_.model().name},
                                                {"max_model_len", options_.max_model_len}}})}});
  };
  r["/health"]["GET"] = [](const HttpRequest&, HttpResponse& res) {
    res.status = 200;
    res.content_type = "text/plain";
  };
  r["/version"]["GET"] = [](const HttpRequest&, HttpResponse& res) { send_json(res, 200, {{"version", MOESCOPE_VERSION}}); };
  r["/metrics"]["GET"] = [this](const HttpRequest&, HttpResponse& res) {
    res.content_type = "text/plain; version=0.0.4";
    res.body = metrics_.render(engine_.stats(), recorder_, options_.served_model_name);
  };

  // --- expert distribution (SPEC §3) ----------------------------------------------------------------------
  // A bad parameter answers 400, a call in the wrong state 409; neither changes anything.
  auto refuse = [](HttpResponse& res, int status, const std::string& message, const std::string& param = "") {
    Json body = error_body({status, status == 409 ? "conflict_error" : "invalid_request_error", message, param});
    body["status"] = "error";
    send_json(res, status, body);
  };
  auto control = [refuse](const HttpRequest& req, HttpResponse& res, std::initializer_list<const char*> allowed,
                          const std::function<Json()>& action) {
    for (const auto& [key, value] : req.query)
      if (std::none_of(allowed.begin(), allowed.end(), [&](const char* a) { return key == a; }))
        return refuse(res, 400, fmt::format("unknown parameter '{}'", key), key);
    try {
      Json body = action();
      body["status"] = "success";
      send_json(res, 200, body);
    } catch (const RecorderStateError& e) {
      refuse(res, 409, e.what());
    }
  };
  r["/configure_expert_distribution"]["POST"] = [this, control, refuse](const HttpRequest& req, HttpResponse& res) {
    const auto it = req.query.find("mode");
    const std::string text = it == req.query.end() ? "stat" : it->second;
    const auto mode = parse_recording_mode(text);
    if (!mode) return refuse(res, 400, fmt::format("unknown mode '{}' (stat, per_pass, per_token)", text), "mode");
    control(req, res, {"mode"}, [&] {
      recorder_.configure(*mode);
      return Json{{"message", fmt::format("expert distribution recording configured: mode {}", text)}, {"mode", text}};
    });
  };
  r["/start_expert_distribution"]["POST"] = [this, control](const HttpRequest& req, HttpResponse& res) {
    control(req, res, {}, [&] {
      recorder_.start();
      return Json{{"message", "expert distribution recording started"}, {"mode", to_string(recorder_.mode())}};
    });
  };
  r["/stop_expert_distribution"]["POST"] = [this, control](const HttpRequest& req, HttpResponse& res) {
    control(req, res, {}, [&] {
      recorder_.stop();
      return Json{{"message", "expert distribution recording stopped"}, {"num_records", recorder_.num_records()}};
    });
  };
  r["/dump_expert_distribution"]["POST"] = [this, control, refuse](const HttpRequest& req, HttpResponse& res) {
    const auto it = req.query.find("summary_only");
    const std::string flag = it == req.query.end() ? "true" : it->second;
    if (flag != "true" && flag != "false")
      return refuse(res, 400, fmt::format("summary_only must be true or false, not '{}'", flag), "summary_only");
    if (flag == "true") {
      return control(req, res, {"summary_only"}, [&] {
        return Json{{"num_workers", 1}, {"summary", {{"workers", Json::array({recorder_.summary()})}}}};
      });
    }
    control(req, res, {"summary_only"}, [&] { return Json{{"num_workers", 1}}; });  // the checks; the body follows
    if (res.status != 200) return;
    try {
      res.body = R"({"status":"success","num_workers":1,"dump":{"workers":[)" + recorder_.dump() + "]}}";
    } catch (const RecorderStateError& e) {
      refuse(res, 409, e.what());
    }
  };
  r["/expert_distribution_status"]["GET"] = [this, control](const HttpRequest& req, HttpResponse& res) {
    control(req, res, {}, [&] {
      return Json{{"available", true}, {"mode", to_string(recorder_.mode())}, {"state", to_string(recorder_.state())},
                  {"num_workers", 1}, {"workers", Json::array({recorder_.status()})}};
    });
  };
}

}  // namespace moescope::server
