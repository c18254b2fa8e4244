// Random spread of a delay, shared by everything that backs off or paces
// itself (the link's pings and reconnects, the tiers' probes), so that
// many clients do not retry in lockstep.
#pragma once

#include <chrono>
#include <random>

#include "kvlink/clock.hpp"

namespace kvlink {

// `d` scaled by a uniform factor in [1 - fraction, 1 + fraction]; `d` itself
// when fraction <= 0 (no draw from `rng`).
inline Duration jittered(Duration d, double fraction, std::mt19937_64& rng) {
  if (fraction <= 0) return d;
  std::uniform_real_distribution<double> u(-fraction, fraction);
  return std::chrono::duration_cast<Duration>(d * (1.0 + u(rng)));
}

}  // namespace kvlink
