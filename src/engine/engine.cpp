#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "util/error.h"

namespace moescope {

Engine::Engine(Backend& backend, EngineOptions options, RoutingSink* sink)
    : backend_(backend), options_(std::move(options)), sink_(sink) {
  // A backend with a fixed cache (a GPU's) sets the blocks and bounds the budget: the engine then never
  // sends a pass that would find the cache full, and preempts instead.
  const KvCapacity cap = backend_.kv_capacity();
  if (cap.blocks > 0) options_.block_size = cap.block_size;
  if (options_.block_size < 1) fail("engine: block size must be positive");
  if (options_.kv_cache_tokens > 0) total_blocks_ = options_.kv_cache_tokens / options_.block_size;
  if (options_.kv_cache_tokens > 0 && total_blocks_ < 1)
    fail("engine: a KV budget of {} tokens holds no block of {} tokens", options_.kv_cache_tokens, options_.block_size);
  if (cap.blocks > 0) total_blocks_ = total_blocks_ > 0 ? std::min(total_blocks_, cap.blocks) : cap.blocks;
}

int64_t Engine::blocks_for(size_t tokens) const {
  return (static_cast<int64_t>(tokens) + options_.block_size - 1) / options_.block_size;
}

void Engine::add_request(Request request) {
  check_request(request);
  auto seq = std::make_unique<Sequence>(Sequence{request, request.prompt_ids, 0, -1, 0, Sampler(request.sampling), next_order_++});
  waiting_.push_back(std::move(seq));
}

void Engine::check_request(const Request& request) const {
  const ModelConfig& c = backend_.config();
  if (request.prompt_ids.empty()) fail("request {}: empty prompt", request.req_id);
  for (int32_t id : request.prompt_ids)
    if (id < 0 || id >= c.vocab_size) fail("request {}: token id {} out of range (vocab_size {})", request.req_id, id, c.vocab_size);
  if (request.max_tokens < 1) fail("request {}: max_tokens must be at least 1", request.req_id);
  if (total_blocks_ > 0 && blocks_for(request.prompt_ids.size() + 1) > total_blocks_)
    fail("request {}: a prompt of {} tokens can never fit in the KV cache ({} tokens)", request.req_id,
         request.prompt_ids.size(), total_blocks_ * options_.block_size);
}

bool Engine::is_eos(const Sequence& seq, int32_t token) const {
  return !seq.request.ignore_eos &&
         std::find(options_.eos_token_ids.begin(), options_.eos_token_ids.end(), token) != options_.eos_token_ids.end();
}

bool Engine::at_length_limit(const Sequence& seq) const {
  const int generated = static_cast<int>(seq.tokens.size() - seq.request.prompt_ids.size());
  const int max_len = backend_.config().max_position_embeddings;
  return generated >= seq.request.max_tokens || (max_len > 0 && static_cast<int>(seq.tokens.size()) >= max_len);
}

void Engine::release(Sequence& seq) {
  if (seq.cache_id >= 0) backend_.free_cache(seq.cache_id);
  seq.cache_id = -1;
  used_blocks_ -= seq.blocks;
  seq.blocks = 0;
  seq.num_computed = 0;
}

RequestOutput Engine::output_of(const Sequence& seq, const std::string& reason) const {
  return {seq.request.req_id, seq.request.prompt_ids,
          std::vector<int32_t>(seq.tokens.begin() + static_cast<std::ptrdiff_t>(seq.request.prompt_ids.size()), seq.tokens.end()),
          reason, seq.order};
}

void Engine::preempt_for_decodes() {
  if (total_blocks_ == 0) return;
  // Each running sequence computes its pending tokens this pass: it needs blocks for all its tokens.
  auto needed = [&] {
    int64_t extra = 0;
    for (const auto& s : running_) extra += std::max<int64_t>(0, blocks_for(s->tokens.size()) - s->blocks);
    return extra;
  };
  while (!running_.empty() && used_blocks_ + needed() > total_blocks_) {
    std::unique_ptr<Sequence> victim = std::move(running_.back());  // the most recently admitted
    running_.pop_back();
    release(*victim);
    ++timing_.preemptions;
    waiting_.push_front(std::move(victim));
  }
  for (auto& s : running_) {
    const int64_t want = blocks_for(s->tokens.size());
    used_blocks_ += want - s->blocks;
    s->blocks = want;
  }
}

void Engine::admit() {
  // First come, first served: the head of the queue waits until it fits; nothing overtakes it.
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_num_seqs) {
    Sequence& seq = *waiting_.front();
    const int64_t want = blocks_for(seq.tokens.size());
    if (total_blocks_ > 0 && used_blocks_ + want > total_blocks_) break;
    seq.cache_id = backend_.create_cache();
    seq.blocks = want;
    used_blocks_ += want;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

std::optional<RequestOutput> Engine::finish(const std::string& req_id, const std::string& reason) {
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
    if ((*it)->request.req_id == req_id) {
      RequestOutput out = output_of(**it, reason);
      waiting_.erase(it);
      return out;
    }
  for (auto it = running_.begin(); it != running_.end(); ++it)
    if ((*it)->request.req_id == req_id) {
      RequestOutput out = output_of(**it, reason);
      release(**it);
      running_.erase(it);
      return out;
    }
  return std::nullopt;
}

namespace {

// logprob of `token` and the k best, from the raw logits: log_softmax in double.
void fill_logprobs(std::span<const float> logits, int k, TokenEvent& event) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  const double log_z = max + std::log(sum);
  event.logprob = static_cast<float>(logits[static_cast<size_t>(event.token)] - log_z);
  if (k <= 0) return;
  std::vector<int32_t> ids(logits.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  const auto top = ids.begin() + std::min<std::ptrdiff_t>(k, static_cast<std::ptrdiff_t>(ids.size()));
  std::partial_sort(ids.begin(), top, ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  for (auto it = ids.begin(); it != top; ++it) event.top.emplace_back(*it, static_cast<float>(logits[static_cast<size_t>(*it)] - log_z));
}

}  // namespace

std::vector<RequestOutput> Engine::step() {
  events_.clear();
  std::vector<RequestOutput> done;
  preempt_for_decodes();
  // A sequence that outgrew the whole budget alone (a budget below the model's length) ends here.
  while (total_blocks_ > 0 && !waiting_.empty() && blocks_for(waiting_.front()->tokens.size()) > total_blocks_) {
    done.push_back(output_of(*waiting_.front(), "length"));
    events_.push_back({waiting_.front()->request.req_id, -1, 0.0f, {}, "length"});
    waiting_.pop_front();
  }
  admit();
  if (running_.empty()) return done;

  Batch batch;
  batch.forward_pass_id = next_pass_id_++;
  int64_t prefill_tokens = 0;
  for (const auto& seq : running_) {
    const std::span<const int32_t> fresh(seq->tokens.data() + seq->num_computed, seq->tokens.size() - seq->num_computed);
    if (fresh.size() > 1 || seq->num_computed == 0) prefill_tokens += static_cast<int64_t>(fresh.size());
    batch.sequences.push_back({seq->cache_id, seq->num_computed, fresh, seq->request.req_id});
  }
  // Greedy sequences that want no logprobs need only each row's argmax: the backend picks it (on the GPU,
  // a copy of S ids instead of S x vocab logits).
  const bool greedy_only = std::all_of(running_.begin(), running_.end(), [](const auto& seq) {
    return seq->request.sampling.temperature <= 0.0f && seq->request.logprobs < 0;
  });
  const auto started = std::chrono::steady_clock::now();
  std::vector<float> logits;    // [num_sequences, vocab]
  std::vector<int32_t> greedy;  // [num_sequences] when greedy_only
  if (greedy_only) backend_.forward_greedy(batch, sink_, greedy);
  else backend_.forward(batch, sink_, logits);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  ++timing_.passes;
  if (prefill_tokens > 0) {
    timing_.prefill_seconds += seconds;
    timing_.prefill_tokens += prefill_tokens;
  } else {
    timing_.decode_seconds += seconds;
    timing_.decode_tokens += static_cast<int64_t>(running_.size());
  }

  const size_t vocab = static_cast<size_t>(backend_.config().vocab_size);
  for (size_t s = 0; s < running_.size(); ++s) {
    Sequence& seq = *running_[s];
    seq.num_computed = static_cast<int32_t>(seq.tokens.size());
    TokenEvent event{seq.request.req_id, -1, 0.0f, {}, ""};
    if (greedy_only) {
      event.token = greedy[s];
    } else {
      const std::span<const float> row(logits.data() + s * vocab, vocab);
      event.token = seq.sampler.sample(row);
      if (seq.request.logprobs >= 0) fill_logprobs(row, seq.request.logprobs, event);
    }
    const bool eos = is_eos(seq, event.token);
    if (eos) event.token = -1;  // the eos id ends the sequence and is not part of the output
    else seq.tokens.push_back(event.token);
    if (eos || at_length_limit(seq)) {
      event.finish_reason = eos ? "stop" : "length";
      done.push_back(output_of(seq, event.finish_reason));
      release(seq);
      running_[s].reset();
    }
    events_.push_back(std::move(event));
  }
  std::erase_if(running_, [](const auto& seq) { return !seq; });
  return done;
}

std::vector<RequestOutput> Engine::run_to_completion(const StepCallback& after_step) {
  std::vector<RequestOutput> all;
  while (has_work()) {
    auto finished = step();
    const bool go_on = !after_step || after_step(finished);
    for (auto& out : finished) all.push_back(std::move(out));
    if (!go_on) break;
  }
  std::stable_sort(all.begin(), all.end(), [](const RequestOutput& a, const RequestOutput& b) { return a.order < b.order; });
  return all;
}

}  // namespace moescope
