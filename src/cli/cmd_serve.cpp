// moescope serve [MODEL] [flags]: the OpenAI-compatible server with the expert distribution endpoints.
// Flags follow vLLM's names where one exists.
#include <fmt/format.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <thread>

#include "backend/factory.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "cli/recording.h"
#include "engine/loaded_model.h"
#include "server/engine_service.h"
#include "server/http_server.h"
#include "util/error.h"
#include "util/shutdown.h"

namespace moescope::cli {
namespace {

struct ServeArgs {
  std::string model;
  server::ServerOptions server;
  int max_num_seqs = 256;
  int max_model_len = 0;           // 0: the model's max_position_embeddings
  double kv_cache_space_gib = 4.0; // CPU: memory for the KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)
  int tensor_parallel_size = 1;
  std::string device = "auto";
  BackendOptions backend_options;
  RecordingArgs recording;
};

void run_serve(ServeArgs& a) {
  if (a.tensor_parallel_size != 1) fail("--tensor-parallel-size {}: this build serves on one device; use 1", a.tensor_parallel_size);
  if (a.max_num_seqs < 1) fail("--max-num-seqs must be at least 1");
  if (a.kv_cache_space_gib <= 0) fail("--kv-cache-space must be positive");
  const std::string device = resolve_device(a.device);
  const LoadedModel m = load_model(a.model.empty() ? default_model_dir() : std::filesystem::path(a.model));
  const ModelConfig& c = m.weights->config;
  if (a.server.served_model_name.empty()) a.server.served_model_name = m.name;
  const int model_len = c.max_position_embeddings > 0 ? c.max_position_embeddings : 4096;
  if (a.max_model_len < 0 || a.max_model_len > model_len)
    fail("--max-model-len {} is beyond the model's {} positions", a.max_model_len, model_len);
  a.server.max_model_len = a.max_model_len > 0 ? a.max_model_len : model_len;

  EngineOptions engine_options{a.max_num_seqs, m.eos_token_ids, 0, a.backend_options.block_size};
  if (device == "cpu") {
    const double bytes_per_token = 2.0 * c.num_hidden_layers * c.kv_size() * sizeof(float);
    engine_options.kv_cache_tokens = static_cast<int64_t>(a.kv_cache_space_gib * (1ull << 30) / bytes_per_token);
  }
  auto backend = make_backend(device, m.weights, a.backend_options);
  int64_t kv_tokens = engine_options.kv_cache_tokens;  // what the engine will budget (Engine's rule)
  if (const KvCapacity cap = backend->kv_capacity(); cap.blocks > 0)
    kv_tokens = std::min(kv_tokens > 0 ? kv_tokens : INT64_MAX, cap.blocks * cap.block_size);
  if (kv_tokens > 0 && kv_tokens < a.server.max_model_len)
    fail("the KV cache holds {} tokens, fewer than --max-model-len {}; {} or lower --max-model-len", kv_tokens,
         a.server.max_model_len, device == "cpu" ? "raise --kv-cache-space" : "raise --gpu-memory-utilization");

  // Recording: the routing log, --expert-distribution-jsonl and the recorder the endpoints control.
  RoutingShape shape = routing_shape(c, a.server.served_model_name);
  Recording recording(a.recording, shape);
  server::EngineService engine(std::move(backend), m, engine_options, recording.sink());
  server::HttpServer http(engine, recording.recorder(), a.server);
  const int port = http.bind();

  install_shutdown_handlers();
  std::thread watcher([&] {
    while (!shutdown_requested()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    http.stop();
  });
  fmt::print(stderr, "moescope {} serving {} ({} on {}) at http://{}:{} — max-model-len {}, max-num-seqs {}, KV cache {} tokens{}\n",
             MOESCOPE_VERSION, a.server.served_model_name, c.architecture, device, a.server.host, port, a.server.max_model_len,
             a.max_num_seqs, kv_tokens,
             recording.route_log_on() ? "; routing log on" : "");
  http.listen();
  request_shutdown(SIGTERM);  // the listener ended on its own: let the watcher go
  watcher.join();
  engine.stop();   // requests in flight are answered "shutting down"
  http.close();    // then their connections close
  recording.finish();
  fmt::print(stderr, "moescope: shut down\n");
}

}  // namespace

void add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server with the expert distribution endpoints");
  cmd->add_option("model", a->model, "Model directory in Hugging Face layout (default: the model shipped in models/)");
  cmd->add_option("--host", a->server.host, "Address to bind")->capture_default_str();
  cmd->add_option("--port", a->server.port, "Port (0: any free port)")->check(CLI::Range(0, 65535))->capture_default_str();
  cmd->add_option("--api-key", a->server.api_key, "Require Authorization: Bearer KEY on every route");
  cmd->add_option("--served-model-name", a->server.served_model_name, "Model name in the API (default: the model directory's name)");
  cmd->add_option("--max-num-seqs", a->max_num_seqs, "Sequences in one forward pass at most")->capture_default_str();
  cmd->add_option("--max-model-len", a->max_model_len, "Prompt plus output tokens at most (default: the model's positions)");
  cmd->add_option("--kv-cache-space", a->kv_cache_space_gib, "CPU: GiB of memory for the KV cache")->capture_default_str();
  cmd->add_option("--seed", a->server.seed, "Seed for requests that give none")->capture_default_str();
  cmd->add_option("--tensor-parallel-size", a->tensor_parallel_size, "Devices to split the model over (1)")->capture_default_str();
  cmd->add_option("--max-request-bytes", a->server.max_body_bytes, "Larger request bodies answer 413")->capture_default_str();
  cmd->add_option("--max-connections", a->server.max_connections, "Open HTTP connections at most (one thread each)")->capture_default_str();
  add_device_option(cmd, a->device);
  add_gpu_options(cmd, a->backend_options);
  add_recording_options(cmd, a->recording);
  cmd->callback([a] { run_serve(*a); });
}

}  // namespace moescope::cli
