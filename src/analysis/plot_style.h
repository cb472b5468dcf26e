#pragma once
// What the plots share: the palette, fonts, text placement and axis ticks. Internal to analysis.
#include <cairo.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "analysis/plot.h"

namespace moescope::analysis::plot {

constexpr Rgb k_ink{0.13, 0.13, 0.15};        // titles, tick labels
constexpr Rgb k_muted{0.40, 0.40, 0.44};      // subtitles, axis titles
constexpr Rgb k_grid{0.88, 0.88, 0.90};       // grid lines
constexpr Rgb k_axis{0.55, 0.55, 0.58};       // axis lines, ticks
constexpr Rgb k_bar{0.42, 0.56, 0.73};        // ordinary bars: muted steel blue
constexpr Rgb k_accent{0.85, 0.37, 0.01};     // the top experts: orange, distinct from blue for colour-blind readers
constexpr Rgb k_reference{0.20, 0.20, 0.22};  // the uniform-share line

void set_source(cairo_t* cr, Rgb c, double alpha = 1.0);

// An RGB image surface of logical width x height drawn at k_plot_scale, painted white.
struct Canvas {
  Canvas(int width, int height);
  ~Canvas();
  Canvas(const Canvas&) = delete;
  Canvas& operator=(const Canvas&) = delete;
  void write_png(const std::filesystem::path& path);

  cairo_surface_t* surface = nullptr;
  cairo_t* cr = nullptr;
};

enum class Align { kLeft, kCenter, kRight };
enum class Weight { kNormal, kBold };

// Draws text with its baseline at y (or, with middle, its x-height centred on y).
void text(cairo_t* cr, const std::string& s, double x, double y, double size, Rgb colour, Align align = Align::kLeft,
          Weight weight = Weight::kNormal, bool middle = false);
double text_width(cairo_t* cr, const std::string& s, double size, Weight weight = Weight::kNormal);
// Text rotated 90 degrees counter-clockwise, centred on (x, y): vertical axis titles.
void vertical_text(cairo_t* cr, const std::string& s, double x, double y, double size, Rgb colour);
// s shortened with an ellipsis to fit max_width.
std::string fit_text(cairo_t* cr, const std::string& s, double size, double max_width, Weight weight = Weight::kNormal);

// Tick values 0, step, 2 step, ... up to top, with step from {1, 2, 2.5, 5} x 10^k giving about
// `target` intervals; top is the first tick at or above max_value.
struct Ticks {
  double step = 1.0;
  double top = 1.0;
  std::vector<double> values;
};
Ticks nice_ticks(double max_value, int target, bool integer);

// 12345 -> "12,345"; 0.1823 -> "18.2%".
std::string thousands(int64_t v);
std::string percent(double share, int decimals = 1);
// A tick label: integers without decimals, otherwise as many decimals as the step needs.
std::string tick_label(double v, double step);

// Every `step`-th column of a row of columns `pitch` wide gets a label: the smallest step of
// {1, 2, 4, 5, 10, 20, 25, ...} that keeps labels min_gap apart.
int label_step(double pitch, double min_gap);
// Ticks under columns 0, step, 2 step, ... of n columns `pitch` wide starting at x = left: a tick from
// tick_top to tick_bottom and the column's index centred at label_y, in the given font size.
void column_ticks(cairo_t* cr, double left, double pitch, int n, int step, double tick_top, double tick_bottom,
                  double label_y, double size);

}  // namespace moescope::analysis::plot
