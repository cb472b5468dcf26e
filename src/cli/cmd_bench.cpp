// moescope bench [MODEL] [--device cpu|cuda]: prefill and decode throughput beside the device's memory
// bandwidth floor (measured in the same run), with the spread over repeats and a checksum of the
// generated ids.
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <set>

#include "backend/factory.h"
#include "cli/commands.h"
#include "cli/bench_recording.h"
#include "cli/device.h"
#include "engine/engine.h"
#include "engine/loaded_model.h"
#include "engine/sampler.h"
#include "model/make_model.h"
#include "util/error.h"
#include "util/json.h"

namespace moescope::cli {
namespace {

struct BenchArgs {
  std::string model;
  std::vector<std::string> presets;
  int prompt_tokens = 128;
  int prefill_tokens = 0;  // 0: prompt_tokens
  std::vector<std::string> prefill_shapes;  // "SxN": S sequences of N tokens in one pass (default 1x prefill_tokens)
  int decode_tokens = 32;
  std::vector<int> batch_sizes = {1, 4, 16};
  int repeats = 5;
  std::string device = "auto";
  BackendOptions backend_options;
  std::string json_out;
  std::string command_line;
  bool recording_overhead = false;  // also measure the recording overhead (SPEC §6) on each model
  OverheadOptions overhead;
};

struct Spread {
  double median = 0, min = 0, max = 0;
};
Spread spread(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

// Counts, per pass, the bytes of routed-expert weights read: distinct experts per MoE layer. Per-expert
// counts are all it needs, so on the GPU it takes the tallies the router kernels keep.
class ExpertBytesSink : public RoutingSink {
 public:
  explicit ExpertBytesSink(size_t bytes_per_expert) : bytes_per_expert_(bytes_per_expert) {}
  bool counts_suffice() const override { return true; }
  void on_layer(int, int num_tokens, int top_k, std::span<const int32_t> ids, std::span<const float>) override {
    std::set<int32_t> distinct(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(num_tokens) * top_k);
    bytes += distinct.size() * bytes_per_expert_;
  }
  void on_counts(int, std::span<const int64_t> counts, std::span<const double>) override {
    bytes += static_cast<size_t>(std::count_if(counts.begin(), counts.end(), [](int64_t n) { return n > 0; })) * bytes_per_expert_;
  }
  size_t bytes = 0;

 private:
  size_t bytes_per_expert_;
};

uint64_t fnv1a(const std::vector<int32_t>& ids, uint64_t h = 0xcbf29ce484222325ull) {
  for (int32_t id : ids)
    for (int b = 0; b < 4; ++b) h = (h ^ ((static_cast<uint32_t>(id) >> (8 * b)) & 0xff)) * 0x100000001b3ull;
  return h;
}

// Floating-point operations of one forward pass over `seqs` fresh sequences of n tokens each: every
// product a token goes through (projections, router, its top-k experts and the shared expert, or the dense
// MLP), causal attention (each query against the keys up to it), and the LM head on each last row.
double forward_flops(const ModelConfig& c, int seqs, int n) {
  const double h = c.hidden_size, tokens = static_cast<double>(seqs) * n;
  double per_token = 0.0, attention = 0.0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    per_token += 2.0 * h * (c.q_size() + 2 * c.kv_size()) + 2.0 * c.q_size() * h;
    if (c.layer_is_moe[static_cast<size_t>(l)]) {
      per_token += 2.0 * h * c.num_experts + 6.0 * h * c.moe_intermediate_size * c.num_experts_per_tok;
      if (c.has_shared_expert()) per_token += 6.0 * h * c.shared_expert_intermediate_size + 2.0 * h;
    } else {
      per_token += 6.0 * h * c.intermediate_size;
    }
    attention += 2.0 * 2.0 * c.q_size() * (static_cast<double>(n) * (n + 1) / 2.0) * seqs;  // QK^T and PV
  }
  return per_token * tokens + attention + 2.0 * h * c.vocab_size * seqs;
}

std::pair<int, int> parse_prefill_shape(const std::string& text) {
  int s = 0, n = 0;
  char x = 0, rest = 0;
  if (std::sscanf(text.c_str(), "%d%c%d%c", &s, &x, &n, &rest) != 3 || (x != 'x' && x != 'X') || s < 1 || n < 1)
    fail("bench: --prefill {}: expected SEQSxTOKENS, e.g. 1x2048 or 16x512", text);
  return {s, n};
}

Json bench_model(const std::filesystem::path& dir, const std::string& label, const BenchArgs& a, const std::string& device,
                 double bandwidth_gb_s, double peak_tflops) {
  const LoadedModel model = load_model(dir);
  const std::shared_ptr<const ModelWeights>& weights = model.weights;
  const ModelConfig& c = weights->config;
  // Bytes per weight as the device holds them: the file's dtype on the CPU, bf16 on the GPU.
  const size_t dsize = device == "cuda" ? 2 : dtype_size(weights->embed_tokens.dtype);
  const size_t expert_bytes = 3 * static_cast<size_t>(c.moe_intermediate_size) * c.hidden_size * dsize;
  int64_t total_elements = 0, routed_elements = 0;
  for (const auto& [name, t] : weights->store.tensors()) total_elements += t.numel();
  for (const auto& l : weights->layers)
    for (const auto& e : l.experts) routed_elements += e.gate_proj.numel() + e.up_proj.numel() + e.down_proj.numel();
  const bool tied = weights->lm_head.data == weights->embed_tokens.data;
  // Read by every decode step whatever the routing: all but the routed experts and the embedding table
  // (of which only the batch's rows are read, unless it doubles as the LM head).
  const size_t dense_bytes = static_cast<size_t>(total_elements - routed_elements - (tied ? 0 : weights->embed_tokens.numel())) * dsize;
  const auto load_started = std::chrono::steady_clock::now();
  const std::unique_ptr<Backend> backend = make_backend(device, weights, a.backend_options);
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_started).count();

  fmt::print("\n== {} ({}: {} layers, hidden {}, {} experts top-{}, {:.1f} MB of weights) ==\n", label, c.architecture,
             c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok, weights->total_bytes() / 1e6);
  fmt::print("backend ready in {:.1f} s (weights {}on the device)\n", load_seconds, device == "cuda" ? "uploaded as bf16 " : "mapped ");
  Json result = {{"model", label}, {"architecture", c.architecture}, {"weight_bytes", weights->total_bytes()},
                 {"device", device}, {"load_seconds", load_seconds}};
  if (device == "cuda") {
    const BackendOptions& o = a.backend_options;
    fmt::print("--matmul-precision {}, --kv-cache-dtype {}, CUDA graphs {}\n", o.matmul_precision, o.kv_cache_dtype,
               o.enforce_eager ? "off" : "on");
    result["matmul_precision"] = o.matmul_precision;
    result["kv_cache_dtype"] = o.kv_cache_dtype;
  }

  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> token(0, c.vocab_size - 1);
  auto random_prompt = [&] {
    std::vector<int32_t> p(a.prompt_tokens);
    for (auto& t : p) t = token(rng);
    return p;
  };

  // Prefill: S sequences of N tokens in one pass, for each shape (a first, untimed run warms up).
  // Time to first token: one request of N tokens through an idle engine, until its first token is sampled.
  std::vector<std::string> shapes = a.prefill_shapes;
  if (shapes.empty()) shapes.push_back(fmt::format("1x{}", a.prefill_tokens > 0 ? a.prefill_tokens : a.prompt_tokens));
  Json prefills = Json::array();
  for (const std::string& shape : shapes) {
    const auto [seqs, n] = parse_prefill_shape(shape);
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(seqs), std::vector<int32_t>(static_cast<size_t>(n)));
    for (auto& p : prompts)
      for (auto& t : p) t = token(rng);
    std::vector<double> rates, ttft;
    for (int r = 0; r < a.repeats + 1; ++r) {
      Batch batch;
      for (int s = 0; s < seqs; ++s) batch.sequences.push_back({backend->create_cache(), 0, prompts[static_cast<size_t>(s)], fmt::format("p{}", s)});
      std::vector<int32_t> first;
      const auto t0 = std::chrono::steady_clock::now();
      backend->forward_greedy(batch, nullptr, first);  // as the engine runs greedy requests
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (const BatchSequence& s : batch.sequences) backend->free_cache(s.cache_id);
      if (r > 0) rates.push_back(static_cast<double>(seqs) * n / seconds);
      if (seqs == 1) {
        Engine engine(*backend, EngineOptions{1, {}});
        const auto e0 = std::chrono::steady_clock::now();
        engine.add_request({"ttft", prompts[0], SamplingParams{}, 1, true});
        engine.run_to_completion();
        if (r > 0) ttft.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count());
      }
    }
    const Spread s = spread(rates);
    const double tflops = forward_flops(c, seqs, n) * s.median / (static_cast<double>(seqs) * n) / 1e12;
    fmt::print("prefill {:>8}  {:10.1f} tok/s  (min {:.1f}, max {:.1f} over {} runs)  {:7.1f} TFLOP/s{}", shape, s.median,
               s.min, s.max, a.repeats, tflops,
               peak_tflops > 0 ? fmt::format(" = {:.2f} of the measured bf16 GEMM rate", tflops / peak_tflops) : "");
    Json row = {{"shape", shape}, {"sequences", seqs}, {"tokens", n}, {"tokens_per_s_median", s.median}, {"min", s.min},
                {"max", s.max}, {"tflops", tflops}};
    if (peak_tflops > 0) row["ratio_to_gemm_peak"] = tflops / peak_tflops;
    if (!ttft.empty()) {
      const Spread t = spread(ttft);
      fmt::print(";  time to first token {:.2f} ms (min {:.2f}, max {:.2f})", t.median * 1e3, t.min * 1e3, t.max * 1e3);
      row["ttft_ms_median"] = t.median * 1e3;
      row["ttft_ms_min"] = t.min * 1e3;
      row["ttft_ms_max"] = t.max * 1e3;
    }
    fmt::print("\n");
    prefills.push_back(std::move(row));
  }
  result["prefill"] = prefills;

  // Decode: batch_size sequences, each after a prompt of prompt_tokens, decode_tokens greedy steps.
  // The bytes a decode step must read: the weights its routes touch (every dense matrix, the embedding
  // rows of the batch, each distinct expert chosen in a layer), and every sequence's cached keys and values
  // of every layer up to its new position.
  const int kv_element_bytes = backend->kv_capacity().element_bytes;
  const double kv_bytes_per_position =
      2.0 * c.kv_size() * (kv_element_bytes > 0 ? kv_element_bytes : 4) * c.num_hidden_layers;
  fmt::print("{:>6} {:>12} {:>22} {:>14} {:>10} {:>14} {:>8}\n", "batch", "decode tok/s", "(min, max)", "weight MB/step",
             "KV MB/step", "floor tok/s", "ratio");
  uint64_t checksum = 0xcbf29ce484222325ull;
  Json decode = Json::array();
  for (int batch_size : a.batch_sizes) {
    std::vector<std::vector<int32_t>> prompts;
    for (int b = 0; b < batch_size; ++b) prompts.push_back(random_prompt());
    std::vector<double> rates;
    std::vector<int32_t> first_ids;
    double bytes_per_step = 0.0, kv_bytes_per_step = 0.0;
    bool deterministic = true;
    for (int r = 0; r < a.repeats; ++r) {
      Batch prefill;
      std::vector<int> caches;
      for (int b = 0; b < batch_size; ++b) {
        caches.push_back(backend->create_cache());
        prefill.sequences.push_back({caches.back(), 0, prompts[b], fmt::format("s{}", b)});
      }
      // Greedy steps as the engine runs them: the backend picks each sequence's argmax (on the GPU, one
      // id per sequence comes back instead of its logits).
      std::vector<int32_t> next, sampled, ids;
      backend->forward_greedy(prefill, nullptr, next);
      ExpertBytesSink sink(expert_bytes);
      double seconds = 0.0;
      for (int step = 0; step < a.decode_tokens; ++step) {
        ids.insert(ids.end(), next.begin(), next.end());
        Batch batch;
        for (int b = 0; b < batch_size; ++b)
          batch.sequences.push_back({caches[b], a.prompt_tokens + step, std::span<const int32_t>(&next[b], 1), fmt::format("s{}", b)});
        const auto t0 = std::chrono::steady_clock::now();
        backend->forward_greedy(batch, &sink, sampled);
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        next.swap(sampled);
      }
      for (int cache : caches) backend->free_cache(cache);
      rates.push_back(static_cast<double>(batch_size) * a.decode_tokens / seconds);
      bytes_per_step = static_cast<double>(dense_bytes + static_cast<size_t>(batch_size) * c.hidden_size * dsize) +
                       static_cast<double>(sink.bytes) / a.decode_tokens;
      // Step s reads positions 0 .. prompt + s of each sequence: prompt + (steps + 1) / 2 on average.
      kv_bytes_per_step = batch_size * (a.prompt_tokens + (a.decode_tokens + 1) / 2.0) * kv_bytes_per_position;
      if (r == 0) first_ids = ids;
      deterministic &= ids == first_ids;
    }
    checksum = fnv1a(first_ids, checksum);
    const Spread s = spread(rates);
    const double floor_tok_s = batch_size / ((bytes_per_step + kv_bytes_per_step) / (bandwidth_gb_s * 1e9));
    fmt::print("{:>6} {:>12.1f} {:>22} {:>14.2f} {:>10.2f} {:>14.1f} {:>8.2f}{}\n", batch_size, s.median,
               fmt::format("({:.1f}, {:.1f})", s.min, s.max), bytes_per_step / 1e6, kv_bytes_per_step / 1e6, floor_tok_s,
               s.median / floor_tok_s,
               deterministic ? "" : "  NONDETERMINISTIC");
    decode.push_back({{"batch_size", batch_size}, {"tokens_per_s_median", s.median}, {"min", s.min}, {"max", s.max},
                      {"weight_bytes_per_step", bytes_per_step}, {"kv_cache_bytes_per_step", kv_bytes_per_step},
                      {"floor_tokens_per_s", floor_tok_s},
                      {"ratio_to_floor", s.median / floor_tok_s}, {"deterministic", deterministic}});
  }
  fmt::print("checksum of generated ids: {:016x}\n", checksum);
  result["decode"] = decode;
  result["checksum"] = fmt::format("{:016x}", checksum);
  if (a.recording_overhead) result["recording_overhead"] = bench_recording_overhead(model, *backend, a.overhead);
  return result;
}

void run_bench(const BenchArgs& a) {
  const std::string device = resolve_device(a.device);
  if (a.repeats < 1 || a.prompt_tokens < 1 || a.decode_tokens < 1 || a.prefill_tokens < 0)
    fail("bench: --repeats, --prompt-tokens, --prefill-tokens and --decode-tokens must be positive");
  for (int b : a.batch_sizes)
    if (b < 1) fail("bench: batch sizes must be positive");

  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  fmt::print("moescope bench  {:%Y-%m-%d %H:%M:%S}\n", fmt::localtime(std::time(nullptr)));
  fmt::print("command: {}\n", a.command_line);
  const std::string cpu = describe_device("cpu");
  const std::string gpu = device == "cuda" ? describe_device("cuda") : "";
  fmt::print("machine: {}, {} OpenMP threads, device {}{}\n", cpu, omp_get_max_threads(), device,
             gpu.empty() ? "" : ": " + gpu);
  const DeviceBandwidth bw = measure_device_bandwidth(device);
  fmt::print("memory read bandwidth: {:.2f} GB/s best, {:.2f} median, {:.2f} min ({} runs over {:.0f} MB, {}); the floor uses the best\n",
             bw.best_gb_per_s, bw.median_gb_per_s, bw.min_gb_per_s, bw.repeats, bw.bytes / 1e6, bw.method);
  if (bw.copy_best_gb_per_s > 0)
    fmt::print("device-to-device copy kernel: {:.2f} GB/s best (bytes read + written), for comparison\n", bw.copy_best_gb_per_s);
  const DeviceCompute compute = measure_device_compute(device);
  if (compute.best_tflops > 0)
    fmt::print("bf16 tensor-core rate: {:.1f} TFLOP/s best, {:.1f} median ({}); prefill is set against the best\n",
               compute.best_tflops, compute.median_tflops, compute.method);
  Json report = {{"command", a.command_line}, {"cpu", cpu}, {"threads", omp_get_max_threads()}, {"device", device},
                 {"gpu", gpu},
                 {"bandwidth_gb_per_s", {{"best", bw.best_gb_per_s}, {"median", bw.median_gb_per_s}, {"min", bw.min_gb_per_s},
                                         {"method", bw.method}, {"copy_best", bw.copy_best_gb_per_s}}},
                 {"gemm_tflops", {{"best", compute.best_tflops}, {"median", compute.median_tflops}, {"method", compute.method}}},
                 {"models", Json::array()}};

  auto bench_dir = [&](const std::filesystem::path& dir, const std::string& label) {
    report["models"].push_back(bench_model(dir, label, a, device, bw.best_gb_per_s, compute.best_tflops));
  };
  if (!a.model.empty() || a.presets.empty()) {  // no model and no preset: the model shipped in models/
    const std::filesystem::path dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
    bench_dir(dir, a.model.empty() ? dir.filename().string() : a.model);
  } else {
    for (const std::string& preset : a.presets) {
      const auto dir = std::filesystem::temp_directory_path() / fmt::format("moescope-bench-{}-{}", preset, ::getpid());
      const auto written = std::chrono::steady_clock::now();
      write_random_checkpoint(dir, make_model_config("qwen2_moe", preset), 0);
      fmt::print("\nwrote the {} checkpoint in {:.1f} s\n", preset,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - written).count());
      try {
        bench_dir(dir, "preset " + preset + " (qwen2_moe, seed 0)");
      } catch (...) {
        std::filesystem::remove_all(dir);
        throw;
      }
      std::filesystem::remove_all(dir);
    }
  }
  if (!a.json_out.empty()) write_text_file(a.json_out, report.dump(2) + "\n");
}

}  // namespace

void add_bench(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand("bench", "Prefill/decode throughput beside the memory-bandwidth floor");
  cmd->add_option("model", args->model, "Model directory (default: the model shipped in models/; --preset instead for random ones)");
  cmd->add_option("--preset", args->presets, "Benchmark these make-model presets (qwen2_moe) instead of a directory")
      ->check(CLI::IsMember({"tiny", "small", "qwen1.5-moe-a2.7b"}));
  cmd->add_option("--prompt-tokens", args->prompt_tokens, "Prompt length before the decode steps")->capture_default_str();
  cmd->add_option("--prefill-tokens", args->prefill_tokens, "Prompt length of the prefill figure (0: --prompt-tokens)")
      ->capture_default_str();
  cmd->add_option("--prefill", args->prefill_shapes, "Prefill shapes SEQSxTOKENS, e.g. 1x2048,16x512 (default: 1x --prefill-tokens)")
      ->delimiter(',');
  cmd->add_option("--decode-tokens", args->decode_tokens, "Decode steps timed per run")->capture_default_str();
  cmd->add_option("--batch", args->batch_sizes, "Decode batch sizes")->delimiter(',')->capture_default_str();
  cmd->add_option("--repeats", args->repeats, "Runs per figure (median and spread are reported)")->capture_default_str();
  cmd->add_option("--json", args->json_out, "Also write the figures as JSON to this file");
  cmd->add_flag("--recording-overhead", args->recording_overhead,
                "Also time one workload with recording off and each recording mode on, interleaved");
  cmd->add_option("--overhead-rounds", args->overhead.rounds, "Rounds of the recording-overhead workload")->capture_default_str();
  cmd->add_option("--overhead-prompts", args->overhead.prompts, "Requests in the recording-overhead workload")->capture_default_str();
  cmd->add_option("--overhead-max-tokens", args->overhead.max_tokens, "Tokens generated per request there")->capture_default_str();
  add_device_option(cmd, args->device);
  add_gpu_options(cmd, args->backend_options);
  cmd->callback([args] {
    args->command_line = command_line;
    run_bench(*args);
  });
}

}  // namespace moescope::cli
