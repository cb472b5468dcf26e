// expert_token_classes.png: a grid of panels, one per layer; in each, one row per group of tokens (all
// tokens, prompt, generated, then the token classes) and one column per expert, each cell the expert's
// share of the row's selections on the viridis scale the layer heatmap uses. Each row's most selected
// expert is outlined and named at the row's end with its share and lift, so that "digits go to expert 3
// in layer 0" reads at a glance; the "all tokens" row on top is what the other rows are compared with.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "analysis/plot.h"
#include "analysis/plot_style.h"
#include "util/error.h"

namespace moescope::analysis {
namespace {

using namespace plot;

constexpr int k_width = k_heatmap_width / k_plot_scale;
constexpr double k_margin = 24;
constexpr double k_panels_top = 146;  // below the title, the subtitle, the colour bar and the legend
constexpr double k_column_gap = 36;
constexpr double k_panel_header = 44;  // the panel's title and note
constexpr double k_group_gap = 7;
constexpr double k_label_width = 128;     // row label and token count, left of the cells
constexpr double k_top_width = 96;        // "e3 · 41% · 3.1×", right of the cells
constexpr double k_panel_below = 44;      // expert ids, then space before the next panel
constexpr Rgb k_empty{0.95, 0.95, 0.96};  // a row without tokens

int columns(const TokenClassPlot& p) { return p.panels.size() > 1 ? 2 : 1; }
double row_height(const TokenClassPlot& p) { return columns(p) == 1 ? 22 : 18; }

double panel_height(const TokenClassPlot& p, const TokenClassPanel& panel) {
  double h = k_panel_header + k_panel_below;
  for (const TokenClassRow& r : panel.rows) h += row_height(p) + (r.gap_before ? k_group_gap : 0);
  return h;
}

// The height of each row of panels (two panels side by side take the taller one's).
std::vector<double> grid_row_heights(const TokenClassPlot& p) {
  std::vector<double> heights;
  for (size_t i = 0; i < p.panels.size(); i += static_cast<size_t>(columns(p))) {
    double h = panel_height(p, p.panels[i]);
    if (i + 1 < p.panels.size() && columns(p) == 2) h = std::max(h, panel_height(p, p.panels[i + 1]));
    heights.push_back(h);
  }
  return heights;
}

void draw_panel(cairo_t* cr, const TokenClassPlot& p, const TokenClassPanel& panel, double x0, double y0, double width,
                double vmax) {
  text(cr, panel.title, x0, y0 + 14, 14, k_ink, Align::kLeft, Weight::kBold);
  if (!panel.note.empty()) text(cr, fit_text(cr, panel.note, 11.5, width), x0, y0 + 31, 11.5, k_muted);

  const double grid_left = x0 + k_label_width, grid_right = x0 + width - k_top_width;
  const double col_w = (grid_right - grid_left) / p.num_experts;
  const double row_h = row_height(p);
  const double gap = std::min({1.0, col_w / 10, row_h / 10});
  double y = y0 + k_panel_header;
  for (const TokenClassRow& r : panel.rows) {
    if (r.gap_before) y += k_group_gap;
    const double mid = y + row_h / 2;
    text(cr, r.label, x0, mid, 12, k_ink, Align::kLeft, Weight::kNormal, true);
    text(cr, thousands(r.tokens), grid_left - 8, mid, 10.5, k_muted, Align::kRight, Weight::kNormal, true);
    for (int e = 0; e < p.num_experts; ++e) {
      const double share = e < static_cast<int>(r.shares.size()) ? r.shares[static_cast<size_t>(e)] : 0.0;
      cairo_rectangle(cr, grid_left + col_w * e + gap / 2, y + gap / 2, col_w - gap, row_h - gap);
      set_source(cr, r.tokens > 0 ? viridis(share / vmax) : k_empty);
      cairo_fill(cr);
    }
    if (r.tokens > 0 && r.top_expert >= 0) {
      // The row's top expert: an orange frame, which stands out on every colour of the map.
      cairo_set_line_width(cr, 1.6);
      set_source(cr, k_accent);
      cairo_rectangle(cr, grid_left + col_w * r.top_expert + 0.8, y + 0.8, col_w - 1.6, row_h - 1.6);
      cairo_stroke(cr);
      std::string top = fmt::format("e{} \u00b7 {}", r.top_expert, percent(r.top_share, 0));
      if (r.lift) top += fmt::format(" \u00b7 {:.1f}\u00d7", *r.lift);
      text(cr, top, grid_right + 8, mid, 11, k_ink, Align::kLeft, Weight::kNormal, true);
    } else if (r.tokens == 0) {
      text(cr, "no tokens", grid_right + 8, mid, 11, k_muted, Align::kLeft, Weight::kNormal, true);
    }
    y += row_h;
  }
  // Expert ids under the cells.
  const int step = label_step(col_w, text_width(cr, std::to_string(p.num_experts - 1), 10) + 8);
  cairo_set_line_width(cr, 1);
  column_ticks(cr, grid_left, col_w, p.num_experts, step, y + 1, y + 4, y + 15, 10);
  text(cr, "expert", grid_left - 8, y + 15, 10.5, k_muted, Align::kRight);
}

}  // namespace

int token_class_plot_height(const TokenClassPlot& p) {
  double h = k_panels_top;
  for (double row : grid_row_heights(p)) h += row;
  return static_cast<int>(std::ceil(h + 8)) * k_plot_scale;
}

void plot_expert_token_classes(const std::filesystem::path& path, const TokenClassPlot& p) {
  if (p.panels.empty() || p.num_experts < 1) fail("{}: nothing to plot", path.string());
  for (const TokenClassPanel& panel : p.panels)
    for (const TokenClassRow& r : panel.rows)
      if (static_cast<int>(r.shares.size()) != p.num_experts)
        fail("{}: a row with {} shares for {} experts", path.string(), r.shares.size(), p.num_experts);

  Canvas canvas(k_width, token_class_plot_height(p) / k_plot_scale);
  cairo_t* cr = canvas.cr;
  std::string title = "Expert share by token class";
  if (!p.model_id.empty()) title += " \u2014 " + p.model_id;
  text(cr, fit_text(cr, title, 19, k_width - 2 * k_margin, Weight::kBold), k_margin, 34, 19, k_ink, Align::kLeft,
       Weight::kBold);
  if (!p.subtitle.empty()) text(cr, fit_text(cr, p.subtitle, 13, k_width - 2 * k_margin), k_margin, 58, 13, k_muted);

  // One colour scale for every panel, from 0 to a round percentage at or above scale_max.
  double max_share = p.scale_max;
  if (!(max_share > 0))
    for (const TokenClassPanel& panel : p.panels)
      for (const TokenClassRow& r : panel.rows)
        for (double s : r.shares) max_share = std::max(max_share, s);
  const Ticks ticks = nice_ticks(std::max(max_share, 1e-9) * 100.0, 5, false);
  const double vmax = ticks.top / 100.0;

  // Horizontal colour bar at the top right, with the uniform share 1/num_experts marked.
  const double bar_left = k_width - k_margin - 300, bar_right = k_width - k_margin - 12, bar_top = 76, bar_h = 10;
  const int bands = 256;
  const double band_w = (bar_right - bar_left) / bands;
  for (int i = 0; i < bands; ++i) {
    cairo_rectangle(cr, bar_left + band_w * i, bar_top, band_w + 0.3, bar_h);
    set_source(cr, viridis((i + 0.5) / bands));
    cairo_fill(cr);
  }
  cairo_set_line_width(cr, 1);
  set_source(cr, k_axis);
  cairo_rectangle(cr, bar_left, bar_top, bar_right - bar_left, bar_h);
  cairo_stroke(cr);
  auto x_of = [&](double share) { return bar_left + share / vmax * (bar_right - bar_left); };
  for (double v : ticks.values) {
    const double x = x_of(v / 100.0);
    set_source(cr, k_axis);
    cairo_move_to(cr, x, bar_top + bar_h);
    cairo_line_to(cr, x, bar_top + bar_h + 4);
    cairo_stroke(cr);
    text(cr, tick_label(v, ticks.step) + "%", x, bar_top + bar_h + 16, 10.5, k_ink, Align::kCenter);
  }
  const double uniform = 1.0 / p.num_experts;
  if (uniform <= vmax) {
    const double x = x_of(uniform);
    set_source(cr, k_reference);
    cairo_move_to(cr, x, bar_top - 1);
    cairo_line_to(cr, x - 5, bar_top - 8);
    cairo_line_to(cr, x + 5, bar_top - 8);
    cairo_close_path(cr);
    cairo_fill(cr);
  }
  text(cr, "share of the row's selections", bar_left - 12, bar_top + bar_h / 2, 12, k_muted, Align::kRight,
       Weight::kNormal, true);
  // The legend: the uniform marker, the frame, the text at the end of each row.
  set_source(cr, k_reference);
  cairo_move_to(cr, k_margin + 5, 125);
  cairo_line_to(cr, k_margin, 118);
  cairo_line_to(cr, k_margin + 10, 118);
  cairo_close_path(cr);
  cairo_fill(cr);
  text(cr,
       fmt::format(
           "uniform share {} \u00b7 orange frame: the row's top expert \u00b7 \"e3 \u00b7 41% \u00b7 3.1\u00d7\": "
           "expert 3, 41% of the row's selections, 3.1 times its share over all tokens",
           percent(uniform)),
       k_margin + 15, 124, 11, k_muted);

  const int ncols = columns(p);
  const double panel_w = (k_width - 2 * k_margin - k_column_gap * (ncols - 1)) / ncols;
  const std::vector<double> heights = grid_row_heights(p);
  double y = k_panels_top;
  for (size_t i = 0; i < p.panels.size(); ++i) {
    const size_t grid_row = i / static_cast<size_t>(ncols), grid_col = i % static_cast<size_t>(ncols);
    draw_panel(cr, p, p.panels[i], k_margin + grid_col * (panel_w + k_column_gap), y, panel_w, vmax);
    if (grid_col + 1 == static_cast<size_t>(ncols) || i + 1 == p.panels.size()) y += heights[grid_row];
  }
  canvas.write_png(path);
}

}  // namespace moescope::analysis
