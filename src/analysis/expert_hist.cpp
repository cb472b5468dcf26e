// expert_hist.png: selections per expert as bars by expert id, the most selected experts in the
// accent colour with their rank above the bar, the uniform share as a dashed line, a legend beside.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "analysis/metrics.h"
#include "analysis/plot.h"
#include "analysis/plot_style.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

using namespace plot;

constexpr int k_width = k_hist_width / k_plot_scale;
constexpr int k_height = k_hist_height / k_plot_scale;

// Plot area (logical pixels): the legend takes the band on the right.
constexpr double k_left = 84, k_right = 752, k_top = 92, k_bottom = 496;
constexpr double k_legend_x = 778;
constexpr double k_badge_radius = 8;

void badge(cairo_t* cr, double x, double y, int rank) {
  cairo_arc(cr, x, y, k_badge_radius, 0, 2 * M_PI);
  set_source(cr, k_accent);
  cairo_fill(cr);
  text(cr, std::to_string(rank), x, y, 10.5, {1, 1, 1}, Align::kCenter, Weight::kBold, true);
}

// Every `step` experts gets a labelled tick, step chosen so labels keep min_gap apart.
int x_label_step(double slot, double min_gap) {
  for (int step : {1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000})
    if (slot * step >= min_gap) return step;
  return 1000;
}

}  // namespace

void plot_expert_histogram(const std::filesystem::path& path, const HistogramPlot& p) {
  if (p.counts.empty()) fail("{}: no experts to plot", path.string());
  Canvas canvas(k_width, k_height);
  cairo_t* cr = canvas.cr;
  const int num_experts = static_cast<int>(p.counts.size());
  const int64_t total = std::accumulate(p.counts.begin(), p.counts.end(), int64_t{0});
  const int64_t max_count = *std::max_element(p.counts.begin(), p.counts.end());

  std::string title = "Expert selections";
  if (!p.model_id.empty()) title += " \u2014 " + p.model_id;
  if (!p.layer_label.empty()) title += ", " + p.layer_label;
  text(cr, fit_text(cr, title, 19, k_width - 48, Weight::kBold), 24, 34, 19, k_ink, Align::kLeft, Weight::kBold);
  if (!p.subtitle.empty()) text(cr, fit_text(cr, p.subtitle, 13, k_width - 48), 24, 58, 13, k_muted);

  // Leave room above the tallest bar for the rank badges.
  const double plot_h = k_bottom - k_top;
  const Ticks ticks = nice_ticks(static_cast<double>(std::max<int64_t>(max_count, 1)) * plot_h / (plot_h - 30), 5, true);
  auto y_of = [&](double v) { return k_bottom - v / ticks.top * plot_h; };

  cairo_set_line_width(cr, 1);
  for (double v : ticks.values) {
    const double y = std::round(y_of(v)) + 0.5;
    if (v > 0) {
      set_source(cr, k_grid);
      cairo_move_to(cr, k_left, y);
      cairo_line_to(cr, k_right, y);
      cairo_stroke(cr);
    }
    set_source(cr, k_axis);
    cairo_move_to(cr, k_left - 5, y);
    cairo_line_to(cr, k_left, y);
    cairo_stroke(cr);
    text(cr, tick_label(v, ticks.step), k_left - 9, y, 12, k_ink, Align::kRight, Weight::kNormal, true);
  }
  vertical_text(cr, "selections (tokens routed to the expert)", 26, (k_top + k_bottom) / 2, 13, k_muted);

  // Bars.
  const double slot = (k_right - k_left) / num_experts;
  const double bar_w = std::max(slot * (num_experts <= 16 ? 0.68 : 0.8), 0.6);
  const std::vector<ExpertShare> top = top_experts(p.counts, std::min(p.marked, num_experts));
  std::vector<int> rank_of(static_cast<size_t>(num_experts), 0);
  int marked = 0;
  for (const ExpertShare& t : top)
    if (t.count > 0) rank_of[static_cast<size_t>(t.expert)] = ++marked;
  for (int e = 0; e < num_experts; ++e) {
    const double x = k_left + slot * e + (slot - bar_w) / 2;
    const double y = y_of(static_cast<double>(p.counts[static_cast<size_t>(e)]));
    cairo_rectangle(cr, x, y, bar_w, k_bottom - y);
    set_source(cr, rank_of[static_cast<size_t>(e)] ? k_accent : k_bar);
    cairo_fill(cr);
  }

  // Uniform share: every expert would get total / num_experts.
  const double uniform = static_cast<double>(total) / num_experts;
  const double y_uniform = y_of(uniform);
  cairo_save(cr);
  const double dash[] = {7, 4};
  cairo_set_dash(cr, dash, 2, 0);
  cairo_set_line_width(cr, 1.6);
  set_source(cr, k_reference);
  cairo_move_to(cr, k_left, y_uniform);
  cairo_line_to(cr, k_right, y_uniform);
  cairo_stroke(cr);
  cairo_restore(cr);

  // Rank badges above the top bars; a badge that would overlap one already placed moves up.
  std::vector<std::pair<double, double>> placed;
  for (const ExpertShare& t : top) {
    if (t.count == 0) continue;
    const double x = k_left + slot * (t.expert + 0.5);
    double y = y_of(static_cast<double>(t.count)) - k_badge_radius - 3;
    for (bool moved = true; moved;) {
      moved = false;
      for (const auto& [px, py] : placed)
        if (std::hypot(px - x, py - y) < 2 * k_badge_radius + 1) {
          y = py - 2 * k_badge_radius - 2;
          moved = true;
        }
    }
    placed.emplace_back(x, y);
    badge(cr, x, y, rank_of[static_cast<size_t>(t.expert)]);
  }

  // Axes and expert-id ticks.
  set_source(cr, k_axis);
  cairo_set_line_width(cr, 1);
  cairo_move_to(cr, k_left + 0.5, k_top);
  cairo_line_to(cr, k_left + 0.5, k_bottom + 0.5);
  cairo_line_to(cr, k_right, k_bottom + 0.5);
  cairo_stroke(cr);
  // The widest id label plus a margin: two-digit ids may sit closer than three-digit ones.
  const int step = x_label_step(slot, text_width(cr, std::to_string(num_experts - 1), 12) + 12);
  column_ticks(cr, k_left, slot, num_experts, step, k_bottom + 0.5, k_bottom + 5.5, k_bottom + 20, 12);
  text(cr, "expert id", (k_left + k_right) / 2, k_bottom + 44, 13, k_muted, Align::kCenter);

  // Legend.
  double y = k_top + 6;
  auto swatch_row = [&](Rgb colour, const std::string& label) {
    cairo_rectangle(cr, k_legend_x, y - 6, 14, 12);
    set_source(cr, colour);
    cairo_fill(cr);
    text(cr, label, k_legend_x + 22, y, 12.5, k_ink, Align::kLeft, Weight::kNormal, true);
    y += 22;
  };
  swatch_row(k_bar, "selections per expert");
  if (marked) swatch_row(k_accent, fmt::format("top {} expert{}", marked, marked > 1 ? "s" : ""));
  cairo_save(cr);
  cairo_set_dash(cr, dash, 2, 0);
  cairo_set_line_width(cr, 1.6);
  set_source(cr, k_reference);
  cairo_move_to(cr, k_legend_x, y);
  cairo_line_to(cr, k_legend_x + 14, y);
  cairo_stroke(cr);
  cairo_restore(cr);
  text(cr, "uniform share", k_legend_x + 22, y, 12.5, k_ink, Align::kLeft, Weight::kNormal, true);
  y += 17;
  const std::string per_expert = std::fabs(uniform - std::round(uniform)) < 1e-9
                                     ? thousands(std::llround(uniform))
                                     : fmt::format("{:.1f}", uniform);
  text(cr, fmt::format("1/{} = {} ({} each)", num_experts, percent(1.0 / num_experts, num_experts > 100 ? 2 : 1),
                       per_expert),
       k_legend_x + 22, y, 11.5, k_muted, Align::kLeft, Weight::kNormal, true);
  y += 34;
  if (marked) {
    text(cr, "Most selected", k_legend_x, y, 13, k_ink, Align::kLeft, Weight::kBold, true);
    y += 26;
    for (const ExpertShare& t : top) {
      if (t.count == 0) continue;
      badge(cr, k_legend_x + k_badge_radius, y, rank_of[static_cast<size_t>(t.expert)]);
      text(cr, fmt::format("expert {}", t.expert), k_legend_x + 24, y, 12.5, k_ink, Align::kLeft, Weight::kBold, true);
      text(cr, fmt::format("{} ({})", thousands(t.count), percent(t.share)), k_legend_x + 24, y + 17, 11.5, k_muted,
           Align::kLeft, Weight::kNormal, true);
      y += 42;
    }
  }
  canvas.write_png(path);
}

}  // namespace moescope::analysis
