// The one clock kvlink's logic runs on. Pure logic takes `now` as an
// argument instead of reading the clock, so tests drive it with fake time.
#pragma once

#include <chrono>

namespace kvlink {
using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;
using Duration = Clock::duration;
}  // namespace kvlink
