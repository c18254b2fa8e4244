#include "kvlink/log_limiter.hpp"

namespace kvlink {

bool LogLimiter::allow(TimePoint now) {
  if (!started_ || now - window_start_ >= config_.window) {
    started_ = true;
    window_start_ = now;
    written_ = 0;
  }
  if (written_ < config_.lines) {
    ++written_;
    return true;
  }
  ++held_back_;
  return false;
}

std::uint64_t LogLimiter::take_held_back(TimePoint now, bool final) {
  if (held_back_ == 0) return 0;
  // Held-back lines fell in the current window or earlier ones: once the
  // current one has ended, all of theirs have.
  if (!final && now - window_start_ < config_.window) return 0;
  const std::uint64_t n = held_back_;
  held_back_ = 0;
  return n;
}

}  // namespace kvlink
