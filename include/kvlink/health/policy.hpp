// The health state machine as pure logic (sans-io): no sockets, no Asio, no
// clock reads. The monitor (health/monitor.hpp) feeds it events with the
// current time and carries out the actions it returns; unit tests and the
// fuzzer drive it with fake time.
//
// States: warming -> healthy <-> degraded, and stopped (terminal).
// - warming: the warmup gate is closed. No pings; nothing is judged a server
//   failure. The link still connects (adapters register through it), and a
//   lost connection is reported as a notice, not a transition.
// - healthy: pings succeed. failure_threshold consecutive failures (ping
//   timeouts/errors, missed request deadlines) or a lost connection at once
//   -> degraded.
// - degraded: reconnects with exponential backoff + jitter; healthy again only
//   after success_threshold consecutive successful pings (hysteresis) and, if
//   the server restarted (boot id changed) or answered unknown_instance,
//   after the re-registration hook succeeded.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>

#include "kvlink/clock.hpp"

namespace kvlink::health {

enum class State : std::uint8_t { warming = 0, healthy = 1, degraded = 2, stopped = 3 };
inline constexpr int state_count = 4;
const char* state_name(State s);

struct Config {
  // Time between pings (each one jittered by +/- jitter * interval).
  Duration interval = std::chrono::seconds(1);
  // Deadline of each ping, independent of the interval.
  Duration ping_timeout = std::chrono::seconds(1);
  // Consecutive failures (once the link has worked) that make it degraded.
  int failure_threshold = 2;
  // Consecutive successful pings that make a degraded link healthy again.
  int success_threshold = 2;
  // Consecutive failures before the first success ever (after the gate
  // opened): with no history to protect, report a dead server at once.
  int cold_start_failure_threshold = 1;
  // Random spread of the ping interval, as a fraction of it (0 to 0.5).
  double jitter = 0.1;
  // Reconnect backoff: first delay, growth factor, cap, random spread.
  Duration reconnect_initial = std::chrono::milliseconds(20);
  double reconnect_multiplier = 2.0;
  Duration reconnect_max = std::chrono::seconds(2);
  double reconnect_jitter = 0.2;
  // Deadline of one connect + HELLO attempt.
  Duration connect_timeout = std::chrono::seconds(1);
  // Deadline of one run of the re-registration hook; past it the attempt
  // counts as failed (its late result is ignored) and is retried.
  Duration reregister_timeout = std::chrono::seconds(10);
  // The gate opens by itself after this long, so an idle but live engine
  // still pings and is not reaped by the server.
  Duration max_warmup = std::chrono::minutes(30);
};

// Why a ping failed.
enum class PingFailure : std::uint8_t { timeout, error, unknown_instance };

struct Transition {
  State from = State::warming;
  State to = State::warming;
  std::string reason;
  TimePoint at{};
  Duration outage{};  // degraded -> healthy: how long the outage lasted
};

// What the driver must do after an input. Several may be set at once.
struct Actions {
  bool open_gate = false;      // max_warmup elapsed: open the warmup gate
  bool connect = false;        // start one connect + HELLO attempt now
  bool send_ping = false;      // send one PING now, deadline ping_timeout
  bool reregister = false;     // run the re-registration hook now
  bool hello_first = false;    //   ...after sending HELLO again on the connection
  std::optional<Duration> reconnect_after;  // a reconnect was scheduled this far ahead
  std::optional<Transition> transition;
  std::string notice;          // an observable event that is not a transition
};

struct Counters {
  std::uint64_t pings_sent = 0;
  std::uint64_t pings_ok = 0;
  std::uint64_t pings_failed = 0;
  std::uint64_t deadlines_missed = 0;
  std::uint64_t connects_ok = 0;
  std::uint64_t connects_failed = 0;
  std::uint64_t connections_lost = 0;
  std::uint64_t reregistrations = 0;
  std::uint64_t transitions = 0;
  Duration last_rtt{};
  Duration time_in_state[state_count]{};  // up to the last input
};

class Policy {
 public:
  Policy(const Config& config, TimePoint now, std::uint64_t seed);

  State state() const { return state_; }
  bool gate_open() const { return gate_open_; }
  bool connected() const { return connected_; }
  std::uint64_t boot_id() const { return boot_id_; }
  const Config& config() const { return config_; }
  // Counters with time_in_state brought up to `now`.
  Counters counters(TimePoint now) const;
  // When tick() has something to do next (TimePoint::max() when nothing).
  TimePoint next_wakeup() const;

  // Inputs. Each returns what to do now.
  Actions start(TimePoint now);  // first call: connects
  Actions tick(TimePoint now);   // timers: ping, reconnect, max warmup
  Actions gate_opened(TimePoint now, std::string_view reason);
  Actions connected(TimePoint now, std::uint64_t boot_id);
  Actions connect_failed(TimePoint now, std::string_view why);
  Actions ping_ok(TimePoint now, Duration rtt);
  Actions ping_failed(TimePoint now, PingFailure kind, std::string_view why);
  Actions connection_lost(TimePoint now, std::string_view why);
  Actions deadline_missed(TimePoint now);
  Actions reregistered(TimePoint now, bool ok, std::string_view why);
  Actions stop(TimePoint now);

 private:
  void enter(Actions& a, State to, std::string reason, TimePoint now);
  void failure(Actions& a, TimePoint now, std::string_view why);
  void maybe_recover(Actions& a, TimePoint now);
  void schedule_reconnect(Actions& a, TimePoint now);
  Duration jittered(Duration d, double fraction);
  void account(TimePoint now);

  Config config_;
  std::mt19937_64 rng_;
  State state_ = State::warming;
  TimePoint created_;
  TimePoint state_since_;
  TimePoint accounted_until_;
  bool started_ = false;
  bool gate_open_ = false;
  bool connected_ = false;
  bool connecting_ = false;
  bool ping_in_flight_ = false;
  bool reregister_in_flight_ = false;
  bool need_reregister_ = false;
  bool hello_first_ = false;
  bool ever_succeeded_ = false;
  std::uint64_t boot_id_ = 0;
  int failures_ = 0;
  int successes_ = 0;
  TimePoint ping_sent_at_{};
  TimePoint next_ping_at_ = TimePoint::max();
  TimePoint reconnect_at_ = TimePoint::max();
  TimePoint reregister_at_ = TimePoint::max();
  TimePoint reregister_deadline_ = TimePoint::max();
  Duration backoff_{};
  std::string last_connect_error_;
  Counters counters_;
};

}  // namespace kvlink::health
