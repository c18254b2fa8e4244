// Requests whose work grows with their keys (chunks x world size: LOOKUP,
// END_SESSION, FREE_LOOKUP_LOCKS) or with L1 (CLEAR) run a slice at a time,
// so one client's
// largest legal request cannot hold the io thread while every engine's PING
// waits. Between slices the network layer serves the other connections and
// holds this connection's later frames, so its requests keep their order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "kvlink/clock.hpp"

namespace kvlink::server {

class ReplySink;

// Keys (chunk x rank visits) one slice may touch: tens of microseconds.
inline constexpr std::size_t keys_per_slice = 1024;

// A loop over (item, rank) pairs, run a budget at a time.
class SlicedLoop {
 public:
  SlicedLoop(std::size_t items, std::uint32_t ranks)
      : ranks_(std::max<std::uint32_t>(ranks, 1)), total_(items * ranks_) {}
  // Calls f(item, rank) for up to `budget` more pairs and takes them from
  // the budget. Returns true once every pair was visited.
  template <class F>
  bool run(std::size_t& budget, F&& f) {
    const std::size_t end = std::min(total_, next_ + budget);
    budget -= end - next_;
    for (; next_ < end; ++next_) f(next_ / ranks_, static_cast<std::uint32_t>(next_ % ranks_));
    return next_ == total_;
  }

 private:
  std::uint32_t ranks_;
  std::size_t total_;
  std::size_t next_ = 0;
};

// What is left of a request after a slice: called with a fresh budget until
// it returns true (it has then replied).
using UnfinishedWork = std::function<bool(ReplySink& sink, TimePoint now, std::size_t& budget)>;

}  // namespace kvlink::server
