#include "engine/engine.h"

#include <algorithm>
#include <chrono>

#include "util/error.h"

namespace moescope {

Engine::Engine(Backend& backend, EngineOptions options, RoutingSink* sink)
    : backend_(backend), options_(std::move(options)), sink_(sink) {}

void Engine::add_request(Request request) {
  const ModelConfig& c = backend_.config();
  if (request.prompt_ids.empty()) fail("request {}: empty prompt", request.req_id);
  for (int32_t id : request.prompt_ids)
    if (id < 0 || id >= c.vocab_size) fail("request {}: token id {} out of range (vocab_size {})", request.req_id, id, c.vocab_size);
  if (request.max_tokens < 1) fail("request {}: max_tokens must be at least 1", request.req_id);
  auto seq = std::make_unique<Sequence>(Sequence{request, request.prompt_ids, 0, -1, Sampler(request.sampling), next_order_++});
  waiting_.push_back(std::move(seq));
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

std::vector<RequestOutput> Engine::step() {
  // Admit waiting requests while there is room; their prefill joins the running decodes.
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_num_seqs) {
    waiting_.front()->cache_id = backend_.create_cache();
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  if (running_.empty()) return {};

  Batch batch;
  batch.forward_pass_id = next_pass_id_++;
  int64_t prefill_tokens = 0;
  for (const auto& seq : running_) {
    const std::span<const int32_t> fresh(seq->tokens.data() + seq->num_computed, seq->tokens.size() - seq->num_computed);
    if (seq->num_computed == 0) prefill_tokens += static_cast<int64_t>(fresh.size());
    batch.sequences.push_back({seq->cache_id, seq->num_computed, fresh, seq->request.req_id});
  }
  const auto started = std::chrono::steady_clock::now();
  std::vector<float> logits;  // [num_sequences, vocab]
  backend_.forward(batch, sink_, logits);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  ++timing_.passes;
  if (prefill_tokens > 0) {
    timing_.prefill_seconds += seconds;
    timing_.prefill_tokens += prefill_tokens;
  } else {
    timing_.decode_seconds += seconds;
    timing_.decode_tokens += static_cast<int64_t>(running_.size());
  }

  std::vector<RequestOutput> done;
  const size_t vocab = static_cast<size_t>(backend_.config().vocab_size);
  for (size_t s = 0; s < running_.size(); ++s) {
    Sequence& seq = *running_[s];
    seq.num_computed = static_cast<int32_t>(seq.tokens.size());
    const int32_t token = seq.sampler.sample(std::span<const float>(logits.data() + s * vocab, vocab));
    const bool eos = is_eos(seq, token);
    if (!eos) seq.tokens.push_back(token);
    if (eos || at_length_limit(seq)) {
      RequestOutput out{seq.request.req_id, seq.request.prompt_ids,
                        std::vector<int32_t>(seq.tokens.begin() + static_cast<std::ptrdiff_t>(seq.request.prompt_ids.size()), seq.tokens.end()),
                        eos ? "stop" : "length", seq.order};
      done.push_back(std::move(out));
      backend_.free_cache(seq.cache_id);
      running_[s].reset();
    }
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
