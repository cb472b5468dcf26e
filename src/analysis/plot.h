#pragma once
// The report's figures, drawn with cairo into PNG files: a bar chart of selections per expert, a
// layers x experts heatmap of shares, and (report --tokens) token classes x experts heatmaps per layer. Both are drawn at a fixed logical size and rendered at 2x, so
// they stay sharp in a paper (the heatmap's height depends on its number of rows). Throws Error naming the file when it cannot be written.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moescope::analysis {

// Pixel sizes of the PNG files (logical size x k_plot_scale).
constexpr int k_plot_scale = 2;
constexpr int k_hist_width = 1000 * k_plot_scale;
constexpr int k_hist_height = 560 * k_plot_scale;
constexpr int k_heatmap_width = 1000 * k_plot_scale;
// The heatmap's height follows its rows (a few layers do not leave half a page blank).
int heatmap_height(int rows);

struct HistogramPlot {
  std::string model_id;     // title; may be empty
  std::string layer_label;  // e.g. "layer 0" or "sum over 24 layers"
  std::string subtitle;     // one line of context under the title; may be empty
  std::vector<int64_t> counts;  // [num_experts] selections per expert
  int marked = 3;               // the most selected experts drawn in the accent colour and numbered
};

struct HeatmapPlot {
  std::string model_id;
  std::string subtitle;
  std::vector<int> layers;                  // [rows] layer number of each row, top to bottom
  std::vector<std::vector<double>> shares;  // [rows][num_experts] share of the row's selections
};

// expert_token_classes.png: one panel per layer, one row per group of tokens (all, prompt, generated,
// each token class), one column per expert, each cell the expert's share of the row's selections.
struct TokenClassRow {
  std::string label;            // "digit", "prompt", ...
  int64_t tokens = 0;           // routed tokens in the row, printed beside the label
  std::vector<double> shares;   // [num_experts]; all 0 when the row has no tokens
  int top_expert = -1;          // outlined and named beside the row; -1: none
  double top_share = 0.0;
  std::optional<double> lift;   // the top expert's lift, printed when set
  bool gap_before = false;      // a little space above the row: a new group starts
};

struct TokenClassPanel {
  std::string title;  // "Layer 0"
  std::string note;   // one line under the title: MI, TV
  std::vector<TokenClassRow> rows;
};

struct TokenClassPlot {
  std::string model_id;
  std::string subtitle;
  int num_experts = 0;
  double scale_max = 0.0;  // share at the top of the colour scale (larger ones are drawn at the top); 0: the largest
  std::vector<TokenClassPanel> panels;  // one per layer, drawn in a grid
};

// The height in pixels of expert_token_classes.png (its width is k_heatmap_width).
int token_class_plot_height(const TokenClassPlot& plot);

void plot_expert_histogram(const std::filesystem::path& path, const HistogramPlot& plot);
void plot_expert_heatmap(const std::filesystem::path& path, const HeatmapPlot& plot);
void plot_expert_token_classes(const std::filesystem::path& path, const TokenClassPlot& plot);

struct Rgb {
  double r = 0, g = 0, b = 0;  // 0..1
};
// A perceptually uniform sequential colour map (viridis-like, dark purple -> yellow) at t in [0, 1].
Rgb viridis(double t);

}  // namespace moescope::analysis
