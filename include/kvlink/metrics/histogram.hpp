// A latency histogram with fixed bucket bounds, in the shape Prometheus
// exposes (cumulative buckets, a count and a sum in seconds). Plain data:
// the thread that observes owns it; others read copies of it.
#pragma once

#include <array>
#include <cstdint>

#include "kvlink/clock.hpp"

namespace kvlink::metrics {

struct Histogram {
  // Upper bounds in seconds: 25 µs (a PING handled in-process) to 10 s (a
  // transfer at its deadline); anything slower lands in +Inf.
  static constexpr std::array<double, 17> bounds = {25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3,  2.5e-3, 5e-3, 10e-3,
                                                    25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,   2.5,    10.0};
  std::array<std::uint64_t, bounds.size() + 1> buckets{};  // per bucket, not cumulative; the last is +Inf
  std::uint64_t count = 0;
  double sum_seconds = 0;

  void observe(Duration d) {
    const double s = std::chrono::duration<double>(d).count();
    std::size_t i = 0;
    while (i < bounds.size() && s > bounds[i]) ++i;
    ++buckets[i];
    ++count;
    sum_seconds += s;
  }
  // The smallest bucket bound below which a fraction `q` of the
  // observations lie (+Inf as 1e300); 0 when empty.
  double quantile_bound(double q) const {
    if (count == 0) return 0;
    const double want = q * static_cast<double>(count);
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < bounds.size(); ++i) {
      seen += buckets[i];
      if (static_cast<double>(seen) >= want) return bounds[i];
    }
    return 1e300;
  }
};

}  // namespace kvlink::metrics
