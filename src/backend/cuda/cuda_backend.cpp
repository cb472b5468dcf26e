#include "backend/cuda/cuda_backend.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cuda_profiler_api.h>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>

#include "backend/cuda/blas.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/kernels.h"
#include "util/error.h"

namespace moescope::cuda {
namespace {

constexpr size_t k_align = 256;
constexpr double k_gib = 1024.0 * 1024.0 * 1024.0;
// Device memory kept free for the per-pass workspace and cuBLAS when sizing the KV cache.
constexpr size_t k_workspace_reserve = size_t{1} << 30;

size_t align_up(size_t n) { return (n + k_align - 1) / k_align * k_align; }
int round_up8(int n) { return (n + 7) / 8 * 8; }

// A diagnostic switch of the environment: 0 or 1, `unset` when unset or empty; any other value is an error.
bool switch_from_env(const char* name, bool unset = true) {
  const char* env = std::getenv(name);
  const std::string value = env == nullptr ? "" : env;
  if (!value.empty() && value != "0" && value != "1") fail("{}={}: expected 0 or 1", name, value);
  return value.empty() ? unset : value == "1";
}

std::set<std::string> parse_twice_stages() {
  std::set<std::string> stages;
  const char* env = std::getenv("MOESCOPE_CUDA_TWICE");
  if (env == nullptr || *env == '\0') return stages;
  static const std::set<std::string> known = {"input_norm", "qkv_proj",    "qkv_rope_cache",  "attention",    "o_proj",
                                              "post_norm",  "router_topk", "experts_gate_up", "experts_down", "lm_head"};
  std::string text = env;
  for (size_t at = 0; at <= text.size();) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string stage = text.substr(at, comma - at);
    if (known.count(stage) == 0) fail("MOESCOPE_CUDA_TWICE: unknown stage '{}'", stage);
    stages.insert(stage);
    at = comma + 1;
  }
  fmt::print(stderr, "moescope: MOESCOPE_CUDA_TWICE={}: those stages run twice (a timing diagnostic; outputs are not the model's)\n", env);
  return stages;
}

// MOESCOPE_CUDA_PROFILER_TOKENS=T: the third pass of T tokens (the first two load the modules and capture a
// decode graph) runs between cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off`
// times the kernels of that one pass. 0 when unset.
int parse_profiler_tokens() {
  const char* env = std::getenv("MOESCOPE_CUDA_PROFILER_TOKENS");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long value = std::strtol(env, &end, 10);
  if (*end != '\0' || value < 1 || value > (1 << 24))
    fail("MOESCOPE_CUDA_PROFILER_TOKENS={}: expected a number of tokens, 1 or more", env);
  return static_cast<int>(value);
}

// Bump allocator over a device arena; with a null base it only measures.
class Arena {
 public:
  explicit Arena(char* base) : base_(base) {}
  template <typename T>
  T* take(size_t count) {
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += align_up(count * sizeof(T));
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// Writes count elements of src, from element first, as bf16 (a plain copy for bf16 checkpoints).
void convert_to_bf16(uint16_t* out, const TensorView& src, int64_t first, int64_t count) {
  const int threads = count > (int64_t{1} << 20) ? omp_get_max_threads() : 1;
  if (src.dtype == DType::BF16) {
    const auto* in = static_cast<const uint16_t*>(src.data) + first;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; ++part) {
      const int64_t begin = count * part / threads, end = count * (part + 1) / threads;
      std::memcpy(out + begin, in + begin, static_cast<size_t>(end - begin) * sizeof(uint16_t));
    }
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t at = first + i;
    const float v = src.dtype == DType::F32 ? static_cast<const float*>(src.data)[at]
                                            : f16_to_f32(static_cast<const uint16_t*>(src.data)[at]);
    out[i] = f32_to_bf16(v);
  }
}

// Host-to-device weight copies through two pinned staging buffers, so that filling one overlaps the
// DMA of the other.
class Uploader {
 public:
  explicit Uploader(cudaStream_t stream) : stream_(stream) {
    for (int b = 0; b < 2; ++b) {
      staging_[b] = PinnedBuffer<uint16_t>(k_chunk_elements);
      CUDA_CHECK(cudaEventCreateWithFlags(&copied_[b], cudaEventDisableTiming));
    }
  }
  ~Uploader() {
    for (cudaEvent_t e : copied_) cudaEventDestroy(e);
  }
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;

  // dst: [src.numel()] bf16 on the device.
  void bf16_tensor(bf16* dst, const TensorView& src) {
    const int64_t n = src.numel();
    for (int64_t done = 0; done < n;) {
      const int64_t count = std::min<int64_t>(k_chunk_elements, n - done);
      CUDA_CHECK(cudaEventSynchronize(copied_[next_]));  // this buffer's previous copy has finished
      convert_to_bf16(staging_[next_].data(), src, done, count);
      CUDA_CHECK(cudaMemcpyAsync(dst + done, staging_[next_].data(), static_cast<size_t>(count) * sizeof(uint16_t),
                                 cudaMemcpyHostToDevice, stream_));
      CUDA_CHECK(cudaEventRecord(copied_[next_], stream_));
      next_ ^= 1;
      done += count;
    }
  }
  // dst: [sum of numel] f32 on the device: norms and biases, small, kept exact in f32.
  void f32_tensors(float* dst, std::initializer_list<const TensorView*> parts) {
    std::vector<float> host;
    for (const TensorView* t : parts) {
      const size_t at = host.size();
      host.resize(at + static_cast<size_t>(t->numel()));
      to_f32(t->dtype, t->data, host.data() + at, static_cast<size_t>(t->numel()));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    CUDA_CHECK(cudaMemcpy(dst, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  void finish() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  static constexpr int64_t k_chunk_elements = int64_t{32} << 20;  // 64 MB of bf16
  cudaStream_t stream_;
  PinnedBuffer<uint16_t> staging_[2];
  cudaEvent_t copied_[2] = {};
  int next_ = 0;
};

// One layer's weights on the device.
struct DeviceLayer {
  const float* input_layernorm = nullptr;           // [hidden]
  const float* post_attention_layernorm = nullptr;  // [hidden]
  const bf16* qkv = nullptr;                        // [q_size + 2 * kv_size, hidden]: q, k, v rows
  const float* qkv_bias = nullptr;                  // [q_size + 2 * kv_size] or null
  const float* q_norm = nullptr;                    // [head_dim] or [q_size] or null
  const float* k_norm = nullptr;                    // [head_dim] or [kv_size] or null
  const bf16* o_proj = nullptr;                     // [hidden, q_size]
  bool is_moe = false;
  const bf16* router = nullptr;                     // [num_experts (+1: shared_expert_gate), hidden]
  ExpertWeights ffn;                                // routed experts and shared expert, or the dense MLP
};

// What one pass computes, as the kernels see it.
struct PassShape {
  int T = 0, S = 0;            // tokens, sequences
  int max_blocks = 0;          // block-table width
  int num_decode = 0, num_tiles = 0;
  bool small = false;          // the small-batch path (f32 activations, own GEMV kernels)
  bool small_head = false;     // the LM head too
  size_t meta_ints = 0;
};

constexpr int k_graph_max_tokens = 512;  // decode passes up to this batch size run as CUDA graphs

struct SequenceBlocks {
  std::vector<int32_t> blocks;  // cache block ids, in position order
  int32_t length = 0;           // positions in the cache
};

// Device buffers of one pass, carved from the workspace arena.
struct PassBuffers {
  int32_t* meta = nullptr;         // [meta_ints] the pass's token and sequence tables (uploaded)
  float* x = nullptr;              // [T, hidden] residual stream
  float* h = nullptr;              // [T, hidden] normed
  Bf16Pair h_bf16;                 // [T, hidden] (large path; lo with --matmul-precision high)
  float* qkv = nullptr;            // [T, q_size + 2 * kv_size]
  float* q = nullptr;              // [T, q_size]
  float* attn = nullptr;           // [T, q_size]
  Bf16Pair attn_bf16;              // [T, q_size] (large path)
  float* shared_gate = nullptr;    // [T]
  float* router_logits = nullptr;  // [T, num_experts + 1] (small path: router_small's scratch)
  int32_t* groups = nullptr;       // expert_groups_ints(T * top_k, num_experts)
  float* h_small = nullptr;        // [T * top_k + T, ld_h] (small path)
  Bf16Pair hb;                     // [T * top_k, moe_inter] (large path)
  float* dense_gate_up = nullptr;  // [T, 2 * dense_inter] (large path)
  Bf16Pair dense_act;              // [T, dense_inter] (large path)
  float* ffn_out = nullptr;        // [T, max_slots, hidden]
  float* h_last = nullptr;         // [S, hidden]
  Bf16Pair h_last_bf16;            // [S, hidden]
  float* logits = nullptr;         // [S, vocab]
  unsigned long long* greedy = nullptr;  // [S] greedy_keys of the logits (forward_greedy)
  int32_t* routes = nullptr;       // [2, num_moe_layers, T, top_k]: ids, then weights (f32 bits)
  unsigned long long* tallies = nullptr;  // [2, num_moe_layers, num_experts]: selections, then weight sums (2^-32)
};

}  // namespace

struct CudaBackend::Impl {
  std::shared_ptr<const ModelWeights> weights;
  CudaBackendOptions options;
  const ModelConfig& c;
  std::string description;
  cudaStream_t stream = nullptr;
  std::unique_ptr<Blas> blas_handle;  // created once a device is known to be there
  // Large passes' shared expert (cuBLAS) beside the routed experts: a second stream that forks from
  // `stream` after the post-attention norm and joins it after the routed experts' down products, with a
  // cuBLAS handle of its own. MOESCOPE_CUDA_SHARED_STREAM=0 keeps it on `stream`.
  bool shared_stream_on = switch_from_env("MOESCOPE_CUDA_SHARED_STREAM");
  // Prefill passes' shared expert as dense tiles of the routed experts' grouped launches, spread among
  // their tiles (MOESCOPE_CUDA_SHARED_GROUPED=1), instead of through cuBLAS.
  bool shared_grouped_on = switch_from_env("MOESCOPE_CUDA_SHARED_GROUPED", false);
  cudaStream_t side_stream = nullptr;
  cudaEvent_t fork_event = nullptr, join_event = nullptr;
  std::unique_ptr<Blas> side_blas;

  DeviceBuffer<char> weight_arena;
  std::vector<DeviceLayer> layers;
  const bf16* embed_tokens = nullptr;  // [vocab, hidden]
  const float* norm = nullptr;         // [hidden]
  const bf16* lm_head = nullptr;       // [vocab, hidden]
  const float* rope_inv_freq = nullptr;  // [head_dim / 2]
  std::vector<int> moe_layers;         // layer index of each MoE layer
  int ld_h = 0;                        // row pitch of the small path's SwiGLU outputs
  int dense_inter_max = 0;             // widest dense group (shared expert or dense MLP)
  int max_slots = 1;                   // feed-forward output slots per token

  // Paged KV cache: per layer [num_blocks * block_size, kv_size] bf16.
  int64_t num_blocks = 0;
  DeviceBuffer<bf16> k_cache, v_cache;      // bf16 cache (the default)
  DeviceBuffer<float> k_cache32, v_cache32;  // f32 cache (options.kv_cache_f32), the other pair stays empty
  std::vector<int32_t> free_blocks;
  std::unordered_map<int, SequenceBlocks> caches;
  int next_cache_id = 0;

  DeviceBuffer<char> workspace;
  DeviceBuffer<unsigned> router_ticket;  // router_small's last-block ticket (zeroed once, reset by the kernel)
  DeviceBuffer<float> decode_split_partials;  // decode rows split over their positions (AttentionBatch)
  DeviceBuffer<unsigned> decode_split_tickets;
  PinnedBuffer<int32_t> meta_host;
  PinnedBuffer<float> logits_host;
  PinnedBuffer<unsigned long long> greedy_host;
  PinnedBuffer<int32_t> routes_host;
  PinnedBuffer<unsigned long long> tallies_host;
  std::vector<int64_t> layer_counts;  // one MoE layer's tallies for RoutingSink::on_counts
  std::vector<double> layer_weight_sums;

  Impl(std::shared_ptr<const ModelWeights> w, CudaBackendOptions o) : weights(std::move(w)), options(o), c(weights->config) {}
  ~Impl() {
    print_profile();
    for (cudaEvent_t e : profile_events) cudaEventDestroy(e);
    drop_graphs();
    if (side_stream != nullptr) {
      cudaStreamSynchronize(side_stream);
      side_blas.reset();
      cudaStreamDestroy(side_stream);
      cudaEventDestroy(fork_event);
      cudaEventDestroy(join_event);
    }
    if (stream == nullptr) return;
    cudaStreamSynchronize(stream);
    blas_handle.reset();
    cudaStreamDestroy(stream);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  // Decode passes as CUDA graphs, one per batch size (tokens), captured on first use.
  std::map<int, cudaGraphExec_t> graphs;
  std::set<int> eager_seen;  // batch sizes already run once eagerly

  // MOESCOPE_CUDA_PROFILE=1: events between stages, summed per stage and printed at the end. Graphs
  // are off then (events inside would time the graph's nodes, not the eager launches).
  bool profile = switch_from_env("MOESCOPE_CUDA_PROFILE", false);
  // MOESCOPE_CUDA_TWICE=attention,router_topk,...: a diagnostic that launches those stages twice, so that
  // a benchmark's difference with and without it is what the stage costs inside a replayed graph (launch
  // gaps and warm caches included, which per-kernel profilers leave out). The outputs are then not the
  // model's. Stages: input_norm qkv_proj qkv_rope_cache attention o_proj post_norm router_topk
  // experts_gate_up experts_down lm_head.
  std::set<std::string> twice_stages = parse_twice_stages();
  int reps(const char* stage) const { return twice_stages.count(stage) > 0 ? 2 : 1; }
  const int profiler_tokens = parse_profiler_tokens();
  int profiler_passes_seen = 0;
  std::vector<cudaEvent_t> profile_events;
  std::vector<const char*> mark_names;
  size_t num_marks = 0;
  std::map<std::string, std::pair<double, int64_t>> stage_ms;  // "small T=1 attention" -> (total ms, count)
  std::map<std::string, int64_t> profiled_passes;

  void check_shapes() const;
  size_t place_weights(Arena& arena, Uploader* up);
  void upload_weights();
  void size_kv_cache();
  PassBuffers carve(Arena& arena, int num_tokens, int num_seqs, size_t meta_ints) const;
  // One of logits (every row) and tokens (each row's argmax, picked on the device) is given.
  void forward(const Batch& batch, RoutingSink* sink, std::vector<float>* logits, std::vector<int32_t>* tokens);
  void run_layers(const PassBuffers& p, const PassShape& shape);
  void drop_graphs();
  void mark(const char* stage);
  void collect_marks(const PassShape& shape);
  void print_profile() const;
};

void CudaBackend::Impl::check_shapes() const {
  auto need8 = [&](const char* what, int n) {
    if (n % 8 != 0) fail("CUDA backend: {} is {}; the CUDA kernels need a multiple of 8", what, n);
  };
  need8("hidden_size", c.hidden_size);
  need8("head_dim", c.head_dim);
  if (c.head_dim > 256) fail("CUDA backend: head_dim {} is larger than the 256 the attention kernels take", c.head_dim);
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0)
    fail("CUDA backend: num_attention_heads {} is not a multiple of num_key_value_heads {}", c.num_attention_heads,
         c.num_key_value_heads);
  if (c.num_moe_layers() > 0) {
    need8("moe_intermediate_size", c.moe_intermediate_size);
    if (c.num_experts_per_tok > 32) fail("CUDA backend: num_experts_per_tok {} is more than 32", c.num_experts_per_tok);
    if (c.has_shared_expert()) need8("shared_expert_intermediate_size", c.shared_expert_intermediate_size);
  }
  if (c.num_moe_layers() < c.num_hidden_layers) need8("intermediate_size", c.intermediate_size);
  if (options.block_size < 1) fail("CUDA backend: block size must be positive");
  if (options.small_batch_max_tokens > k_small_batch_max_tokens)
    fail("CUDA backend: small_batch_max_tokens is at most {}", k_small_batch_max_tokens);
}

// Lays out (and with an uploader, copies) every weight. Matrices are bf16; norms and biases f32.
size_t CudaBackend::Impl::place_weights(Arena& arena, Uploader* up) {
  const ModelWeights& w = *weights;
  auto matrix = [&](std::initializer_list<const TensorView*> parts) -> const bf16* {
    size_t n = 0;
    for (const TensorView* t : parts) n += static_cast<size_t>(t->numel());
    bf16* p = arena.take<bf16>(n);
    if (up != nullptr) {
      size_t at = 0;
      for (const TensorView* t : parts) {
        up->bf16_tensor(p + at, *t);
        at += static_cast<size_t>(t->numel());
      }
    }
    return p;
  };
  auto vectors = [&](std::initializer_list<const TensorView*> parts) -> const float* {
    size_t n = 0;
    for (const TensorView* t : parts) {
      if (t->empty()) return nullptr;
      n += static_cast<size_t>(t->numel());
    }
    float* p = arena.take<float>(n);
    if (up != nullptr) up->f32_tensors(p, parts);
    return p;
  };

  embed_tokens = matrix({&w.embed_tokens});
  norm = vectors({&w.norm});
  lm_head = w.lm_head.data == w.embed_tokens.data ? embed_tokens : matrix({&w.lm_head});
  {
    std::vector<float> inv_freq;  // as the CPU backend (HF's default RoPE), in f32
    for (int i = 0; i < c.head_dim / 2; ++i)
      inv_freq.push_back(1.0f / std::pow(static_cast<float>(c.rope_theta),
                                         static_cast<float>(2 * i) / static_cast<float>(c.head_dim)));
    float* p = arena.take<float>(inv_freq.size());
    if (up != nullptr) CUDA_CHECK(cudaMemcpy(p, inv_freq.data(), inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
    rope_inv_freq = p;
  }

  layers.assign(c.num_hidden_layers, {});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    DeviceLayer& d = layers[l];
    d.input_layernorm = vectors({&lw.input_layernorm});
    d.post_attention_layernorm = vectors({&lw.post_attention_layernorm});
    d.qkv = matrix({&lw.q_proj, &lw.k_proj, &lw.v_proj});
    d.qkv_bias = c.attention_bias ? vectors({&lw.q_bias, &lw.k_bias, &lw.v_bias}) : nullptr;
    d.q_norm = c.qk_norm != QkNorm::None ? vectors({&lw.q_norm}) : nullptr;
    d.k_norm = c.qk_norm != QkNorm::None ? vectors({&lw.k_norm}) : nullptr;
    d.o_proj = matrix({&lw.o_proj});
    d.is_moe = lw.is_moe;
    if (!lw.is_moe) {
      d.ffn.dense_gate_up = matrix({&lw.mlp.gate_proj, &lw.mlp.up_proj});
      d.ffn.dense_down = matrix({&lw.mlp.down_proj});
      d.ffn.dense_inter = c.intermediate_size;
      continue;
    }
    d.router = c.has_shared_expert() ? matrix({&lw.router, &lw.shared_expert_gate}) : matrix({&lw.router});
    // Stacked experts: gate then up rows of expert 0, of expert 1, ...; then every down.
    size_t gate_up_n = 0, down_n = 0;
    for (const MlpWeights& e : lw.experts) {
      gate_up_n += static_cast<size_t>(e.gate_proj.numel() + e.up_proj.numel());
      down_n += static_cast<size_t>(e.down_proj.numel());
    }
    bf16* gate_up = arena.take<bf16>(gate_up_n);
    bf16* down = arena.take<bf16>(down_n);
    if (up != nullptr) {
      size_t at = 0, at_down = 0;
      for (const MlpWeights& e : lw.experts) {
        up->bf16_tensor(gate_up + at, e.gate_proj);
        at += static_cast<size_t>(e.gate_proj.numel());
        up->bf16_tensor(gate_up + at, e.up_proj);
        at += static_cast<size_t>(e.up_proj.numel());
        up->bf16_tensor(down + at_down, e.down_proj);
        at_down += static_cast<size_t>(e.down_proj.numel());
      }
    }
    d.ffn.gate_up = gate_up;
    d.ffn.down = down;
    d.ffn.inter = c.moe_intermediate_size;
    if (c.has_shared_expert()) {
      d.ffn.dense_gate_up = matrix({&lw.shared_expert.gate_proj, &lw.shared_expert.up_proj});
      d.ffn.dense_down = matrix({&lw.shared_expert.down_proj});
      d.ffn.dense_inter = c.shared_expert_intermediate_size;
    }
  }
  return arena.used();
}

void CudaBackend::Impl::upload_weights() {
  Arena measure(nullptr);
  const size_t need = place_weights(measure, nullptr);
  size_t free = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free, &total));
  if (need > free)
    fail("CUDA backend: the weights need {:.2f} GiB of GPU memory in bf16, but {} has {:.2f} GiB free (of {:.2f} GiB)",
         need / k_gib, description, free / k_gib, total / k_gib);
  weight_arena = DeviceBuffer<char>(need);
  Arena arena(weight_arena.data());
  Uploader up(stream);
  place_weights(arena, &up);
  up.finish();
}

void CudaBackend::Impl::size_kv_cache() {
  const int bs = options.block_size;
  const size_t element_bytes = options.kv_cache_f32 ? sizeof(float) : sizeof(bf16);
  const size_t bytes_per_block = 2 * static_cast<size_t>(c.num_hidden_layers) * bs * c.kv_size() * element_bytes;
  size_t free = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free, &total));
  if (options.max_kv_tokens > 0) {
    num_blocks = (options.max_kv_tokens + bs - 1) / bs;
    if (static_cast<double>(num_blocks) * bytes_per_block > static_cast<double>(free))
      fail("CUDA backend: a KV cache of {} tokens needs {:.2f} GiB, {} has {:.2f} GiB free after the weights",
           num_blocks * bs, num_blocks * bytes_per_block / k_gib, description, free / k_gib);
  } else {
    // vLLM's rule: weights, cache and workspace together take gpu_memory_utilization of the GPU.
    const double usable = static_cast<double>(total) * options.gpu_memory_utilization - static_cast<double>(total - free) -
                          static_cast<double>(k_workspace_reserve);
    num_blocks = usable > 0 ? static_cast<int64_t>(usable / static_cast<double>(bytes_per_block)) : 0;
    if (num_blocks < 1)
      fail("CUDA backend: no GPU memory left for the KV cache: {} has {:.2f} GiB of {:.2f} GiB free after the weights; "
           "gpu_memory_utilization {} and {:.2f} GiB of workspace leave {:.2f} GiB, one block of {} tokens needs {:.1f} MiB",
           description, free / k_gib, total / k_gib, options.gpu_memory_utilization, k_workspace_reserve / k_gib,
           usable / k_gib, bs, bytes_per_block / 1048576.0);
  }
  const size_t elements = static_cast<size_t>(c.num_hidden_layers) * num_blocks * bs * c.kv_size();
  if (options.kv_cache_f32) {
    k_cache32 = DeviceBuffer<float>(elements);
    v_cache32 = DeviceBuffer<float>(elements);
  } else {
    k_cache = DeviceBuffer<bf16>(elements);
    v_cache = DeviceBuffer<bf16>(elements);
  }
  free_blocks.resize(static_cast<size_t>(num_blocks));
  for (int64_t b = 0; b < num_blocks; ++b) free_blocks[static_cast<size_t>(b)] = static_cast<int32_t>(num_blocks - 1 - b);
}

PassBuffers CudaBackend::Impl::carve(Arena& a, int num_tokens, int num_seqs, size_t meta_ints) const {
  const size_t T = static_cast<size_t>(num_tokens), S = static_cast<size_t>(num_seqs);
  const size_t hidden = static_cast<size_t>(c.hidden_size), q = static_cast<size_t>(c.q_size());
  const size_t top_k = static_cast<size_t>(std::max(c.num_experts_per_tok, 0));
  const bool small = num_tokens <= options.small_batch_max_tokens;
  PassBuffers p;
  p.meta = a.take<int32_t>(meta_ints);
  p.x = a.take<float>(T * hidden);
  p.h = a.take<float>(T * hidden);
  // The bf16 terms of the tensor-core products' activations: hi, and lo with --matmul-precision high.
  auto take_pair = [&](size_t n) {
    Bf16Pair pair{a.take<bf16>(n)};
    if (options.matmul_precision_high) pair.lo = a.take<bf16>(n);
    return pair;
  };
  p.h_bf16 = take_pair(small ? 0 : T * hidden);
  p.qkv = a.take<float>(T * (q + 2 * static_cast<size_t>(c.kv_size())));
  p.q = a.take<float>(T * q);
  p.attn = a.take<float>(T * q);
  p.attn_bf16 = take_pair(small ? 0 : T * q);
  p.shared_gate = a.take<float>(T);
  p.router_logits = a.take<float>(small ? T * (static_cast<size_t>(std::max(c.num_experts, 0)) + 1) : 0);
  p.groups = a.take<int32_t>(static_cast<size_t>(expert_groups_ints(num_tokens * c.num_experts_per_tok, c.num_experts)));
  p.h_small = a.take<float>(small ? (T * top_k + T) * static_cast<size_t>(ld_h) : 0);
  p.hb = take_pair(small ? 0 : T * top_k * static_cast<size_t>(c.moe_intermediate_size));
  p.dense_gate_up = a.take<float>(small ? 0 : T * 2 * static_cast<size_t>(dense_inter_max));
  p.dense_act = take_pair(small ? 0 : T * static_cast<size_t>(dense_inter_max));
  p.ffn_out = a.take<float>(T * static_cast<size_t>(max_slots) * hidden);
  p.h_last = a.take<float>(S * hidden);
  p.h_last_bf16 = take_pair(S * hidden);
  p.logits = a.take<float>(S * static_cast<size_t>(c.vocab_size));
  p.greedy = a.take<unsigned long long>(S);
  p.routes = a.take<int32_t>(2 * moe_layers.size() * T * top_k);
  p.tallies = a.take<unsigned long long>(2 * moe_layers.size() * static_cast<size_t>(std::max(c.num_experts, 0)));
  return p;
}

void CudaBackend::Impl::mark(const char* stage) {
  if (!profile) return;
  if (num_marks == profile_events.size()) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    profile_events.push_back(e);
    mark_names.push_back(nullptr);
  }
  CUDA_CHECK(cudaEventRecord(profile_events[num_marks], stream));
  mark_names[num_marks++] = stage;
}

void CudaBackend::Impl::collect_marks(const PassShape& shape) {
  if (!profile || num_marks == 0) return;
  const std::string prefix = fmt::format("{} T={}", shape.small ? "small" : "large", shape.T);
  for (size_t i = 1; i < num_marks; ++i) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, profile_events[i - 1], profile_events[i]));
    auto& [total, count] = stage_ms[prefix + " " + mark_names[i]];
    total += ms;
    ++count;
  }
  ++profiled_passes[prefix];
  num_marks = 0;
}

void CudaBackend::Impl::print_profile() const {
  if (!profile || stage_ms.empty()) return;
  std::string text = "CUDA stage times (MOESCOPE_CUDA_PROFILE; events between stages, summed over layers):\n";
  for (const auto& [name, value] : stage_ms) {
    const std::string pass = name.substr(0, name.find(' ', name.find(' ') + 1));
    const int64_t passes = profiled_passes.at(pass);
    text += fmt::format("  {:<40} {:9.3f} ms per pass ({} passes)\n", name, value.first / passes, passes);
  }
  fmt::print(stderr, "{}", text);
}

// Every kernel of one pass, embeddings to logits, on the stream (captured into a graph for decodes).
void CudaBackend::Impl::run_layers(const PassBuffers& p, const PassShape& sh) {
  const int T = sh.T, S = sh.S, bs = options.block_size;
  const int hidden = c.hidden_size, q_size = c.q_size(), kv_size = c.kv_size(), top_k = c.num_experts_per_tok;
  const bool small = sh.small;
  Blas& blas = *blas_handle;
  const int32_t* d_token_ids = p.meta;
  const int32_t* d_token_pos = d_token_ids + T;
  const int32_t* d_token_seq = d_token_pos + T;
  const int32_t* d_slots = d_token_seq + T;
  const int32_t* d_block_tables = d_slots + T;
  const int32_t* d_decode_rows = d_block_tables + static_cast<size_t>(S) * sh.max_blocks;
  const int32_t* d_last_rows = d_decode_rows + sh.num_decode;
  const auto* d_tiles = reinterpret_cast<const PrefillTile*>(d_last_rows + S);

  AttentionBatch ab;
  ab.block_tables = d_block_tables;
  ab.max_blocks = sh.max_blocks;
  ab.block_size = bs;
  ab.prefill_tiles = d_tiles;
  ab.num_prefill_tiles = sh.num_tiles;
  ab.decode_rows = d_decode_rows;
  ab.num_decode = sh.num_decode;
  ab.token_seq = d_token_seq;
  ab.token_pos = d_token_pos;
  ab.split_partials = decode_split_partials.data();
  ab.split_tickets = decode_split_tickets.data();

  const int num_pairs = T * top_k;
  const ExpertGroups groups = carve_expert_groups(p.groups, num_pairs, c.num_experts);
  const size_t layer_cache = static_cast<size_t>(num_blocks) * bs * kv_size;
  const int qkv_width = q_size + 2 * kv_size;
  auto* route_weights = reinterpret_cast<float*>(p.routes + moe_layers.size() * static_cast<size_t>(num_pairs));
  const QkNormKind qk_norm = c.qk_norm == QkNorm::Full      ? QkNormKind::Full
                             : c.qk_norm == QkNorm::PerHead ? QkNormKind::PerHead
                                                            : QkNormKind::None;

  mark("start");
  const size_t tally_count = moe_layers.size() * static_cast<size_t>(c.num_experts);
  if (tally_count > 0)  // the router kernels add every selection into these: the recorder's counts, always on
    CUDA_CHECK(cudaMemsetAsync(p.tallies, 0, 2 * tally_count * sizeof(unsigned long long), stream));
  embed(p.x, embed_tokens, d_token_ids, T, hidden, stream);                                   // embeddings
  mark("embed");
  FfnFold pending;  // the previous layer's feed-forward output, added by the next RMSNorm
  // One token (a decode step of one sequence): the down kernel adds the feed-forward output into x itself
  // and the q/k/v product norms x, so the input RMSNorm has no kernel of its own (down_fold_allowed).
  const bool fold_in_down = small && T == 1 && down_fold_allowed();
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const DeviceLayer& L = layers[l];
    // f(k, v) with this layer's part of the KV cache, f32 (--kv-cache-dtype float32) or bf16.
    auto with_cache = [&](auto&& f) {
      if (options.kv_cache_f32) f(k_cache32.data() + l * layer_cache, v_cache32.data() + l * layer_cache);
      else f(k_cache.data() + l * layer_cache, v_cache.data() + l * layer_cache);
    };
    if (!fold_in_down)
      for (int r = reps("input_norm"); r-- > 0;)
        rms_norm(small ? p.h : nullptr, small ? Bf16Pair{} : p.h_bf16, p.x, nullptr, T, hidden, L.input_layernorm,
                 c.rms_norm_eps, pending, stream);                                             // residual += ffn; pre-norm
    mark("input_norm");
    for (int r = reps("qkv_proj"); r-- > 0;) {
      if (fold_in_down) gemv_normed(p.qkv, p.x, L.input_layernorm, c.rms_norm_eps, L.qkv, qkv_width, hidden, stream);
      else if (small) gemv(p.qkv, qkv_width, p.h, L.qkv, T, qkv_width, hidden, false, stream);  // q, k, v
      else blas.gemm(p.qkv, qkv_width, p.h_bf16, L.qkv, T, qkv_width, hidden, 0.0f);
    }
    mark("qkv_proj");
    const QkvParams qp{c.num_attention_heads, c.num_key_value_heads, c.head_dim, L.qkv_bias, qk_norm, L.q_norm,
                       L.k_norm, c.rms_norm_eps, c.clip_qkv, rope_inv_freq};
    for (int r = reps("qkv_rope_cache"); r-- > 0;)
      with_cache([&](auto* k_cache_l, auto* v_cache_l) {
        qkv_rope_cache(p.q, k_cache_l, v_cache_l, p.qkv, d_token_pos, d_slots, T, qp, stream);  // bias, norm, RoPE, cache
      });
    mark("qkv_rope_cache");
    for (int r = reps("attention"); r-- > 0;)
      with_cache([&](auto* k_cache_l, auto* v_cache_l) {
        attention(p.attn, small ? Bf16Pair{} : p.attn_bf16, p.q, k_cache_l, v_cache_l, ab, c.num_attention_heads,
                  c.num_key_value_heads, c.head_dim, stream);                                  // causal GQA
      });
    mark("attention");
    for (int r = reps("o_proj"); r-- > 0;) {
      if (small) gemv(p.x, hidden, p.attn, L.o_proj, T, hidden, q_size, true, stream);        // residual += o_proj
      else blas.gemm(p.x, hidden, p.attn_bf16, L.o_proj, T, hidden, q_size, 1.0f);
    }
    mark("o_proj");
    const ExpertWeights& f = L.ffn;
    // A large pass's dense group (shared expert or dense MLP) through cuBLAS on stream s:
    // out [T, ld_out] = down(SwiGLU(gate_up(h))), through dense_gate_up and dense_act.
    auto dense_mlp_cublas = [&](Blas& b, cudaStream_t s, float* out, int ld_out) {
      b.gemm(p.dense_gate_up, 2 * f.dense_inter, p.h_bf16, f.dense_gate_up, T, 2 * f.dense_inter, hidden, 0.0f);
      swiglu_bf16(p.dense_act, p.dense_gate_up, T, f.dense_inter, s);
      b.gemm(out, ld_out, p.dense_act, f.dense_down, T, hidden, f.dense_inter, 0.0f);
    };
    // A small pass's MoE layer norms inside its router launch; every other layer here.
    if (!(small && L.is_moe))
      for (int r = reps("post_norm"); r-- > 0;)
        rms_norm(p.h, small ? Bf16Pair{} : p.h_bf16, p.x, nullptr, T, hidden, L.post_attention_layernorm, c.rms_norm_eps,
                 {}, stream);                                                                  // pre-norm
    mark("post_norm");
    if (L.is_moe) {
      int32_t* ids = p.routes + static_cast<size_t>(moe_index) * num_pairs;
      float* weights_l = route_weights + static_cast<size_t>(moe_index) * num_pairs;
      float* shared_gate = c.has_shared_expert() ? p.shared_gate : nullptr;
      const int slots_l = top_k + (c.has_shared_expert() ? 1 : 0);
      unsigned long long* tally_l = p.tallies + static_cast<size_t>(moe_index) * c.num_experts;
      const ExpertCounts counts{tally_l, tally_l + tally_count};
      // The shared expert of a large pass: in the grouped launches for decode batches, else through cuBLAS.
      const bool dense_grouped =
          f.dense_gate_up != nullptr && !small && (shared_grouped_on || grouped_takes_dense(T, c.num_experts, top_k));
      const bool cublas_shared = !small && f.dense_gate_up != nullptr && !dense_grouped;
      float* const shared_slot = p.ffn_out + static_cast<size_t>(top_k) * hidden;
      // Through cuBLAS it runs on the side stream, issued first: it needs only the normed rows, and its
      // products are compute-bound where the routed experts' grouped GEMMs are bound by memory, so its
      // blocks fill what the router, the grouping and the grouped launches leave of the GPU. Its slot of
      // ffn_out is its own; the join comes before the fold.
      const bool side_work = cublas_shared && side_stream != nullptr;
      if (side_work) {
        CUDA_CHECK(cudaEventRecord(fork_event, stream));
        CUDA_CHECK(cudaStreamWaitEvent(side_stream, fork_event));
        dense_mlp_cublas(*side_blas, side_stream, shared_slot, slots_l * hidden);
        CUDA_CHECK(cudaEventRecord(join_event, side_stream));
      }
      for (int r = reps("router_topk"); r-- > 0;) {                                            // routes -> pass buffer
        if (small)  // + the post-attention norm and the grouping
          router_small(ids, weights_l, shared_gate, p.h, p.x, L.post_attention_layernorm, c.rms_norm_eps, L.router, T,
                       hidden, c.num_experts, top_k, c.norm_topk_prob, groups, counts, p.router_logits,
                       router_ticket.data(), stream);
        else
          router_topk(ids, weights_l, shared_gate, p.h, L.router, T, hidden, c.num_experts, top_k, c.norm_topk_prob,
                      stream, counts);
      }
      mark("router_topk");
      if (!small) align_by_expert(groups, ids, num_pairs, c.num_experts, stream);              // pairs by expert
      mark("align_by_expert");
      if (small) {
        for (int r = reps("experts_gate_up"); r-- > 0;)
          experts_gate_up_small(p.h_small, ld_h, p.h, f, groups, T, hidden, c.num_experts, top_k, stream,
                                dense_norm_allowed() ? DenseNorm{p.x, L.post_attention_layernorm, c.rms_norm_eps}
                                                     : DenseNorm{});  // the shared expert beside the router
        mark("experts_gate_up (+shared)");
        for (int r = reps("experts_down"); r-- > 0;) {
          if (fold_in_down)  // x += experts + shared
            experts_down_fold(p.x, p.h_small, ld_h, ids, weights_l, shared_gate, f, hidden, top_k, stream);
          else
            experts_down_small(p.ffn_out, slots_l, p.h_small, ld_h, weights_l, f, groups, T, hidden, c.num_experts,
                               top_k, stream);                                                 // experts + shared
        }
        mark("experts_down (+shared)");
      } else {
        for (int r = reps("experts_gate_up"); r-- > 0;)
          experts_gate_up_grouped(p.hb, p.h_bf16, f, groups, T, hidden, c.num_experts, top_k, stream,
                                  dense_grouped ? p.dense_act : Bf16Pair{});
        mark(dense_grouped ? "experts_gate_up (+shared)" : "experts_gate_up");
        for (int r = reps("experts_down"); r-- > 0;)
          experts_down_grouped(p.ffn_out, slots_l, p.hb, weights_l, f, groups, T, hidden, c.num_experts, top_k, stream,
                               dense_grouped ? ConstBf16Pair(p.dense_act) : ConstBf16Pair{});
        mark(dense_grouped ? "experts_down (+shared)" : "experts_down");
        if (side_work) CUDA_CHECK(cudaStreamWaitEvent(stream, join_event));  // the shared expert's slot
        if (cublas_shared && !side_work) {                                                       // shared expert
          dense_mlp_cublas(blas, stream, shared_slot, slots_l * hidden);
          mark("shared_expert");
        }
      }
      pending = fold_in_down ? FfnFold{} : FfnFold{p.ffn_out, slots_l, shared_gate};
      ++moe_index;
    } else {  // dense SwiGLU MLP: the dense group alone, into slot 0
      if (small) {
        experts_gate_up_small(p.h_small, ld_h, p.h, f, groups, T, hidden, 0, 0, stream);
        if (fold_in_down) experts_down_fold(p.x, p.h_small, ld_h, nullptr, nullptr, nullptr, f, hidden, 0, stream);
        else experts_down_small(p.ffn_out, 1, p.h_small, ld_h, nullptr, f, groups, T, hidden, 0, 0, stream);
      } else {
        dense_mlp_cublas(blas, stream, p.ffn_out, hidden);
      }
      mark("dense_mlp");
      pending = fold_in_down ? FfnFold{} : FfnFold{p.ffn_out, 1, nullptr};
    }
  }
  rms_norm(p.h_last, sh.small_head ? Bf16Pair{} : p.h_last_bf16, p.x, d_last_rows, S, hidden, norm, c.rms_norm_eps,
           pending, stream);                                                                   // final norm, last rows
  mark("final_norm");
  for (int r = reps("lm_head"); r-- > 0;) {
    if (sh.small_head) gemv(p.logits, c.vocab_size, p.h_last, lm_head, S, c.vocab_size, hidden, false, stream);  // LM head
    else blas.gemm(p.logits, c.vocab_size, p.h_last_bf16, lm_head, S, c.vocab_size, hidden, 0.0f);
  }
  mark("lm_head");
}

void CudaBackend::Impl::forward(const Batch& batch, RoutingSink* sink, std::vector<float>* logits,
                                std::vector<int32_t>* tokens) {
  const auto started = std::chrono::steady_clock::now();
  const int bs = options.block_size;
  const int top_k = c.num_experts_per_tok;
  const int num_seqs = static_cast<int>(batch.sequences.size());
  if (num_seqs == 0) fail("forward: empty batch");
  if (sink != nullptr && !sink->wants_pass()) sink = nullptr;  // nothing records this pass: no route copy
  const bool want_routes = sink != nullptr && !sink->counts_suffice();

  // Check the batch and give every sequence the cache blocks its new positions need.
  int num_tokens = 0, max_blocks = 0, num_decode = 0, num_tiles = 0;
  for (const BatchSequence& seq : batch.sequences) {
    auto it = caches.find(seq.cache_id);
    if (it == caches.end()) fail("forward: unknown KV cache {}", seq.cache_id);
    if (it->second.length != seq.start_pos)
      fail("forward: sequence {} starts at {} but its cache holds {} positions", seq.req_id, seq.start_pos, it->second.length);
    if (seq.tokens.empty()) fail("forward: sequence {} has no tokens", seq.req_id);
    const int64_t end = seq.start_pos + static_cast<int64_t>(seq.tokens.size());
    if (c.max_position_embeddings > 0 && end > c.max_position_embeddings)
      fail("forward: sequence {} would reach {} positions; the model allows {}", seq.req_id, end, c.max_position_embeddings);
    for (int32_t id : seq.tokens)
      if (id < 0 || id >= c.vocab_size) fail("forward: token id {} out of range (vocab_size {})", id, c.vocab_size);
    std::vector<int32_t>& blocks = it->second.blocks;
    const size_t need = static_cast<size_t>((end + bs - 1) / bs);
    if (need > blocks.size() && need - blocks.size() > free_blocks.size())
      fail("CUDA KV cache full: sequence {} needs {} more blocks of {} tokens, {} of {} are free "
           "(raise --gpu-memory-utilization or run fewer sequences at once)",
           seq.req_id, need - blocks.size(), bs, free_blocks.size(), num_blocks);
    while (blocks.size() < need) {
      blocks.push_back(free_blocks.back());
      free_blocks.pop_back();
    }
    num_tokens += static_cast<int>(seq.tokens.size());
    max_blocks = std::max(max_blocks, static_cast<int>(blocks.size()));
    if (seq.tokens.size() == 1) ++num_decode;
    else num_tiles += static_cast<int>((seq.tokens.size() + k_prefill_tile_rows - 1) / k_prefill_tile_rows);
  }
  PassShape sh;
  sh.T = num_tokens;
  sh.S = num_seqs;
  sh.small = sh.T <= options.small_batch_max_tokens;
  sh.small_head = sh.S <= options.small_batch_max_tokens;
  // A pass of decodes only runs as a CUDA graph captured once per batch size: the block tables then
  // take their widest shape, so that one graph serves every length.
  const int blocks_cap = c.max_position_embeddings > 0 ? (c.max_position_embeddings + bs - 1) / bs : 0;
  const bool use_graph = options.cuda_graphs && num_decode == num_seqs && blocks_cap >= max_blocks &&
                         sh.T <= k_graph_max_tokens && !profile;
  if (use_graph) max_blocks = blocks_cap;
  sh.max_blocks = max_blocks;
  sh.num_decode = num_decode;
  sh.num_tiles = num_tiles;
  const int T = sh.T, S = sh.S;

  // The pass's tables, uploaded in one copy: token ids, positions, sequences, cache slots, block
  // tables, decode rows, each sequence's last row, prefill tiles.
  sh.meta_ints = 4 * static_cast<size_t>(T) + static_cast<size_t>(S) * max_blocks + num_decode + S + 4 * static_cast<size_t>(num_tiles);
  if (meta_host.size() < sh.meta_ints) meta_host = PinnedBuffer<int32_t>(sh.meta_ints * 2);
  int32_t* token_ids = meta_host.data();
  int32_t* token_pos = token_ids + T;
  int32_t* token_seq = token_pos + T;
  int32_t* slots = token_seq + T;
  int32_t* block_tables = slots + T;
  int32_t* decode_rows = block_tables + static_cast<size_t>(S) * max_blocks;
  int32_t* last_rows = decode_rows + num_decode;
  auto* tiles = reinterpret_cast<PrefillTile*>(last_rows + S);
  {
    int row = 0, decode = 0, tile = 0;
    for (int s = 0; s < S; ++s) {
      const BatchSequence& seq = batch.sequences[s];
      const std::vector<int32_t>& blocks = caches.at(seq.cache_id).blocks;
      std::copy(blocks.begin(), blocks.end(), block_tables + static_cast<size_t>(s) * max_blocks);
      std::fill(block_tables + static_cast<size_t>(s) * max_blocks + blocks.size(), block_tables + static_cast<size_t>(s + 1) * max_blocks, 0);
      const int n = static_cast<int>(seq.tokens.size());
      for (int i = 0; i < n; ++i) {
        const int32_t pos = seq.start_pos + i;
        token_ids[row + i] = seq.tokens[i];
        token_pos[row + i] = pos;
        token_seq[row + i] = s;
        slots[row + i] = blocks[pos / bs] * bs + pos % bs;
      }
      if (n == 1) decode_rows[decode++] = row;
      else
        for (int i = 0; i < n; i += k_prefill_tile_rows)
          tiles[tile++] = {s, row + i, std::min(k_prefill_tile_rows, n - i), seq.start_pos + i};
      row += n;
      last_rows[s] = row - 1;
    }
  }

  // Workspace for this pass (grown when a pass needs more; graphs hold its addresses, so they go too).
  Arena measure(nullptr);
  carve(measure, T, S, sh.meta_ints);
  if (measure.used() > workspace.size()) {
    size_t free = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &total));
    const size_t want = measure.used() + measure.used() / 4;
    if (want > free + workspace.size())
      fail("CUDA backend: a pass of {} tokens needs {:.2f} GiB of workspace, {} has {:.2f} GiB free", T,
           want / k_gib, description, free / k_gib);
    CUDA_CHECK(cudaStreamSynchronize(stream));
    drop_graphs();
    workspace = DeviceBuffer<char>();
    workspace = DeviceBuffer<char>(want);
  }
  Arena arena(workspace.data());
  const PassBuffers p = carve(arena, T, S, sh.meta_ints);
  CUDA_CHECK(cudaMemcpyAsync(p.meta, meta_host.data(), sh.meta_ints * sizeof(int32_t), cudaMemcpyHostToDevice, stream));

  const bool profiler_range = profiler_tokens == T && ++profiler_passes_seen == 3;
  if (profiler_range) CUDA_CHECK(cudaProfilerStart());
  // The first decode pass of a batch size runs eagerly (it loads every kernel's module, which lazy
  // loading would otherwise do inside the capture); the second captures the graph.
  if (use_graph && graphs.count(T) == 0 && eager_seen.insert(T).second) {
    run_layers(p, sh);
  } else if (use_graph) {
    auto it = graphs.find(T);
    if (it == graphs.end()) {
      cudaGraph_t graph = nullptr;
      CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      try {
        run_layers(p, sh);
      } catch (...) {
        cudaStreamEndCapture(stream, &graph);
        if (graph != nullptr) cudaGraphDestroy(graph);
        throw;
      }
      CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      CUDA_CHECK(instantiated);
      it = graphs.emplace(T, exec).first;
    }
    CUDA_CHECK(cudaGraphLaunch(it->second, stream));
  } else {
    run_layers(p, sh);
  }

  if (profiler_range) CUDA_CHECK(cudaProfilerStop());
  const size_t num_logits = static_cast<size_t>(S) * c.vocab_size;
  if (tokens != nullptr) {  // S keys instead of S x vocab logits
    greedy_keys(p.greedy, p.logits, S, c.vocab_size, stream);
    if (greedy_host.size() < static_cast<size_t>(S)) greedy_host = PinnedBuffer<unsigned long long>(static_cast<size_t>(S));
    CUDA_CHECK(cudaMemcpyAsync(greedy_host.data(), p.greedy, S * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
  } else {
    if (logits_host.size() < num_logits) logits_host = PinnedBuffer<float>(num_logits);
    CUDA_CHECK(cudaMemcpyAsync(logits_host.data(), p.logits, num_logits * sizeof(float), cudaMemcpyDeviceToHost, stream));
  }
  // The pass's one copy of what its sink records: every token's routes, or only the per-layer tallies
  // the router kernels kept (M x E selections and weight sums, whatever the number of tokens).
  const int num_pairs = T * top_k;
  const size_t route_ints = 2 * moe_layers.size() * static_cast<size_t>(num_pairs);
  const size_t tally_count = moe_layers.size() * static_cast<size_t>(c.num_experts);
  if (want_routes && route_ints > 0) {
    if (routes_host.size() < route_ints) routes_host = PinnedBuffer<int32_t>(route_ints);
    CUDA_CHECK(cudaMemcpyAsync(routes_host.data(), p.routes, route_ints * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  } else if (sink != nullptr && tally_count > 0) {
    if (tallies_host.size() < 2 * tally_count) tallies_host = PinnedBuffer<unsigned long long>(2 * tally_count);
    CUDA_CHECK(cudaMemcpyAsync(tallies_host.data(), p.tallies, 2 * tally_count * sizeof(unsigned long long),
                               cudaMemcpyDeviceToHost, stream));
  }
  mark("copy_out");
  std::optional<PassInfo> pass;  // built while the GPU works
  if (sink != nullptr) pass = make_pass_info(batch);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  collect_marks(sh);

  if (tokens != nullptr) {
    tokens->resize(static_cast<size_t>(S));
    for (int s = 0; s < S; ++s) (*tokens)[s] = greedy_token(greedy_host.data()[s]);
  } else {
    logits->resize(num_logits);
    const int copy_threads = num_logits > (size_t{1} << 20) ? std::min(8, omp_get_max_threads()) : 1;
#pragma omp parallel for num_threads(copy_threads) schedule(static)
    for (int part = 0; part < copy_threads; ++part) {
      const size_t begin = num_logits * part / copy_threads, end = num_logits * (part + 1) / copy_threads;
      std::memcpy(logits->data() + begin, logits_host.data() + begin, (end - begin) * sizeof(float));
    }
  }
  for (const BatchSequence& seq : batch.sequences)
    caches.at(seq.cache_id).length = seq.start_pos + static_cast<int32_t>(seq.tokens.size());

  if (sink != nullptr) {
    sink->begin_pass(*pass);
    if (want_routes) {
      const int32_t* host_ids = routes_host.data();
      const auto* host_weights = reinterpret_cast<const float*>(host_ids + moe_layers.size() * static_cast<size_t>(num_pairs));
      for (size_t m = 0; m < moe_layers.size(); ++m)
        sink->on_layer(moe_layers[m], T, top_k,
                       std::span<const int32_t>(host_ids + m * num_pairs, static_cast<size_t>(num_pairs)),
                       std::span<const float>(host_weights + m * num_pairs, static_cast<size_t>(num_pairs)));
    } else {
      const size_t E = static_cast<size_t>(c.num_experts);
      layer_counts.resize(E);
      layer_weight_sums.resize(E);
      for (size_t m = 0; m < moe_layers.size(); ++m) {
        const unsigned long long* counts = tallies_host.data() + m * E;
        const unsigned long long* sums = counts + tally_count;
        for (size_t e = 0; e < E; ++e) {
          layer_counts[e] = static_cast<int64_t>(counts[e]);
          layer_weight_sums[e] = static_cast<double>(sums[e]) * k_weight_sum_unit;
        }
        sink->on_counts(moe_layers[m], layer_counts, layer_weight_sums);
      }
    }
    sink->end_pass(*pass, std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
}

void CudaBackend::Impl::drop_graphs() {
  for (auto& [tokens, exec] : graphs) cudaGraphExecDestroy(exec);
  graphs.clear();
}

CudaBackend::CudaBackend(std::shared_ptr<const ModelWeights> weights, CudaBackendOptions options)
    : impl_(std::make_unique<Impl>(std::move(weights), options)) {
  Impl& m = *impl_;
  std::string why;
  if (!device_available(&why)) fail("--device cuda: no CUDA device available ({})", why);
  m.check_shapes();
  m.description = cuda::device_description();
  // Programmatic dependent launch where the GPU has it (sm_90): each kernel of a pass starts while the one
  // before it finishes. MOESCOPE_CUDA_PDL=0 turns it off (a diagnostic: the same results, launched plainly).
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  set_programmatic_launch(major >= 9 && switch_from_env("MOESCOPE_CUDA_PDL"));
  // The grouped GEMMs of large passes on wgmma where the GPU runs the sm_90a code; MOESCOPE_CUDA_WGMMA=0
  // keeps them on mma.sync (a diagnostic). Probed here, before any graph is captured.
  set_wgmma_allowed(switch_from_env("MOESCOPE_CUDA_WGMMA"));
  set_expert_tails_allowed(switch_from_env("MOESCOPE_CUDA_TAIL"));  // an expert's last rows with its full tile
  set_router_staged_allowed(switch_from_env("MOESCOPE_CUDA_ROUTER_STAGED"));  // x in shared memory
  set_dense_norm_allowed(switch_from_env("MOESCOPE_CUDA_DENSE_NORM"));  // shared expert beside router_small
  set_down_fold_allowed(switch_from_env("MOESCOPE_CUDA_DOWN_FOLD", false));  // one token: no input norm kernel
  wgmma_available();
  CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  m.blas_handle = std::make_unique<Blas>();
  // The side stream has the same priority: with the pass's stream first (greatest priority) the 1x2048
  // prefill took 27.66 to 27.86 ms on the H100, with both equal 27.36 to 27.48 (16x512 within 1%).
  if (m.shared_stream_on && !m.profile && m.c.has_shared_expert()) {  // events time the main stream alone
    CUDA_CHECK(cudaStreamCreateWithFlags(&m.side_stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&m.fork_event, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&m.join_event, cudaEventDisableTiming));
    m.side_blas = std::make_unique<Blas>();
    m.side_blas->set_stream(m.side_stream);
  }
  m.router_ticket = DeviceBuffer<unsigned>(1);
  CUDA_CHECK(cudaMemset(m.router_ticket.data(), 0, sizeof(unsigned)));
  m.decode_split_partials = DeviceBuffer<float>(static_cast<size_t>(decode_split_floats(m.c.head_dim)));
  m.decode_split_tickets = DeviceBuffer<unsigned>(static_cast<size_t>(decode_split_blocks()));
  CUDA_CHECK(cudaMemset(m.decode_split_tickets.data(), 0, m.decode_split_tickets.bytes()));
  m.blas_handle->set_stream(m.stream);
  const ModelConfig& c = m.c;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.layer_is_moe[l]) m.moe_layers.push_back(l);
  int widest = 0;
  if (!m.moe_layers.empty()) {
    widest = std::max(widest, c.moe_intermediate_size);
    if (c.has_shared_expert()) m.dense_inter_max = c.shared_expert_intermediate_size;
    m.max_slots = c.num_experts_per_tok + (c.has_shared_expert() ? 1 : 0);
  }
  if (static_cast<int>(m.moe_layers.size()) < c.num_hidden_layers) m.dense_inter_max = std::max(m.dense_inter_max, c.intermediate_size);
  m.ld_h = round_up8(std::max(widest, m.dense_inter_max));
  m.upload_weights();
  m.size_kv_cache();
}

CudaBackend::~CudaBackend() = default;

const ModelConfig& CudaBackend::config() const { return impl_->c; }

int CudaBackend::create_cache() {
  const int id = impl_->next_cache_id++;
  impl_->caches[id] = {};
  return id;
}

void CudaBackend::free_cache(int cache_id) {
  auto it = impl_->caches.find(cache_id);
  if (it == impl_->caches.end()) return;
  for (int32_t b : it->second.blocks) impl_->free_blocks.push_back(b);
  impl_->caches.erase(it);
}

void CudaBackend::forward(const Batch& batch, RoutingSink* sink, std::vector<float>& logits) {
  impl_->forward(batch, sink, &logits, nullptr);
}

void CudaBackend::forward_greedy(const Batch& batch, RoutingSink* sink, std::vector<int32_t>& tokens) {
  impl_->forward(batch, sink, nullptr, &tokens);
}

KvCapacity CudaBackend::kv_capacity() const {
  return {impl_->num_blocks, impl_->options.block_size, impl_->options.kv_cache_f32 ? 4 : 2};
}

size_t CudaBackend::weight_bytes() const { return impl_->weight_arena.size(); }

std::string CudaBackend::device_description() const { return impl_->description; }

}  // namespace moescope::cuda
