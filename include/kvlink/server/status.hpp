// What the server's admin plane shows (issue 16): one snapshot of the
// server's state, taken on the io thread and handed whole to the HTTP
// threads, which render it as /status JSON or /metrics Prometheus text and
// never touch the io thread's state. Plain data plus pure functions.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/metrics/histogram.hpp"
#include "kvlink/server/peer.hpp"
#include "kvlink/store/lower_tier.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

using WallClock = std::chrono::system_clock;

// Something an operator wants to see happen: an engine connects, leaves,
// registers, is reaped or refused. Kept on the io thread's clock; shown in
// wall time.
struct ServerEvent {
  enum class Kind : std::uint8_t { connect, disconnect, register_kv_cache, unregister, reap, refusal };
  TimePoint at{};
  Kind kind = Kind::connect;
  std::uint64_t instance = 0;  // 0: not tied to a known instance (a refused HELLO)
  std::string text;
};
const char* event_kind_name(ServerEvent::Kind kind);

// The last events, oldest first; the oldest are dropped past `capacity`.
class EventLog {
 public:
  explicit EventLog(std::size_t capacity = 100) : capacity_(capacity) {}
  void record(TimePoint at, ServerEvent::Kind kind, std::uint64_t instance, std::string text) {
    if (events_.size() == capacity_) events_.pop_front();
    events_.push_back({at, kind, instance, std::move(text)});
  }
  const std::deque<ServerEvent>& events() const { return events_; }

 private:
  std::size_t capacity_;
  std::deque<ServerEvent> events_;
};

struct InstanceStatus {
  struct Registration {
    std::string model;
    std::uint64_t ns = 0;
    std::uint32_t world_size = 1;
    std::uint32_t kv_rank = 0;
    std::uint64_t chunk_bytes = 0;
    std::string layout;  // "32 layers, 2 planes, block 16 tokens x 8 heads x 128 x 2 bytes"
    std::string data_path_error;  // the transfer engine's word; "" while it works
  };
  std::uint64_t id = 0;
  wire::Role role = wire::Role::scheduler;
  std::string client;
  Peer peer;
  std::uint32_t connections = 0;  // open now; 0: disconnected, kept for its registration
  Duration since_seen{};
  std::optional<Registration> registration;
  std::uint32_t transfers_in_flight = 0;
};

struct NamespaceStatus {
  std::uint64_t ns = 0;
  std::string model;  // of a registration in this namespace; "" if none is registered now
  std::uint64_t chunks = 0;
  std::uint64_t bytes = 0;
};

// Counters the handler keeps for the admin plane beyond STATS.
struct TrafficTotals {
  std::uint64_t lookup_requested_tokens = 0;  // tokens of the chunks lookups asked for
  std::uint64_t lookup_hit_tokens = 0;        // of those, matched in L1
  std::uint64_t stored_bytes = 0;             // copied into L1 by completed STOREs
  std::uint64_t retrieved_bytes = 0;          // copied out of L1 by completed RETRIEVEs
  std::uint64_t stores_completed = 0;
  std::uint64_t retrieves_completed = 0;
  std::array<metrics::Histogram, wire::max_opcode + 1> latency{};  // per opcode, receipt to reply
};

// Cumulative values sampled now and then, for the status page's charts.
struct HistorySample {
  WallClock::time_point at{};
  std::uint64_t l1_used_bytes = 0;
  std::uint64_t lookup_requested_tokens = 0;
  std::uint64_t lookup_hit_tokens = 0;
  std::uint64_t stored_bytes = 0;
  std::uint64_t retrieved_bytes = 0;
};

// A tier below L1 (disk, cluster) as the status page shows it.
struct TierStatus {
  std::string name;
  store::LowerTierStats stats;
  std::vector<store::TierNode> nodes;  // a cluster's masters
};

struct ServerStatus {
  // ---- the server (network layer) ----
  std::uint64_t boot_id = 0;
  std::vector<std::string> listeners;
  std::string transfer_engine;
  bool ready = false;  // L1 mapped and every listener accepts
  WallClock::time_point started_at{};
  WallClock::time_point taken_at{};  // wall clock when this snapshot was taken
  TimePoint taken_steady{};          // the io thread's clock then (events convert from it)
  std::vector<HistorySample> history;  // oldest first

  // ---- the request handler ----
  bool draining = false;
  std::uint64_t transfers_in_flight = 0;
  std::size_t jobs = 0;
  std::size_t sessions = 0;
  // STATS' entries (name, value): every counter the binary protocol shows.
  std::vector<wire::StatEntry> stats;
  TrafficTotals totals;
  std::vector<InstanceStatus> instances;
  std::vector<NamespaceStatus> namespaces;
  std::vector<TierStatus> tiers;  // in lookup order
  std::vector<ServerEvent> events;

  // A STATS entry by name (0 if absent).
  std::int64_t stat(std::string_view name) const;
  WallClock::time_point wall_time(TimePoint t) const {
    return taken_at - std::chrono::duration_cast<WallClock::duration>(taken_steady - t);
  }
};

// Keeps one sample every `interval` over `span`.
class StatusHistory {
 public:
  explicit StatusHistory(Duration interval = std::chrono::seconds(5), Duration span = std::chrono::minutes(15))
      : interval_(interval), capacity_(static_cast<std::size_t>(span / interval)) {}
  // Samples `s` if `interval` passed since the last sample; fills s.history.
  void update(ServerStatus& s, TimePoint now);

 private:
  Duration interval_;
  std::size_t capacity_;
  std::optional<TimePoint> last_;
  std::deque<HistorySample> samples_;
};

// GET /status.
std::string status_json(const ServerStatus& s);
// GET /metrics: Prometheus text format.
std::string status_metrics(const ServerStatus& s);

}  // namespace kvlink::server
