// The server's liveness registry (sans-io): which client instances are
// alive. HELLO registers an instance; any traffic refreshes it; the reaper
// (tick) forgets instances silent for longer than reap_timeout, or for
// registration_grace when the instance registered KV caches but never
// pinged yet, and calls the release hook so the store frees what the
// instance held. After reaping, the instance is unknown until it sends
// HELLO again: its PINGs answer unknown_instance.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <unordered_map>

#include "kvlink/clock.hpp"

namespace kvlink::server {

struct LivenessConfig {
  Duration reap_timeout = std::chrono::seconds(120);
  Duration registration_grace = std::chrono::hours(1);
};

class LivenessRegistry {
 public:
  using ReleaseHook = std::function<void(std::uint64_t instance_id)>;

  explicit LivenessRegistry(LivenessConfig config = {}) : config_(config) {}

  void set_config(LivenessConfig config) { config_ = config; }
  // Called for every reaped instance.
  void on_release(ReleaseHook hook) { release_ = std::move(hook); }

  // HELLO: the instance is known (again) from now on.
  void hello(std::uint64_t id, TimePoint now) {
    auto& e = instances_[id];
    e.last_seen = now;
  }
  // What a request tells about its instance, beyond being alive.
  enum class Traffic : std::uint8_t { other, ping, registration };

  // Any traffic from a known instance, with one lookup. Returns false if
  // the instance is unknown (then nothing is recorded).
  bool refresh(std::uint64_t id, TimePoint now, Traffic kind = Traffic::other) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return false;
    it->second.last_seen = now;
    if (kind == Traffic::ping) it->second.pinged = true;
    if (kind == Traffic::registration) it->second.registered = true;
    return true;
  }
  void pinged(std::uint64_t id, TimePoint now) { refresh(id, now, Traffic::ping); }
  void registered(std::uint64_t id, TimePoint now) { refresh(id, now, Traffic::registration); }
  bool known(std::uint64_t id) const { return instances_.contains(id); }
  std::size_t size() const { return instances_.size(); }
  std::uint64_t reaped() const { return reaped_; }

  // Reaps silent instances; returns how many.
  std::size_t reap(TimePoint now) {
    std::size_t n = 0;
    for (auto it = instances_.begin(); it != instances_.end();) {
      const Entry& e = it->second;
      const Duration limit =
          e.registered && !e.pinged ? std::max(config_.registration_grace, config_.reap_timeout) : config_.reap_timeout;
      if (now - e.last_seen > limit) {
        const std::uint64_t id = it->first;
        it = instances_.erase(it);
        ++n;
        ++reaped_;
        if (release_) release_(id);
      } else {
        ++it;
      }
    }
    return n;
  }

 private:
  struct Entry {
    TimePoint last_seen{};
    bool registered = false;
    bool pinged = false;
  };
  LivenessConfig config_;
  ReleaseHook release_;
  std::unordered_map<std::uint64_t, Entry> instances_;
  std::uint64_t reaped_ = 0;
};

}  // namespace kvlink::server
