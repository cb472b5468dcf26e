#include "server/engine_service.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>

#include "util/error.h"

namespace moescope::server {

std::vector<ChoiceDelta> Channel::pop(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (deltas_.empty()) ready_.wait_for(lock, timeout, [&] { return !deltas_.empty(); });
  std::vector<ChoiceDelta> out(std::make_move_iterator(deltas_.begin()), std::make_move_iterator(deltas_.end()));
  deltas_.clear();
  return out;
}

void Channel::push(ChoiceDelta delta) {
  {
    std::lock_guard lock(mutex_);
    deltas_.push_back(std::move(delta));
  }
  ready_.notify_all();
}

// A request in the engine, seen from the engine thread.
struct EngineService::Live {
  GenerationRequest req;
  std::shared_ptr<Channel> channel;
  std::vector<int32_t> output_ids;
  std::string text;          // decoded output so far
  size_t emitted = 0;        // bytes of text already sent
  size_t max_stop = 0;       // longest stop string
  bool finished = false;
  double first_token_seconds = -1.0;
  std::vector<TokenRoutes> routes;  // computed, not yet delivered
};

// The sink that copies the routes of the requests that asked for them (return_routed_experts).
class EngineService::RouteTap final : public RoutingSink {
 public:
  RouteTap(const RoutingShape& shape, std::map<std::string, std::unique_ptr<Live>>& live) : shape_(shape), live_(live) {}
  int wanted = 0;  // live requests that asked for routes

  bool wants_pass() override { return wanted > 0; }
  void begin_pass(const PassInfo& pass) override {
    slots_.assign(pass.token_seq.size(), {nullptr, 0});
    for (size_t t = 0; t < pass.token_seq.size(); ++t) {
      auto it = live_.find(pass.req_ids[static_cast<size_t>(pass.token_seq[t])]);
      if (it == live_.end() || !it->second->req.return_routed_experts) continue;
      auto& routes = it->second->routes;
      routes.push_back({pass.token_pos[t], 0, {}, {}});
      slots_[t] = {it->second.get(), routes.size() - 1};
    }
  }
  void on_layer(int, int num_tokens, int top_k, std::span<const int32_t> ids, std::span<const float> weights) override {
    for (int t = 0; t < num_tokens; ++t) {
      const auto [live, index] = slots_[static_cast<size_t>(t)];
      if (live == nullptr) continue;
      TokenRoutes* r = &live->routes[index];
      r->topk_ids.insert(r->topk_ids.end(), ids.begin() + t * top_k, ids.begin() + (t + 1) * top_k);
      r->topk_weights.insert(r->topk_weights.end(), weights.begin() + t * top_k, weights.begin() + (t + 1) * top_k);
    }
  }

 private:
  const RoutingShape& shape_;
  std::map<std::string, std::unique_ptr<Live>>& live_;
  std::vector<std::pair<Live*, size_t>> slots_;  // [num_tokens] whose routes token t's are, and which entry; or null
};

EngineService::EngineService(std::unique_ptr<Backend> backend, const LoadedModel& model, EngineOptions options, RoutingSink* sink)
    : model_(model), shape_(routing_shape(model.weights->config, model.name)), options_(std::move(options)), backend_(std::move(backend)) {
  if (!model_.tokenizer) fail("{}: serving needs the model's tokenizer.json", model_.name);
  tap_ = std::make_unique<RouteTap>(shape_, live_);
  sinks_ = std::make_unique<SinkFanout>();
  if (sink != nullptr) sinks_->add(sink);
  sinks_->add(tap_.get());
  engine_ = std::make_unique<Engine>(*backend_, options_, sinks_.get());
  stats_.kv_blocks_total = engine_->kv_blocks_total();
  thread_ = std::thread([this] { run(); });
}

EngineService::~EngineService() { stop(); }

void EngineService::stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<Channel> EngineService::submit(GenerationRequest request) {
  engine_->check_request(request.request);  // a refusal is the client's 400, raised on its own thread
  auto channel = std::make_shared<Channel>();
  {
    std::lock_guard lock(mutex_);
    if (stopping_) fail("the server is shutting down");
    inbox_.emplace_back(std::move(request), channel);
    ++stats_.waiting;
  }
  wake_.notify_all();
  return channel;
}

ServiceStats EngineService::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void EngineService::finish_live(Live& live, const std::string& reason) {
  live.finished = true;
  if (live.req.return_routed_experts) --tap_->wanted;
  if (on_finish)
    on_finish(live.req, reason, static_cast<int>(live.req.request.prompt_ids.size()), static_cast<int>(live.output_ids.size()),
              live.first_token_seconds);
}

void EngineService::deliver(const std::vector<TokenEvent>& events) {
  const Tokenizer& tok = *model_.tokenizer;
  for (const TokenEvent& e : events) {
    auto it = live_.find(e.req_id);
    if (it == live_.end()) continue;
    Live& live = *it->second;
    ChoiceDelta delta;
    std::string reason = e.finish_reason;
    if (e.token >= 0) {
      if (live.first_token_seconds < 0)
        live.first_token_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - live.req.arrival).count();
      live.output_ids.push_back(e.token);
      delta.token_ids.push_back(e.token);
      if (live.req.request.logprobs >= 0) {
        delta.logprobs.push_back(e.logprob);
        delta.top_logprobs.push_back(e.top);
      }
      live.text = tok.decode(live.output_ids, /*skip_special_tokens=*/true);
    }
    // Stop strings: the output ends before the first one; search only text not yet sent.
    size_t end = live.text.size();
    for (const std::string& s : live.req.stop) {
      const size_t at = live.text.find(s, live.emitted);
      if (at != std::string::npos && at < end) {
        end = at;
        reason = "stop";
      }
    }
    if (reason == "stop" && end < live.text.size()) {
      live.text.resize(end);
      engine_->finish(e.req_id, "stop");
    }
    size_t limit = live.text.size();
    if (reason.empty()) {
      // Hold back a character cut between tokens (decoded as U+FFFD) and the tail a stop string may claim.
      static const std::string k_replacement = "\xEF\xBF\xBD";
      while (limit >= live.emitted + 3 && live.text.compare(limit - 3, 3, k_replacement) == 0) limit -= 3;
      if (live.max_stop > 1) limit = std::min(limit, live.text.size() >= live.max_stop - 1 ? live.text.size() - (live.max_stop - 1) : 0);
      limit = std::max(limit, live.emitted);
    }
    delta.text = live.text.substr(live.emitted, limit - live.emitted);
    live.emitted = limit;
    // Routes: every token the pass computed for this request, with its id.
    for (TokenRoutes& r : live.routes) {
      const size_t p = static_cast<size_t>(r.token_idx), n = live.req.request.prompt_ids.size();
      r.token_id = p < n ? live.req.request.prompt_ids[p] : live.output_ids[p - n];
    }
    delta.routes = std::move(live.routes);
    live.routes.clear();
    delta.finish_reason = reason;
    live.channel->push(std::move(delta));
    if (!reason.empty()) {
      finish_live(live, reason);
      live_.erase(it);
    }
  }
}

void EngineService::run() {
  for (;;) {
    std::deque<std::pair<GenerationRequest, std::shared_ptr<Channel>>> fresh;
    {
      std::unique_lock lock(mutex_);
      wake_.wait_for(lock, std::chrono::milliseconds(engine_->has_work() ? 0 : 50),
                     [&] { return stopping_ || !inbox_.empty() || engine_->has_work(); });
      if (stopping_) break;
      fresh.swap(inbox_);
    }
    for (auto& [req, channel] : fresh) {
      auto live = std::make_unique<Live>();
      live->req = std::move(req);
      live->channel = channel;
      for (const auto& s : live->req.stop) live->max_stop = std::max(live->max_stop, s.size());
      try {
        engine_->add_request(live->req.request);
      } catch (const Error& e) {
        ChoiceDelta d;
        d.error = e.what();
        d.finish_reason = "error";
        channel->push(std::move(d));
        continue;
      }
      if (live->req.return_routed_experts) ++tap_->wanted;
      live_[live->req.request.req_id] = std::move(live);
    }
    // Clients that went away free their sequences now.
    for (auto it = live_.begin(); it != live_.end();) {
      if (!it->second->channel->cancelled()) {
        ++it;
        continue;
      }
      engine_->finish(it->first, "abort");
      finish_live(*it->second, "abort");
      it = live_.erase(it);
    }
    if (engine_->has_work()) {
      try {
        engine_->step();
        deliver(engine_->step_tokens());
      } catch (const std::exception& e) {
        // A failing pass fails the requests in flight, not the server.
        std::fprintf(stderr, "error: forward pass failed: %s\n", e.what());
        for (auto& [id, live] : live_) {
          engine_->finish(id, "abort");
          ChoiceDelta d;
          d.error = fmt::format("the forward pass failed: {}", e.what());
          d.finish_reason = "error";
          live->channel->push(std::move(d));
          finish_live(*live, "error");
        }
        live_.clear();
      }
    }
    std::lock_guard lock(mutex_);
    stats_.running = engine_->num_running();
    stats_.waiting = engine_->num_waiting() + static_cast<int>(inbox_.size());
    stats_.kv_blocks_used = engine_->kv_blocks_used();
    stats_.passes = engine_->timing().passes;
    stats_.preemptions = engine_->timing().preemptions;
  }
  // Shutting down: whoever still waits gets an answer.
  for (auto& [id, live] : live_) {
    ChoiceDelta d;
    d.error = "the server is shutting down";
    d.finish_reason = "error";
    live->channel->push(std::move(d));
  }
  live_.clear();
  std::lock_guard lock(mutex_);
  for (auto& [req, channel] : inbox_) {
    ChoiceDelta d;
    d.error = "the server is shutting down";
    d.finish_reason = "error";
    channel->push(std::move(d));
  }
  inbox_.clear();
}

}  // namespace moescope::server
