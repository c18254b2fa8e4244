// A rate limit on the log lines one source (a client connection) can cause:
// at most `lines` per `window`; the rest are held back (counted, not
// written) and come back as one summary line once their window ended.
// Sans-io: the caller passes the time and writes the lines. Counters kept
// elsewhere stay exact; this decides only what reaches the log.
#pragma once

#include <chrono>
#include <cstdint>

#include "kvlink/clock.hpp"

namespace kvlink {

class LogLimiter {
 public:
  struct Config {
    std::uint32_t lines = 10;                   // written per window, at most
    Duration window = std::chrono::seconds(1);  // a fixed window, from its first line
  };

  LogLimiter() = default;
  explicit LogLimiter(Config config) : config_(config) {}

  // Whether a line may be written at `now`; if not, it is held back. Call
  // take_held_back(now) first, so a summary precedes the next line.
  bool allow(TimePoint now);

  // Lines held back and not yet reported, once the window they fell in has
  // ended by `now` (0 otherwise, or if none); they count as reported now.
  // `final` (the source is gone): whatever is held back, window ended or not.
  std::uint64_t take_held_back(TimePoint now, bool final = false);

  const Config& config() const { return config_; }

 private:
  Config config_;
  bool started_ = false;
  TimePoint window_start_{};
  std::uint32_t written_ = 0;    // in the current window
  std::uint64_t held_back_ = 0;  // not yet reported
};

}  // namespace kvlink
