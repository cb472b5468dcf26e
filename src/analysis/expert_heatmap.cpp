// expert_heatmap.png: one row per logged layer, one column per expert, each cell the expert's share of
// that layer's selections on a viridis scale from 0 to the largest share, with a colour bar.
#include <algorithm>
#include <cmath>

#include "analysis/plot.h"
#include "analysis/plot_style.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

using namespace plot;

constexpr int k_width = k_heatmap_width / k_plot_scale;
constexpr double k_left = 84, k_right = 840, k_top = 92;
constexpr double k_max_grid_height = 460;
constexpr double k_bar_x = 874, k_bar_w = 18;
constexpr double k_min_bar_height = 210;  // room for the colour bar's ticks and its vertical title
constexpr double k_below = 66;            // expert ids, axis title, the uniform-share note
// Rows taller than this would only spread a few layers over the page, unless the grid is still
// shorter than the colour bar beside it.
constexpr double k_max_row_height = 44;

double row_height(int rows) {
  return std::min(k_max_grid_height / rows, std::max(k_max_row_height, k_min_bar_height / rows));
}

}  // namespace

int heatmap_height(int rows) {
  const double grid = row_height(std::max(rows, 1)) * std::max(rows, 1);
  return static_cast<int>(std::ceil(k_top + std::max(grid, k_min_bar_height) + k_below)) * k_plot_scale;
}

void plot_expert_heatmap(const std::filesystem::path& path, const HeatmapPlot& p) {
  const int rows = static_cast<int>(p.shares.size());
  if (rows == 0 || p.shares[0].empty()) fail("{}: nothing to plot", path.string());
  if (p.layers.size() != p.shares.size()) fail("{}: {} layer labels for {} rows", path.string(), p.layers.size(), rows);
  const int num_experts = static_cast<int>(p.shares[0].size());
  for (const auto& row : p.shares)
    if (static_cast<int>(row.size()) != num_experts) fail("{}: rows of different lengths", path.string());

  Canvas canvas(k_width, heatmap_height(rows) / k_plot_scale);
  cairo_t* cr = canvas.cr;
  std::string title = "Expert share per layer";
  if (!p.model_id.empty()) title += " \u2014 " + p.model_id;
  text(cr, fit_text(cr, title, 19, k_width - 48, Weight::kBold), 24, 34, 19, k_ink, Align::kLeft, Weight::kBold);
  if (!p.subtitle.empty()) text(cr, fit_text(cr, p.subtitle, 13, k_width - 48), 24, 58, 13, k_muted);

  double max_share = 0;
  for (const auto& row : p.shares)
    for (double s : row) max_share = std::max(max_share, s);
  // The scale runs from 0 to a round percentage at or above the largest share.
  const Ticks ticks = nice_ticks(std::max(max_share, 1e-9) * 100.0, 5, false);
  const double vmax = ticks.top / 100.0;

  const double row_h = row_height(rows);
  const double bottom = k_top + row_h * rows;
  const double col_w = (k_right - k_left) / num_experts;
  // Hairline gaps separate cells while cells are large enough to show them.
  const double gap = std::min({1.0, col_w / 10, row_h / 10});
  const bool annotate = num_experts <= 16 && rows <= 12;
  for (int r = 0; r < rows; ++r) {
    for (int e = 0; e < num_experts; ++e) {
      const double share = p.shares[static_cast<size_t>(r)][static_cast<size_t>(e)];
      const double t = share / vmax;
      const double x = k_left + col_w * e;
      const double y = k_top + row_h * r;
      cairo_rectangle(cr, x + gap / 2, y + gap / 2, col_w - gap, row_h - gap);
      set_source(cr, viridis(t));
      cairo_fill(cr);
      if (annotate)
        text(cr, percent(share), x + col_w / 2, y + row_h / 2, std::min(12.0, row_h * 0.4),
             t < 0.62 ? Rgb{1, 1, 1} : k_ink, Align::kCenter, Weight::kNormal, true);
    }
  }

  // Axes: layer numbers down the left, expert ids along the bottom.
  cairo_set_line_width(cr, 1);
  const int row_step = label_step(row_h, 15);
  for (int r = 0; r < rows; r += row_step) {
    const double y = k_top + row_h * (r + 0.5);
    set_source(cr, k_axis);
    cairo_move_to(cr, k_left - 5, y);
    cairo_line_to(cr, k_left - 1, y);
    cairo_stroke(cr);
    text(cr, std::to_string(p.layers[static_cast<size_t>(r)]), k_left - 9, y, 12, k_ink, Align::kRight, Weight::kNormal,
         true);
  }
  vertical_text(cr, "layer", 30, (k_top + bottom) / 2, 13, k_muted);
  const int col_step = label_step(col_w, text_width(cr, std::to_string(num_experts - 1), 12) + 12);
  column_ticks(cr, k_left, col_w, num_experts, col_step, bottom + 1, bottom + 5, bottom + 19, 12);
  text(cr, "expert id", (k_left + k_right) / 2, bottom + 42, 13, k_muted, Align::kCenter);

  // Colour bar, drawn as thin bands from 0 (bottom) to vmax (top).
  const double bar_top = k_top, bar_bottom = std::max(bottom, k_top + k_min_bar_height);
  const int bands = 256;
  const double band_h = (bar_bottom - bar_top) / bands;
  for (int i = 0; i < bands; ++i) {
    cairo_rectangle(cr, k_bar_x, bar_bottom - band_h * (i + 1), k_bar_w, band_h + 0.3);
    set_source(cr, viridis((i + 0.5) / bands));
    cairo_fill(cr);
  }
  set_source(cr, k_axis);
  cairo_rectangle(cr, k_bar_x, bar_top, k_bar_w, bar_bottom - bar_top);
  cairo_stroke(cr);
  auto y_of = [&](double share) { return bar_bottom - share / vmax * (bar_bottom - bar_top); };
  for (double v : ticks.values) {
    const double y = y_of(v / 100.0);
    set_source(cr, k_axis);
    cairo_move_to(cr, k_bar_x + k_bar_w, y);
    cairo_line_to(cr, k_bar_x + k_bar_w + 4, y);
    cairo_stroke(cr);
    text(cr, tick_label(v, ticks.step) + "%", k_bar_x + k_bar_w + 8, y, 11.5, k_ink, Align::kLeft, Weight::kNormal,
         true);
  }
  // The uniform share 1/num_experts, marked by a triangle beside the bar: cells brighter than it are
  // experts that layer prefers.
  const double uniform = 1.0 / num_experts;
  if (uniform <= vmax) {
    const double y = y_of(uniform);
    set_source(cr, k_reference);
    cairo_move_to(cr, k_bar_x - 2, y);
    cairo_line_to(cr, k_bar_x - 9, y - 5);
    cairo_line_to(cr, k_bar_x - 9, y + 5);
    cairo_close_path(cr);
    cairo_fill(cr);
    cairo_set_line_width(cr, 1.2);
    cairo_move_to(cr, k_bar_x, y);
    cairo_line_to(cr, k_bar_x + k_bar_w, y);
    cairo_stroke(cr);
  }
  vertical_text(cr, "share of the layer's selections", k_width - 24, (bar_top + bar_bottom) / 2, 13, k_muted);
  double legend_y = bar_bottom + 22;
  if (uniform <= vmax) {
    set_source(cr, k_reference);
    cairo_move_to(cr, k_bar_x + 5, legend_y);
    cairo_line_to(cr, k_bar_x - 2, legend_y - 5);
    cairo_line_to(cr, k_bar_x - 2, legend_y + 5);
    cairo_close_path(cr);
    cairo_fill(cr);
    text(cr, fmt::format("uniform {}", percent(uniform)), k_bar_x + 10, legend_y, 11, k_muted, Align::kLeft,
         Weight::kNormal, true);
  }
  canvas.write_png(path);
}

}  // namespace moescope::analysis
