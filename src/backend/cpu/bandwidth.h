#pragma once
// The machine's memory read bandwidth, measured the way a decode step reads weights: every thread
// streams its share of a buffer far larger than the caches.
#include <cstddef>

namespace moescope::cpu {

struct BandwidthSample {
  double best_gb_per_s = 0.0;
  double median_gb_per_s = 0.0;
  double min_gb_per_s = 0.0;
  size_t bytes = 0;
  int repeats = 0;
};

BandwidthSample measure_read_bandwidth(size_t bytes = size_t{1} << 30, int repeats = 7);

}  // namespace moescope::cpu
