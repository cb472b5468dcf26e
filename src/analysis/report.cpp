#include "analysis/report.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <numeric>

#include "analysis/class_routing.h"
#include "analysis/metrics.h"
#include "analysis/outputs_file.h"
#include "analysis/plot.h"
#include "analysis/plot_style.h"
#include "analysis/route_reader.h"
#include "analysis/timing.h"
#include "analysis/token_class.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

namespace fs = std::filesystem;
using plot::percent;
using plot::thousands;

constexpr int k_json_top_experts = 10;  // top_experts kept per distribution in the JSON
constexpr int k_summary_top_experts = 3;

// Parsed --layer: nullopt is "all".
std::optional<int> parse_layer(const std::string& s) {
  if (s == "all") return std::nullopt;
  int v = -1;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 0)
    fail("--layer must be a layer number or \"all\", not \"{}\"", s);
  return v;
}

void prepare_out_dir(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the output directory: {}", dir.string(), ec.message());
  if (!fs::is_directory(dir)) fail("{}: exists and is not a directory", dir.string());
  // Checked before reading a routes file that may take minutes, not after.
  if (::access(dir.c_str(), W_OK) != 0) fail("{}: the output directory is not writable", dir.string());
}

std::string layer_list(const std::vector<int>& layers) {
  // 0,1,2,3,7 -> "0-3, 7"
  std::string out;
  for (size_t i = 0; i < layers.size();) {
    size_t j = i;
    while (j + 1 < layers.size() && layers[j + 1] == layers[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j > i + 1 ? fmt::format("{}-{}", layers[i], layers[j])
                     : j == i + 1 ? fmt::format("{}, {}", layers[i], layers[j]) : std::to_string(layers[i]);
    i = j + 1;
  }
  return out;
}

std::string malformed_text(const MalformedLine& m) { return fmt::format("line {}: {}", m.line, m.reason); }

Json input_json(const ReportOptions& o, const RouteData& d) {
  Json examples = Json::array();
  for (const MalformedLine& m : d.malformed_examples) examples.push_back({{"line", m.line}, {"reason", m.reason}});
  Json meta = nullptr;
  if (d.meta.present) {
    meta = {{"model_id", d.meta.model_id}, {"moescope_version", d.meta.moescope_version}, {"layers", d.meta.layers}};
    meta["num_layers"] = d.meta.num_layers ? Json(*d.meta.num_layers) : Json(nullptr);
    meta["num_experts"] = d.meta.num_experts ? Json(*d.meta.num_experts) : Json(nullptr);
    meta["top_k"] = d.meta.top_k ? Json(*d.meta.top_k) : Json(nullptr);
  }
  Json j = {{"path", o.routes.string()},
            {"lines_read", d.lines_read},
            {"records_used", d.records_used},
            {"malformed_lines", d.malformed_lines},
            {"malformed_examples", examples},
            {"skipped_lines", d.skipped_lines},
            {"meta", meta},
            {"num_experts", d.num_experts},
            {"num_experts_source", to_string(d.num_experts_source)},
            {"layers", d.layers()},
            {"requests", d.requests},
            {"tokens", d.tokens},
            {"records_without_token", d.records_without_token},
            {"ranks", d.ranks}};
  j["top_k"] = d.top_k ? Json(*d.top_k) : Json(nullptr);
  j["forward_passes"] = d.forward_passes ? Json(*d.forward_passes) : Json(nullptr);
  // The route records do not say whether a token was part of the prompt or generated.
  j["prompt_tokens"] = nullptr;
  j["generated_tokens"] = nullptr;
  return j;
}

struct LayerMetrics {
  int layer;
  DistributionMetrics m;
};

std::string distribution_text(const DistributionMetrics& m) {
  const int shown = std::min<int>(k_summary_top_experts, m.num_experts);
  std::string s = shown == 1 ? std::string("Top expert:\n") : fmt::format("Top-{} experts:\n", shown);
  double top_share = 0;
  for (size_t i = 0; i < m.top_experts.size() && i < k_summary_top_experts; ++i) {
    const ExpertShare& t = m.top_experts[i];
    s += fmt::format("  {}. Expert {}: {} selections ({})\n", i + 1, t.expert, thousands(t.count), percent(t.share));
    top_share += t.share;
  }
  if (shown > 1)
    s += fmt::format("  together {} of all selections (uniform routing: {})\n", percent(top_share),
                     percent(static_cast<double>(shown) / m.num_experts));
  s += "Distribution:\n";
  s += fmt::format("  Shannon entropy: {:.3f} bits\n", m.entropy_bits);
  s += fmt::format("  Max entropy:     {:.3f} bits (for {} expert{})\n", m.max_entropy_bits, m.num_experts,
                   m.num_experts == 1 ? "" : "s");
  s += fmt::format("  Load balance:    {:.3f} ({} of perfect balance)\n", m.normalized_entropy,
                   percent(m.normalized_entropy));
  s += fmt::format("  Gini {:.3f}, coefficient of variation {:.3f}, max/mean {:.2f}, {} of {} experts used\n", m.gini,
                   m.coefficient_of_variation, m.max_mean_ratio, m.experts_used, m.num_experts);
  return s;
}

// The tokenizer that decodes the tokens file's ids: a model directory's tokenizer.json, or the file.
Tokenizer load_tokenizer(const fs::path& path) {
  if (fs::is_regular_file(path)) return Tokenizer::from_file(path);
  if (!fs::is_directory(path)) fail("{}: no such model directory or tokenizer.json (--model)", path.string());
  std::optional<Tokenizer> tokenizer = Tokenizer::from_model_dir(path);
  if (!tokenizer)
    fail("{}: the model directory has no tokenizer.json, which --tokens needs to classify the tokens", path.string());
  return std::move(*tokenizer);
}

// The token-class analysis of every layer, with what it was made from.
struct ClassReport {
  ClassRouting routing;
  std::vector<LayerClassMetrics> layers;
};

Json token_classes_json(const ReportOptions& o, const RouteData& d, const ClassReport& c) {
  Json classes = Json::array();
  for (TokenClass k : k_token_classes) classes.push_back(to_string(k));
  Json layers = Json::array();
  for (const LayerClassMetrics& m : c.layers) layers.push_back(to_json(m));
  Json j = {{"moescope_version", MOESCOPE_VERSION},
            {"model_id", d.meta.model_id},
            {"routes_path", o.routes.string()},
            {"tokens_path", o.tokens->string()},
            {"tokenizer_path", o.tokenizer.string()},
            {"classes", classes},
            {"num_experts", d.num_experts},
            {"requests", c.routing.requests},
            {"routed_requests", c.routing.routed_requests},
            {"prompt_tokens", c.routing.prompt_tokens},
            {"generated_tokens", c.routing.generated_tokens},
            {"tokens_without_routes", c.routing.tokens_without_routes},
            {"layers", layers},
            {"notes", c.routing.notes}};
  j["top_k"] = d.top_k ? Json(*d.top_k) : Json(nullptr);
  return j;
}

std::string token_classes_text(const ReportOptions& o, const ClassReport& c) {
  std::string s =
      fmt::format("Token classes (tokens of {}, tokenizer {}):\n", o.tokens->string(), o.tokenizer.string());
  s += fmt::format("  {} requests; routed tokens: {} prompt, {} generated\n", thousands(c.routing.requests),
                   thousands(c.routing.prompt_tokens), thousands(c.routing.generated_tokens));
  // Every logged layer routes the same tokens in a routing log: the first layer's classes stand for all.
  const LayerClassMetrics& first = c.layers.front();
  std::string by_class;
  for (size_t k = 0; k < k_num_token_classes; ++k) {
    const int64_t n = first.classes[k].tokens;
    if (n == 0) continue;
    by_class += fmt::format("{}{} {} ({})", by_class.empty() ? "" : ", ", to_string(k_token_classes[k]), thousands(n),
                            percent(static_cast<double>(n) / static_cast<double>(first.all.tokens)));
  }
  s += fmt::format("  tokens by class (layer {}): {}\n", first.layer, by_class);
  s += "  layer  MI bits  (chance)  MI/H(class)  strongest class -> expert (share, lift)  prompt/generated TV\n";
  for (const LayerClassMetrics& m : c.layers) {
    const std::string strongest =
        m.strongest ? fmt::format("{} -> {} ({}, {:.2f}x)", to_string(m.strongest->token_class),
                                  m.strongest->top.expert, percent(m.strongest->top.share), m.strongest->top.lift)
                    : std::string("-");
    const std::string tv = m.total_variation ? fmt::format("{:.3f}", *m.total_variation) : std::string("-");
    s += fmt::format("  {:>5}  {:>7.3f}  ({:>6.3f})  {:>11}  {:<41}  {:>19}\n", m.layer, m.mutual_information_bits,
                     m.mutual_information_chance_bits, percent(m.normalized_mutual_information), strongest, tv);
  }
  return s;
}

TokenClassPlot token_class_plot(const RouteData& d, const ClassReport& c, const std::string& experts_text) {
  TokenClassPlot p;
  p.model_id = d.meta.model_id;
  p.num_experts = d.num_experts;
  p.subtitle = fmt::format(
      "{} prompt + {} generated tokens of {} requests \u00b7 {} \u00b7 rows: groups of tokens, "
      "columns: experts",
      thousands(c.routing.prompt_tokens), thousands(c.routing.generated_tokens), thousands(c.routing.requests),
      experts_text);
  // Classes that no layer routed are left out; the others get a row in every panel.
  std::vector<size_t> shown;
  for (size_t k = 0; k < k_num_token_classes; ++k)
    for (const LayerClassMetrics& m : c.layers)
      if (m.classes[k].tokens > 0) {
        shown.push_back(k);
        break;
      }
  auto row = [](std::string label, const ExpertRow& r, bool with_lift, bool gap) {
    TokenClassRow out;
    out.label = std::move(label);
    out.tokens = r.tokens;
    out.shares = r.shares;
    out.gap_before = gap;
    if (r.top) {
      out.top_expert = r.top->expert;
      out.top_share = r.top->share;
      if (with_lift) out.lift = r.top->lift;
    }
    return out;
  };
  for (const LayerClassMetrics& m : c.layers) {
    TokenClassPanel panel;
    panel.title = fmt::format("Layer {}", m.layer);
    panel.note = fmt::format("I(class; expert) {:.3f} bits = {} of H(class) \u00b7 prompt/generated TV {}",
                             m.mutual_information_bits, percent(m.normalized_mutual_information),
                             m.total_variation ? fmt::format("{:.3f}", *m.total_variation) : std::string("-"));
    panel.rows.push_back(row("all tokens", m.all, false, false));
    panel.rows.push_back(row("prompt", m.prompt, true, true));
    panel.rows.push_back(row("generated", m.generated, true, false));
    for (size_t i = 0; i < shown.size(); ++i)
      panel.rows.push_back(row(to_string(k_token_classes[shown[i]]), m.classes[shown[i]], true, i == 0));
    p.panels.push_back(std::move(panel));
  }
  // The colour scale ends at the largest share of a row with enough tokens to mean something: one
  // special token routed to two experts would otherwise squeeze every other row into the dark end.
  for (const TokenClassPanel& panel : p.panels)
    for (const TokenClassRow& r : panel.rows)
      if (r.tokens >= k_strongest_min_tokens)
        for (double s : r.shares) p.scale_max = std::max(p.scale_max, s);
  return p;
}
}  // namespace

Report write_report(const ReportOptions& o) {
  const std::optional<int> wanted_layer = o.layer.empty() ? std::nullopt : parse_layer(o.layer);
  if (o.num_experts && *o.num_experts < 1) fail("--num-experts must be at least 1");
  prepare_out_dir(o.out_dir);
  std::optional<TimingFile> timing;
  if (o.timing) timing = read_timing_file(*o.timing);

  // The tokens file and the tokenizer are checked before the routes are read, like the timing file.
  std::optional<OutputsFile> outputs;
  std::optional<Tokenizer> tokenizer;
  std::optional<ClassRoutingJoin> join;
  if (o.tokens) {
    outputs = read_outputs_file(*o.tokens);
    tokenizer = load_tokenizer(o.tokenizer);
    join.emplace(*outputs, [&](int32_t id) { return classify_token(*tokenizer, id); });
  }

  RouteReadOptions read_options;
  read_options.num_experts = o.num_experts;
  if (join) read_options.on_route = [&](const Route& r, int64_t line) { join->add(r, line); };
  const RouteData d = read_routes(o.routes, read_options);
  if (d.records_used == 0) {
    std::string why = fmt::format("{} lines read, {} malformed", d.lines_read, d.malformed_lines);
    if (!d.malformed_examples.empty()) why += "; first " + malformed_text(d.malformed_examples[0]);
    fail("{}: no route records ({})", o.routes.string(), why);
  }
  const std::vector<int> layers = d.layers();
  // --layer default: the only layer when one is logged, else all of them.
  std::optional<int> layer = wanted_layer;
  if (o.layer.empty() && layers.size() == 1) layer = layers[0];
  if (layer && !d.counts.count(*layer))
    fail("{}: layer {} is not in the routes (logged layers: {})", o.routes.string(), *layer, layer_list(layers));

  std::vector<LayerMetrics> per_layer;
  std::vector<int64_t> summed(static_cast<size_t>(d.num_experts), 0);
  for (const auto& [l, counts] : d.counts) {
    per_layer.push_back({l, compute_distribution_metrics(counts, k_json_top_experts)});
    for (size_t e = 0; e < counts.size(); ++e) summed[e] += counts[e];
  }
  const DistributionMetrics overall = compute_distribution_metrics(summed, k_json_top_experts);
  const DistributionMetrics& shown = layer ? per_layer[static_cast<size_t>(
                                                 std::find(layers.begin(), layers.end(), *layer) - layers.begin())].m
                                           : overall;

  std::optional<ClassReport> classes;
  if (join) {
    classes.emplace();
    classes->routing = join->finish(d.num_experts);
    for (const auto& [l, counts] : classes->routing.layers)
      classes->layers.push_back(compute_layer_class_metrics(l, counts));
  }

  std::vector<std::string> notes = d.notes;
  if (classes) notes.insert(notes.end(), classes->routing.notes.begin(), classes->routing.notes.end());
  std::optional<Overhead> overhead;
  if (timing) overhead = logging_overhead(*timing, notes);

  // expert_metrics.json
  Report report;
  Json& j = report.metrics;
  j["moescope_version"] = MOESCOPE_VERSION;
  j["model_id"] = d.meta.model_id;
  j["selected_layer"] = layer ? Json(*layer) : Json("all");
  j["input"] = input_json(o, d);
  if (classes) {
    j["input"]["prompt_tokens"] = classes->routing.prompt_tokens;
    j["input"]["generated_tokens"] = classes->routing.generated_tokens;
    j["tokens_path"] = o.tokens->string();
  }
  j["layers"] = Json::array();
  for (const LayerMetrics& lm : per_layer) {
    Json entry = to_json(lm.m);
    entry["layer"] = lm.layer;
    j["layers"].push_back(entry);
  }
  j["overall"] = to_json(overall);
  auto layer_mean = [&](double DistributionMetrics::*field) {
    double sum = 0;
    for (const LayerMetrics& lm : per_layer) sum += lm.m.*field;
    return sum / static_cast<double>(per_layer.size());
  };
  j["overall"]["layer_mean"] = {{"entropy_bits", layer_mean(&DistributionMetrics::entropy_bits)},
                                {"normalized_entropy", layer_mean(&DistributionMetrics::normalized_entropy)},
                                {"gini", layer_mean(&DistributionMetrics::gini)},
                                {"coefficient_of_variation", layer_mean(&DistributionMetrics::coefficient_of_variation)},
                                {"max_mean_ratio", layer_mean(&DistributionMetrics::max_mean_ratio)}};
  if (timing) {
    j["timing_path"] = o.timing->string();
    j["overhead"] = overhead ? to_json(*overhead, *timing) : Json(nullptr);
  }
  j["notes"] = notes;

  const fs::path metrics_path = o.out_dir / "expert_metrics.json";
  write_text_file(metrics_path, j.dump(2) + "\n");
  report.files.push_back(metrics_path);

  // Plots.
  const std::string tokens_text = d.tokens ? fmt::format(" by {} tokens", thousands(d.tokens)) : "";
  const std::string k_text = d.top_k ? fmt::format("top-{} of {} experts", *d.top_k, d.num_experts)
                                     : fmt::format("{} experts", d.num_experts);
  HistogramPlot hist;
  hist.model_id = d.meta.model_id;
  hist.layer_label = layer ? fmt::format("layer {}", *layer)
                           : fmt::format("sum over {} logged layer{}", layers.size(), layers.size() > 1 ? "s" : "");
  hist.subtitle = fmt::format("{} selections{} \u00b7 {} \u00b7 load balance (normalised entropy) {:.3f} \u00b7 Gini {:.3f}",
                              thousands(shown.selections), tokens_text, k_text, shown.normalized_entropy, shown.gini);
  hist.counts = shown.counts;
  const fs::path hist_path = o.out_dir / "expert_hist.png";
  plot_expert_histogram(hist_path, hist);
  report.files.push_back(hist_path);

  const fs::path heatmap_path = o.out_dir / "expert_heatmap.png";
  if (layers.size() > 1) {
    HeatmapPlot heat;
    heat.model_id = d.meta.model_id;
    heat.layers = layers;
    for (const LayerMetrics& lm : per_layer) heat.shares.push_back(lm.m.shares);
    heat.subtitle = fmt::format("{} logged layers{} \u00b7 {} \u00b7 mean load balance {:.3f}", layers.size(),
                                tokens_text, k_text, layer_mean(&DistributionMetrics::normalized_entropy));
    plot_expert_heatmap(heatmap_path, heat);
    report.files.push_back(heatmap_path);
  } else {
    // A heatmap left from an earlier report of other routes would pass for this one's.
    std::error_code ec;
    fs::remove(heatmap_path, ec);
  }

  const fs::path classes_json_path = o.out_dir / "token_classes.json";
  const fs::path classes_plot_path = o.out_dir / "expert_token_classes.png";
  if (classes) {
    write_text_file(classes_json_path, token_classes_json(o, d, *classes).dump(2) + "\n");
    report.files.push_back(classes_json_path);
    plot_expert_token_classes(classes_plot_path, token_class_plot(d, *classes, k_text));
    report.files.push_back(classes_plot_path);
  } else {
    std::error_code ec;  // the same for an earlier report's token classes
    fs::remove(classes_json_path, ec);
    fs::remove(classes_plot_path, ec);
  }

  // Text summary.
  std::string& s = report.summary;
  s += fmt::format("Routes: {}\n", o.routes.string());
  const char* experts_from = d.num_experts_source == NumExpertsSource::kMeta   ? "from the meta line"
                             : d.num_experts_source == NumExpertsSource::kFlag ? "from --num-experts"
                                                                               : "inferred from the ids";
  s += fmt::format("  model {}, {} experts ({}){}, {} layer{} logged ({})\n",
                   d.meta.model_id.empty() ? "unknown (no meta line)" : d.meta.model_id, d.num_experts, experts_from,
                   d.top_k ? fmt::format(", top-{}", *d.top_k) : "", layers.size(), layers.size() > 1 ? "s" : "",
                   layer_list(layers));
  s += fmt::format("  {} lines read, {} route records used, {} malformed, {} skipped (not routes)\n",
                   thousands(d.lines_read), thousands(d.records_used), thousands(d.malformed_lines),
                   thousands(d.skipped_lines));
  for (const MalformedLine& m : d.malformed_examples) s += fmt::format("    {}\n", malformed_text(m));
  if (classes)
    s += fmt::format("  {} requests, {} tokens: {} prompt, {} generated (from {})\n", thousands(d.requests),
                     thousands(d.tokens), thousands(classes->routing.prompt_tokens),
                     thousands(classes->routing.generated_tokens), o.tokens->string());
  else if (d.records_without_token < d.records_used)
    s += fmt::format("  {} requests, {} tokens (the log does not say which are prompt and which generated tokens)\n",
                     thousands(d.requests), thousands(d.tokens));
  else
    s += "  requests and tokens unknown: the records carry no req_id/token_idx\n";
  s += "\n";
  s += layer ? fmt::format("Layer {} ({} selections)\n", *layer, thousands(shown.selections))
             : fmt::format("All {} logged layers, summed ({} selections)\n", layers.size(), thousands(shown.selections));
  s += distribution_text(shown);
  if (!layer && per_layer.size() > 1) {
    s += "Per layer:\n";
    s += "  layer  balance   gini     cv  max/mean  top expert\n";
    for (const LayerMetrics& lm : per_layer) {
      const ExpertShare& t = lm.m.top_experts.front();
      s += fmt::format("  {:>5}  {:>7.3f}  {:>5.3f}  {:>5.3f}  {:>8.2f}  {} ({})\n", lm.layer, lm.m.normalized_entropy,
                       lm.m.gini, lm.m.coefficient_of_variation, lm.m.max_mean_ratio, t.expert, percent(t.share));
    }
  }
  if (overhead) {
    s += "Performance overhead:\n";
    s += fmt::format("  No logging:   {:.2f}s\n", overhead->no_log_seconds);
    s += fmt::format("  With logging: {:.2f}s\n", overhead->log_seconds);
    s += fmt::format("  Overhead:     {:+.2f}s ({:+.1f}%)\n", overhead->difference_seconds, overhead->percent);
  }
  if (classes) s += token_classes_text(o, *classes);
  if (!notes.empty()) {
    s += "Notes:\n";
    for (const std::string& n : notes) s += fmt::format("  - {}\n", n);
  }
  // fmt, not " " + string: GCC 12 warns falsely (-Wrestrict) on that concatenation.
  s += "Wrote:";
  for (const fs::path& f : report.files) s += fmt::format(" {}", f.string());
  s += "\n";
  return report;
}

}  // namespace moescope::analysis
