#pragma once
// The HTTP front: the OpenAI-compatible API, the expert distribution endpoints and /metrics over
// HttpListener (server/http.h). Handlers parse and check at the edge, never throw past it, and only queue work for the
// engine thread (EngineService). Every error is OpenAI's shape: {"error":{"message","type","param","code"}}.
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>

#include "routing/expert_recorder.h"
#include "server/engine_service.h"
#include "server/http.h"
#include "server/metrics.h"

namespace moescope::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                      // 0: any free port (tests)
  std::string api_key;                  // empty: no key
  std::string served_model_name;
  int max_model_len = 0;
  uint64_t seed = 0;                    // seeds the draws of requests that give no seed
  size_t max_body_bytes = 8u << 20;     // larger bodies answer 413
  int max_connections = 1024;           // open connections at most (one thread each)
};

class HttpServer {
 public:
  HttpServer(EngineService& engine, ExpertRecorder& recorder, ServerOptions options);
  ~HttpServer();
  // Binds the socket; throws Error naming host and port when it cannot. Returns the bound port.
  int bind();
  // Serves until stop() (safe from any thread); returns with the connections still open.
  void listen();
  void stop();
  // Closes the open connections and waits for their threads (after the engine has stopped).
  void close();

 private:
  using Route = std::function<void(const HttpRequest&, HttpResponse&)>;
  void routes();
  void dispatch(const HttpRequest& req, HttpResponse& res);
  void generate(const HttpRequest& req, HttpResponse& res, bool chat);
  std::string next_id(const char* prefix);
  uint64_t next_seed();

  EngineService& engine_;
  ExpertRecorder& recorder_;
  ServerOptions options_;
  std::map<std::string, std::map<std::string, Route>> routes_;  // path -> method -> handler
  std::unique_ptr<HttpListener> listener_;
  Metrics metrics_;
  std::mutex rng_mutex_;
  std::mt19937_64 rng_;
};

}  // namespace moescope::server
