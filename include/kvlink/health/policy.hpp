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
//   -> degraded. After a failed ping the next probe goes out at once: the
//   threshold costs one probe, not one interval.
// - degraded: reconnects with exponential backoff + jitter (capped at the
//   interval); healthy again only after success_threshold consecutive
//   successful pings, sent back to back, and once the adapter has nothing
//   left to restore (registration_pending).
// Beside the states:
// - unknown_instance (the server reaped this idle instance): HELLO again on
//   the same connection; a notice, not a transition.
// - a draining server (planned restart): no pings, no failures; its closing
//   the connection is a notice, and reconnects are not judged until
//   planned_restart_grace has passed.
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
  // How long one verdict may wait for answers, independent of the interval.
  // The failure_threshold probes of a verdict share it: each waits
  // ping_timeout / failure_threshold, or longer (up to ping_timeout) when
  // the measured round trip is slow, so a hung server is reported within
  // about ping_timeout of the first unanswered probe. Degraded, each probe
  // waits the whole ping_timeout.
  Duration ping_timeout = std::chrono::seconds(1);
  // Consecutive failures (once the link has worked) that make it degraded.
  int failure_threshold = 2;
  // Consecutive successful pings that make a degraded link healthy again.
  int success_threshold = 2;
  // Consecutive failures before the first success ever (after the gate
  // opened). 2 forgives one lost ping at start; the probes go back to back,
  // so a dead server is still reported within two ping timeouts.
  int cold_start_failure_threshold = 2;
  // Random spread of the ping interval, as a fraction of it (0 to 0.5).
  double jitter = 0.1;
  // Reconnect backoff: first delay, growth factor, cap, random spread. The
  // cap is also never above `interval`, so a server that comes back is found
  // within about one interval.
  Duration reconnect_initial = std::chrono::milliseconds(20);
  double reconnect_multiplier = 2.0;
  Duration reconnect_max = std::chrono::seconds(2);
  double reconnect_jitter = 0.2;
  // Deadline of one connect + HELLO attempt.
  Duration connect_timeout = std::chrono::seconds(1);
  // After a draining server (planned restart) closed the connection: how
  // long reconnect failures are not judged while its replacement starts.
  Duration planned_restart_grace = std::chrono::seconds(30);
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
  bool send_ping = false;      // send one PING now, deadline probe_timeout()
  bool send_hello = false;     // send HELLO again on the connection (the server forgot this instance)
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
  std::uint64_t hellos_repeated = 0;   // HELLO again after unknown_instance
  std::uint64_t planned_restarts = 0;  // draining notices from the server
  std::uint64_t transitions = 0;
  Duration last_rtt{};
  Duration time_in_state[state_count]{};  // up to the last input
};

class Policy {
 public:
  Policy(const Config& config, TimePoint now, std::uint64_t seed);

  State state() const { return state_; }
  bool gate_open() const { return gate_open_; }
  bool draining() const { return draining_; }
  bool connected() const { return connected_; }
  std::uint64_t boot_id() const { return boot_id_; }
  const Config& config() const { return config_; }
  // Counters with time_in_state brought up to `now`.
  Counters counters(TimePoint now) const;
  // When tick() has something to do next (TimePoint::max() when nothing).
  TimePoint next_wakeup() const;
  // The deadline of the next PING (see Config::ping_timeout).
  Duration probe_timeout() const;

  // Inputs. Each returns what to do now.
  Actions start(TimePoint now);  // first call: connects
  Actions tick(TimePoint now);   // timers: ping, reconnect, max warmup
  Actions gate_opened(TimePoint now, std::string_view reason);
  // A connection finished HELLO (server_draining: its reply said draining).
  Actions connected(TimePoint now, std::uint64_t boot_id, bool server_draining = false);
  // The repeated HELLO (send_hello) was answered, or failed.
  Actions hello_answered(TimePoint now, std::uint64_t boot_id);
  Actions hello_failed(TimePoint now, std::string_view why);
  Actions connect_failed(TimePoint now, std::string_view why);
  Actions ping_ok(TimePoint now, Duration rtt);
  Actions ping_failed(TimePoint now, PingFailure kind, std::string_view why);
  Actions connection_lost(TimePoint now, std::string_view why);
  Actions deadline_missed(TimePoint now);
  // The adapter has state the server must hold before the link may be
  // healthy (a KV-cache registration on its way), or no longer.
  Actions registration_pending(TimePoint now, bool pending);
  // The server announced a planned restart.
  Actions server_draining(TimePoint now, std::string_view why);
  Actions stop(TimePoint now);

 private:
  void enter(Actions& a, State to, std::string reason, TimePoint now);
  void failure(Actions& a, TimePoint now, std::string_view why);
  void maybe_recover(Actions& a, TimePoint now);
  void schedule_reconnect(Actions& a, TimePoint now);
  bool may_ping() const;
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
  bool need_hello_ = false;
  bool hello_in_flight_ = false;
  bool registration_pending_ = false;
  bool draining_ = false;  // planned restart under way
  bool ever_succeeded_ = false;
  std::uint64_t boot_id_ = 0;
  int failures_ = 0;
  int successes_ = 0;
  TimePoint ping_sent_at_{};
  TimePoint next_ping_at_ = TimePoint::max();
  TimePoint reconnect_at_ = TimePoint::max();
  TimePoint planned_until_ = TimePoint::max();  // end of planned_restart_grace
  Duration backoff_{};
  Duration srtt_{};  // smoothed round trip of answered pings (0: none yet)
  std::string last_connect_error_;
  Counters counters_;
};

}  // namespace kvlink::health
