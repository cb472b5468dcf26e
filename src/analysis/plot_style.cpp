#include "analysis/plot_style.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>

#include "util/error.h"

namespace moescope::analysis {

Rgb viridis(double t) {
  // Anchors sampled from the viridis map (van der Walt & Smith, matplotlib 2015) every 0.1, plus 0.95
  // where the map bends towards yellow; straight segments between them stay close to the full table.
  struct Anchor {
    double t;
    Rgb c;
  };
  static constexpr std::array<Anchor, 12> anchors{{{0.00, {0.267, 0.005, 0.329}},
                                                   {0.10, {0.283, 0.141, 0.458}},
                                                   {0.20, {0.254, 0.265, 0.530}},
                                                   {0.30, {0.207, 0.372, 0.553}},
                                                   {0.40, {0.164, 0.471, 0.558}},
                                                   {0.50, {0.128, 0.567, 0.551}},
                                                   {0.60, {0.135, 0.659, 0.518}},
                                                   {0.70, {0.267, 0.749, 0.441}},
                                                   {0.80, {0.478, 0.821, 0.318}},
                                                   {0.90, {0.741, 0.873, 0.150}},
                                                   {0.95, {0.866, 0.890, 0.096}},
                                                   {1.00, {0.993, 0.906, 0.144}}}};
  if (!(t > 0.0)) return anchors.front().c;  // also NaN
  if (t >= 1.0) return anchors.back().c;
  size_t i = 1;
  while (anchors[i].t < t) ++i;
  const Anchor& a = anchors[i - 1];
  const Anchor& b = anchors[i];
  const double f = (t - a.t) / (b.t - a.t);
  return {a.c.r + (b.c.r - a.c.r) * f, a.c.g + (b.c.g - a.c.g) * f, a.c.b + (b.c.b - a.c.b) * f};
}

namespace plot {
namespace {

// DejaVu Sans through fontconfig where fontconfig has a configuration; otherwise cairo's built-in
// stroke font, named directly so that fontconfig does not print "cannot load default config file"
// on machines without one (the GPU hosts). Where fontconfig runs but finds no font at all, cairo
// falls back to the same built-in font by itself.
const char* font_family() {
  static const char* family = [] {
    const bool have_config = std::getenv("FONTCONFIG_FILE") != nullptr ||
                             std::filesystem::exists("/etc/fonts/fonts.conf");
    return have_config ? "DejaVu Sans" : "@cairo:sans-serif";
  }();
  return family;
}

void select_font(cairo_t* cr, double size, Weight weight) {
  cairo_select_font_face(cr, font_family(), CAIRO_FONT_SLANT_NORMAL,
                         weight == Weight::kBold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, size);
}

// cairo's built-in font (what cairo uses when no system font is found) covers ASCII only; it is a
// user font, while system fonts are FreeType ones. Under it, the few non-ASCII characters the plots
// use become ASCII look-alikes and any other non-ASCII character a '?', instead of empty boxes.
std::string renderable(cairo_t* cr, const std::string& s) {
  if (cairo_scaled_font_get_type(cairo_get_scaled_font(cr)) != CAIRO_FONT_TYPE_USER) return s;
  static const std::pair<std::string_view, std::string_view> replacements[] = {
      {"\u2014", "-"}, {"\u2013", "-"}, {"\u00b7", "|"}, {"\u2026", "..."}, {"\u00d7", "x"}};
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto byte = static_cast<unsigned char>(s[i]);
    if (byte < 0x80) {
      out += s[i++];
      continue;
    }
    const size_t len = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1;
    const std::string_view ch(s.data() + i, std::min(len, s.size() - i));
    std::string_view with = "?";
    for (const auto& [from, to] : replacements)
      if (ch == from) with = to;
    out += with;
    i += ch.size();
  }
  return out;
}

}  // namespace

void set_source(cairo_t* cr, Rgb c, double alpha) { cairo_set_source_rgba(cr, c.r, c.g, c.b, alpha); }

Canvas::Canvas(int width, int height) {
  surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width * k_plot_scale, height * k_plot_scale);
  cr = cairo_create(surface);
  if (cairo_status(cr) != CAIRO_STATUS_SUCCESS) fail("plot: cannot create a {}x{} image", width, height);
  cairo_scale(cr, k_plot_scale, k_plot_scale);
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  // Antialiased text with grey-scale (not sub-pixel) smoothing: PNGs are viewed on any screen or paper.
  cairo_font_options_t* options = cairo_font_options_create();
  cairo_font_options_set_antialias(options, CAIRO_ANTIALIAS_GRAY);
  cairo_font_options_set_hint_style(options, CAIRO_HINT_STYLE_SLIGHT);
  cairo_font_options_set_hint_metrics(options, CAIRO_HINT_METRICS_OFF);
  cairo_set_font_options(cr, options);
  cairo_font_options_destroy(options);
}

Canvas::~Canvas() {
  cairo_destroy(cr);
  cairo_surface_destroy(surface);
}

void Canvas::write_png(const std::filesystem::path& path) {
  if (cairo_status(cr) != CAIRO_STATUS_SUCCESS)
    fail("{}: drawing failed: {}", path.string(), cairo_status_to_string(cairo_status(cr)));
  cairo_surface_flush(surface);
  const cairo_status_t status = cairo_surface_write_to_png(surface, path.c_str());
  if (status != CAIRO_STATUS_SUCCESS) fail("{}: cannot write PNG: {}", path.string(), cairo_status_to_string(status));
}

double text_width(cairo_t* cr, const std::string& s, double size, Weight weight) {
  select_font(cr, size, weight);
  cairo_text_extents_t e;
  cairo_text_extents(cr, renderable(cr, s).c_str(), &e);
  return e.x_advance;
}

void text(cairo_t* cr, const std::string& s, double x, double y, double size, Rgb colour, Align align, Weight weight,
          bool middle) {
  select_font(cr, size, weight);
  const std::string shown = renderable(cr, s);
  cairo_text_extents_t e;
  cairo_text_extents(cr, shown.c_str(), &e);
  if (align == Align::kCenter) x -= e.x_advance / 2;
  if (align == Align::kRight) x -= e.x_advance;
  if (middle) {
    // Centre on the height of digits and capitals ("0"), so labels line up whatever their letters.
    cairo_text_extents_t digit;
    cairo_text_extents(cr, "0", &digit);
    y -= digit.y_bearing / 2;
  }
  set_source(cr, colour);
  cairo_move_to(cr, x, y);
  cairo_show_text(cr, shown.c_str());
  cairo_new_path(cr);
}

void vertical_text(cairo_t* cr, const std::string& s, double x, double y, double size, Rgb colour) {
  cairo_save(cr);
  cairo_translate(cr, x, y);
  cairo_rotate(cr, -M_PI / 2);
  text(cr, s, 0, 0, size, colour, Align::kCenter, Weight::kNormal, true);
  cairo_restore(cr);
}

std::string fit_text(cairo_t* cr, const std::string& s, double size, double max_width, Weight weight) {
  if (text_width(cr, s, size, weight) <= max_width) return s;
  std::string cut = s;
  while (!cut.empty()) {
    cut.pop_back();
    // Do not leave half a UTF-8 sequence behind.
    while (!cut.empty() && (static_cast<unsigned char>(cut.back()) & 0xC0) == 0x80) cut.pop_back();
    if (!cut.empty() && (static_cast<unsigned char>(cut.back()) & 0x80)) cut.pop_back();
    if (text_width(cr, cut + "\u2026", size, weight) <= max_width) return cut + "\u2026";
  }
  return "\u2026";
}

Ticks nice_ticks(double max_value, int target, bool integer) {
  Ticks t;
  if (!(max_value > 0)) max_value = 1;
  const double raw = max_value / std::max(target, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  t.step = 10 * magnitude;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (m * magnitude >= raw) {
      t.step = m * magnitude;
      break;
    }
  }
  if (integer) t.step = std::max(1.0, std::ceil(t.step));
  t.top = std::ceil(max_value / t.step - 1e-9) * t.step;
  for (int i = 0; i * t.step <= t.top + t.step * 1e-6; ++i) t.values.push_back(i * t.step);
  return t;
}

std::string thousands(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

std::string percent(double share, int decimals) { return fmt::format("{:.{}f}%", 100.0 * share, decimals); }

std::string tick_label(double v, double step) {
  if (std::fabs(step - std::round(step)) < 1e-9 && std::fabs(v) >= 1000)
    return thousands(static_cast<int64_t>(std::llround(v)));
  int decimals = 0;
  while (decimals < 6 && std::fabs(step * std::pow(10.0, decimals) - std::round(step * std::pow(10.0, decimals))) > 1e-6)
    ++decimals;
  return fmt::format("{:.{}f}", v, decimals);
}

int label_step(double pitch, double min_gap) {
  for (int step : {1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000})
    if (pitch * step >= min_gap) return step;
  return 1000;
}

void column_ticks(cairo_t* cr, double left, double pitch, int n, int step, double tick_top, double tick_bottom,
                  double label_y, double size) {
  for (int e = 0; e < n; e += step) {
    const double x = std::round(left + pitch * (e + 0.5)) + 0.5;
    set_source(cr, k_axis);
    cairo_move_to(cr, x, tick_top);
    cairo_line_to(cr, x, tick_bottom);
    cairo_stroke(cr);
    text(cr, std::to_string(e), x, label_y, size, k_ink, Align::kCenter);
  }
}

}  // namespace plot
}  // namespace moescope::analysis
