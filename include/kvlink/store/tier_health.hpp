// A storage tier's own health, judged like the server link's
// (health/policy.hpp) and, like it, pure logic on an injected `now`: the
// driver reports I/O as it starts and ends and carries out the actions.
//
// States: healthy <-> degraded.
// - healthy: the tier takes work. failure_threshold consecutive I/O
//   failures, or one operation in flight past op_deadline (a stall), make it
//   degraded.
// - degraded: nothing new is sent to the tier (accepting() is false; the
//   server serves from L1 alone). Probes go out with exponential backoff and
//   jitter; success_threshold consecutive successful probes make it healthy
//   again. A probe unanswered after op_deadline has failed. Operations that
//   were in flight finish as they may; they are not evidence either way.
// Which errors count: an Error in errno's category (EIO, ENOSPC, EROFS,
// ENOENT of a vanished directory...) or timed_out. Errors about one chunk
// (a checksum mismatch, a slot past a truncated file's end: kvlink codes)
// are the index's business, not the tier's health.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"

namespace kvlink::store {

enum class TierState : std::uint8_t { healthy, degraded };
const char* tier_state_name(TierState s);

struct TierHealthConfig {
  // An operation without a completion this long after it started is a stall.
  Duration op_deadline = std::chrono::seconds(2);
  int failure_threshold = 1;  // a disk that says EIO once is not trusted
  int success_threshold = 1;
  // Probe backoff: first delay, growth factor, cap, random spread (0 to 0.5).
  Duration probe_initial = std::chrono::milliseconds(100);
  double probe_multiplier = 2.0;
  Duration probe_max = std::chrono::seconds(30);
  double probe_jitter = 0.2;
};

struct TierTransition {
  TierState from = TierState::healthy;
  TierState to = TierState::healthy;
  std::string line;  // one log line saying what happened and what follows
  TimePoint at{};
  Duration outage{};  // degraded -> healthy: how long the tier was out
};

// What the driver must do after an input.
struct TierActions {
  bool probe = false;  // run one probe now; report it with probe_finished(probe_id)
  std::uint64_t probe_id = 0;
  std::optional<TierTransition> transition;
};

struct TierCounters {
  std::uint64_t io_errors = 0;
  std::uint64_t stalls = 0;
  std::uint64_t probes = 0;
  std::uint64_t probes_failed = 0;
  std::uint64_t transitions = 0;
};

// Whether an operation's result says something about the tier's health.
bool is_tier_failure(const Error& e);

class TierHealth {
 public:
  using OpId = std::uint64_t;

  // `name` goes into the log lines ("disk tier /var/cache/kvlink").
  TierHealth(const TierHealthConfig& config, std::string name, std::uint64_t seed);

  TierState state() const { return state_; }
  // Whether new work may go to the tier.
  bool accepting() const { return state_ == TierState::healthy; }
  const TierCounters& counters() const { return counters_; }
  // When tick() has something to do: the oldest operation's deadline, the
  // next probe or the deadline of the one in flight (TimePoint::max() when
  // nothing).
  TimePoint next_wakeup() const;
  // Delay before the next probe would be scheduled (before jitter).
  Duration backoff() const { return backoff_; }

  // Inputs.
  OpId op_started(TimePoint now, std::string what);
  TierActions op_finished(OpId id, TimePoint now, const Error& result);
  TierActions tick(TimePoint now);
  // A probe's result; one that is not the latest probe's is ignored.
  TierActions probe_finished(TimePoint now, std::uint64_t probe_id, const Error& result);

 private:
  struct Op {
    TimePoint started;
    std::string what;
  };
  void failure(TierActions& a, TimePoint now, const std::string& why);
  void schedule_probe(TimePoint now);
  void probe_failed(TimePoint now);

  TierHealthConfig config_;
  std::string name_;
  std::mt19937_64 rng_;
  TierState state_ = TierState::healthy;
  TimePoint since_{};
  std::map<OpId, Op> ops_;    // in flight, oldest first (ids grow with time)
  std::map<OpId, Op> stalled_;  // reported as stalls, not finished yet
  OpId next_op_ = 1;
  int failures_ = 0;
  int successes_ = 0;
  bool probe_in_flight_ = false;
  std::uint64_t probe_id_ = 0;
  TimePoint probe_started_{};
  TimePoint probe_at_ = TimePoint::max();
  Duration backoff_{};
  TierCounters counters_;
};

}  // namespace kvlink::store
