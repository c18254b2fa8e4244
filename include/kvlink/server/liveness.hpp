// The server's liveness registry (sans-io): which client instances the
// server keeps, and for how long. HELLO makes an instance known; any
// traffic refreshes it; the reaper (reap) forgets instances silent for
// longer than reap_timeout, or for registration_grace while the instance
// holds a KV-cache registration but never pinged yet, and calls the release
// hook so the store frees what the instance held. After reaping, the
// instance is unknown until it sends HELLO again: its PINGs answer
// unknown_instance.
//
// The registration lifecycle lives here too. When an instance's last
// connection closes:
//   - holding a registration: it stays known (its registration kept, ageing
//     from its last traffic), so a reconnect finds it; UNREGISTER or the
//     reaper ends it;
//   - holding none: it is forgotten at once (nothing to come back to, and
//     it frees its --max-instances slot).
// Admin connections (kvlink-cli) are never instances and never come here.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <functional>
#include <unordered_map>

#include "kvlink/clock.hpp"

namespace kvlink::server {

struct LivenessConfig {
  // 0: no reaper (instances stay until they leave).
  Duration reap_timeout = std::chrono::seconds(120);
  // Used only when at least reap_timeout (kvlink-server refuses shorter).
  Duration registration_grace = std::chrono::hours(1);
};

class LivenessRegistry {
 public:
  using ReleaseHook = std::function<void(std::uint64_t instance_id)>;

  explicit LivenessRegistry(LivenessConfig config = {}) : config_(config) {}

  void set_config(LivenessConfig config) { config_ = config; }
  // Called for every reaped instance.
  void on_release(ReleaseHook hook) { release_ = std::move(hook); }

  // HELLO: the instance is known (again) from now on; what it held before
  // (a registration kept over a reconnect) stays.
  void hello(std::uint64_t id, TimePoint now) {
    auto& e = instances_[id];
    e.last_seen = now;
  }
  // What a request tells about its instance, beyond being alive.
  enum class Traffic : std::uint8_t { other, ping };

  // Any traffic from a known instance, with one lookup. Returns false if
  // the instance is unknown (then nothing is recorded).
  bool refresh(std::uint64_t id, TimePoint now, Traffic kind = Traffic::other) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return false;
    it->second.last_seen = now;
    if (kind == Traffic::ping) it->second.pinged = true;
    return true;
  }
  void pinged(std::uint64_t id, TimePoint now) { refresh(id, now, Traffic::ping); }
  // A KV cache was registered (true) or unregistered (false) for a known
  // instance: decides the grace and whether a closed instance is kept.
  void registered(std::uint64_t id, TimePoint now, bool holds = true) {
    auto it = instances_.find(id);
    if (it == instances_.end()) return;
    it->second.last_seen = now;
    it->second.registered = holds;
  }
  bool holds_registration(std::uint64_t id) const {
    auto it = instances_.find(id);
    return it != instances_.end() && it->second.registered;
  }

  // The instance's last connection closed. Returns true if it was
  // forgotten (it held no registration); false if it is kept (it holds one)
  // or was not known (reaped while connected).
  bool last_connection_closed(std::uint64_t id) {
    auto it = instances_.find(id);
    if (it == instances_.end() || it->second.registered) return false;
    instances_.erase(it);
    return true;
  }

  bool known(std::uint64_t id) const { return instances_.contains(id); }
  // When a known instance was last heard from; nothing if unknown.
  std::optional<TimePoint> last_seen(std::uint64_t id) const {
    auto it = instances_.find(id);
    if (it == instances_.end()) return std::nullopt;
    return it->second.last_seen;
  }
  std::size_t size() const { return instances_.size(); }
  std::uint64_t reaped() const { return reaped_; }
  bool reaper_enabled() const { return config_.reap_timeout > Duration::zero(); }

  // Reaps silent instances; returns how many.
  std::size_t reap(TimePoint now) {
    if (!reaper_enabled()) return 0;
    std::size_t n = 0;
    for (auto it = instances_.begin(); it != instances_.end();) {
      const Entry& e = it->second;
      // A grace shorter than the timeout would reap registered instances
      // sooner than the rest: never shorter.
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
    bool registered = false;  // holds a KV-cache registration now
    bool pinged = false;
  };
  LivenessConfig config_;
  ReleaseHook release_;
  std::unordered_map<std::uint64_t, Entry> instances_;
  std::uint64_t reaped_ = 0;
};

}  // namespace kvlink::server
