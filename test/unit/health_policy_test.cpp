// The health state machine with fake time: no sockets, no Asio.
#include <doctest/doctest.h>

#include "kvlink/health/policy.hpp"

using namespace kvlink;
using namespace kvlink::health;
using namespace std::chrono_literals;

namespace {

Config fast_config() {
  Config c;
  c.interval = 100ms;
  c.ping_timeout = 100ms;
  c.failure_threshold = 2;
  c.success_threshold = 2;
  c.jitter = 0.1;
  c.reconnect_initial = 10ms;
  c.reconnect_multiplier = 2;
  c.reconnect_max = 80ms;
  c.reconnect_jitter = 0;
  c.max_warmup = 10min;
  return c;
}

// Drives a Policy like the monitor does, with fake time.
struct Driver {
  TimePoint now{};
  Policy p;
  int transitions = 0;
  std::optional<Transition> last;
  Actions a;
  explicit Driver(Config c = fast_config()) : p(c, TimePoint{}, 42) {}

  Actions& take(Actions x) {
    a = std::move(x);
    if (a.transition) {
      ++transitions;
      last = a.transition;
    }
    return a;
  }
  // Advances to the next wakeup (at most `limit` ahead) and ticks.
  Actions& advance(Duration limit = 1h) {
    TimePoint t = std::min(p.next_wakeup(), now + limit);
    if (t > now) now = t;
    return take(p.tick(now));
  }
  void connect(std::uint64_t boot = 7) {
    REQUIRE(advance().connect);
    take(p.connected(now, boot));
  }
  // Next ping goes out and is answered / fails.
  void ping_ok() {
    REQUIRE(advance().send_ping);
    now += 1ms;
    take(p.ping_ok(now, 1ms));
  }
  void ping_timeout() {
    REQUIRE(advance().send_ping);
    now += p.probe_timeout();
    take(p.ping_failed(now, PingFailure::timeout, "timed out"));
  }
  void healthy() {
    take(p.start(now));
    REQUIRE(a.connect);
    take(p.connected(now, 7));
    take(p.gate_opened(now, "test"));
    ping_ok();
    REQUIRE(p.state() == State::healthy);
  }
};

}  // namespace

TEST_CASE("policy: warming until the gate opens, no pings while closed") {
  Driver d;
  d.take(d.p.start(d.now));
  CHECK(d.a.connect);
  d.take(d.p.connected(d.now, 7));
  // Hours pass before max_warmup: nothing to do but wait.
  for (int i = 0; i < 5; ++i) {
    auto& a = d.advance(1min);
    CHECK_FALSE(a.send_ping);
  }
  CHECK(d.p.state() == State::warming);
  // Lost connection during warmup: a notice, no transition, and a reconnect.
  d.take(d.p.connection_lost(d.now, "eof"));
  CHECK_FALSE(d.a.transition);
  CHECK(d.a.notice.find("during warmup") != std::string::npos);
  CHECK(d.p.state() == State::warming);
  CHECK(d.advance().connect);
  d.take(d.p.connect_failed(d.now, "refused"));
  CHECK_FALSE(d.a.transition);  // not judged while warming
  CHECK(d.a.reconnect_after);
  CHECK(d.transitions == 0);
}

TEST_CASE("policy: max_warmup asks to open the gate") {
  Driver d;
  d.take(d.p.start(d.now));
  d.take(d.p.connected(d.now, 7));
  auto& a = d.advance();
  CHECK(a.open_gate);
  CHECK(d.now >= TimePoint{} + 10min);
  d.take(d.p.gate_opened(d.now, "max warmup"));
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.last->reason == "first ping answered");
}

TEST_CASE("policy: failure_threshold consecutive ping timeouts -> degraded; one is not enough") {
  Driver d;
  d.healthy();
  d.ping_timeout();
  CHECK(d.p.state() == State::healthy);
  d.ping_ok();  // resets the count
  d.ping_timeout();
  CHECK(d.p.state() == State::healthy);
  const TimePoint first_failed_ping = d.now;
  d.ping_timeout();
  CHECK(d.p.state() == State::degraded);
  CHECK(d.last->from == State::healthy);
  CHECK(d.last->reason.find("ping timed out") != std::string::npos);
  // The next ping follows the failed one by about an interval, not interval + timeout.
  CHECK(d.now - first_failed_ping <= 110ms + 100ms);
}

TEST_CASE("policy: hang detection fits interval + 2 timeouts") {
  Driver d;
  d.healthy();
  // The server hangs right after a successful ping.
  const TimePoint hang = d.now;
  d.ping_timeout();
  d.ping_timeout();
  REQUIRE(d.p.state() == State::degraded);
  CHECK(d.now - hang <= 350ms);
}

TEST_CASE("policy: hysteresis - success_threshold successes to recover, a failure resets the count") {
  Driver d;
  d.healthy();
  d.ping_timeout();
  d.ping_timeout();
  REQUIRE(d.p.state() == State::degraded);
  d.ping_ok();
  CHECK(d.p.state() == State::degraded);
  d.ping_timeout();
  d.ping_ok();
  CHECK(d.p.state() == State::degraded);
  const TimePoint before = d.now;
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.last->outage > 0ms);
  CHECK(d.last->outage >= d.now - before);
}

TEST_CASE("policy: lost connection -> degraded at once, reconnect with backoff, recover") {
  Driver d;
  d.healthy();
  d.take(d.p.connection_lost(d.now, "peer closed"));
  REQUIRE(d.a.transition);
  CHECK(d.p.state() == State::degraded);
  CHECK(d.last->reason.find("connection lost") != std::string::npos);
  // First reconnect at once, then 10, 20, 40, 80, 80 ms.
  std::vector<Duration> delays;
  for (int i = 0; i < 6; ++i) {
    CHECK(d.advance().connect);
    d.take(d.p.connect_failed(d.now, "refused"));
    REQUIRE(d.a.reconnect_after);
    delays.push_back(*d.a.reconnect_after);
  }
  CHECK(delays == std::vector<Duration>{10ms, 20ms, 40ms, 80ms, 80ms, 80ms});
  CHECK(d.p.state() == State::degraded);
  d.connect(7);
  d.ping_ok();
  CHECK(d.p.state() == State::degraded);
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: a pending registration holds the link out of healthy; pings go on meanwhile") {
  Driver d;
  d.healthy();
  d.take(d.p.connection_lost(d.now, "eof"));
  d.connect(8);
  CHECK(d.a.notice.find("server restarted") != std::string::npos);
  d.take(d.p.registration_pending(d.now, true));  // the adapter re-registers on the new server
  d.ping_ok();
  d.ping_ok();
  d.ping_ok();
  CHECK(d.p.state() == State::degraded);
  d.take(d.p.registration_pending(d.now, false));
  REQUIRE(d.a.transition);
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: unknown_instance -> HELLO again on the same connection: a notice, no transition") {
  Driver d;
  d.healthy();
  REQUIRE(d.advance().send_ping);
  d.take(d.p.ping_failed(d.now, PingFailure::unknown_instance, "unknown instance"));
  CHECK_FALSE(d.a.transition);
  CHECK(d.a.notice.find("HELLO again") != std::string::npos);
  auto& a = d.advance();
  REQUIRE(a.send_hello);
  CHECK_FALSE(a.send_ping);  // no pings until the server knows the instance again
  CHECK_FALSE(d.p.tick(d.now).send_hello);  // one HELLO at a time
  d.take(d.p.hello_answered(d.now, 7));
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.transitions == 1);  // warming -> healthy only
  CHECK(d.p.counters(d.now).hellos_repeated == 1);
}

TEST_CASE("policy: an idle warming scheduler that was reaped says HELLO again without a transition") {
  Driver d;
  d.take(d.p.start(d.now));
  d.take(d.p.connected(d.now, 7));
  d.take(d.p.gate_opened(d.now, "first lookup"));
  REQUIRE(d.advance().send_ping);
  d.take(d.p.ping_failed(d.now, PingFailure::unknown_instance, "reaped"));
  CHECK(d.p.state() == State::warming);
  REQUIRE(d.advance().send_hello);
  d.take(d.p.hello_answered(d.now, 7));
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.last->from == State::warming);
}

TEST_CASE("policy: a failed repeated HELLO counts as a failure and is tried again") {
  Driver d;
  d.healthy();
  REQUIRE(d.advance().send_ping);
  d.take(d.p.ping_failed(d.now, PingFailure::unknown_instance, "x"));
  REQUIRE(d.advance().send_hello);
  d.take(d.p.hello_failed(d.now, "timed out"));
  CHECK(d.p.state() == State::healthy);
  REQUIRE(d.advance().send_hello);
  d.take(d.p.hello_failed(d.now, "timed out"));
  CHECK(d.p.state() == State::degraded);
}

TEST_CASE("policy: a failed ping is confirmed by a probe at once; the verdict takes ping_timeout, not more") {
  Driver d;
  d.healthy();
  CHECK(d.p.probe_timeout() == d.p.config().ping_timeout / 2);  // two probes share it
  REQUIRE(d.advance().send_ping);
  const TimePoint first = d.now;
  d.now += d.p.probe_timeout();
  d.take(d.p.ping_failed(d.now, PingFailure::timeout, "timed out"));
  CHECK(d.p.state() == State::healthy);
  CHECK(d.p.next_wakeup() == d.now);
  REQUIRE(d.advance().send_ping);
  d.now += d.p.probe_timeout();
  d.take(d.p.ping_failed(d.now, PingFailure::timeout, "timed out"));
  CHECK(d.p.state() == State::degraded);
  CHECK(d.now - first == d.p.config().ping_timeout);
  // Degraded, no verdict to hurry: a probe waits the whole ping_timeout.
  CHECK(d.p.probe_timeout() == d.p.config().ping_timeout);
}

TEST_CASE("policy: a slow server's probes wait longer, up to ping_timeout") {
  Driver d;
  d.healthy();
  for (int i = 0; i < 40; ++i) {  // round trips of 30 ms: 4 x 30 > 100 / 2
    REQUIRE(d.advance().send_ping);
    d.now += 30ms;
    d.take(d.p.ping_ok(d.now, 30ms));
  }
  CHECK(d.p.probe_timeout() == d.p.config().ping_timeout);
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: recovering, the confirming pings go back to back") {
  Driver d;
  d.healthy();
  d.take(d.p.connection_lost(d.now, "eof"));
  d.connect(8);
  const TimePoint up = d.now;
  d.ping_ok();  // 1 ms each
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.now - up == 2ms);
}

TEST_CASE("policy: the default cold start forgives one lost ping") {
  Config c = fast_config();
  c.cold_start_failure_threshold = Config{}.cold_start_failure_threshold;
  CHECK(c.cold_start_failure_threshold == 2);
  Driver d(c);
  d.take(d.p.start(d.now));
  d.take(d.p.connected(d.now, 7));
  d.take(d.p.gate_opened(d.now, "ready"));
  d.ping_timeout();
  CHECK(d.p.state() == State::warming);
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: reconnect backoff never waits longer than the interval") {
  Config c = fast_config();
  c.reconnect_max = 10s;  // capped by interval (100 ms)
  Driver d(c);
  REQUIRE(d.take(d.p.start(d.now)).connect);
  Duration longest{};
  for (int i = 0; i < 12; ++i) {
    if (i > 0) REQUIRE(d.advance().connect);
    d.take(d.p.connect_failed(d.now, "refused"));
    REQUIRE(d.a.reconnect_after);
    longest = std::max(longest, *d.a.reconnect_after);
  }
  CHECK(longest == 100ms);
}

TEST_CASE("policy: planned restart: draining, the server closes, the replacement answers: no degraded") {
  Driver d;
  d.healthy();
  d.take(d.p.server_draining(d.now, "SIGTERM"));
  CHECK(d.p.draining());
  CHECK(d.a.notice.find("planned restart") != std::string::npos);
  CHECK_FALSE(d.advance(1s).send_ping);  // nothing judged on a draining server
  d.take(d.p.connection_lost(d.now, "eof"));
  CHECK_FALSE(d.a.transition);
  for (int i = 0; i < 5; ++i) {  // the replacement is not listening yet
    REQUIRE(d.advance().connect);
    d.take(d.p.connect_failed(d.now, "refused"));
    CHECK_FALSE(d.a.transition);
  }
  d.connect(8);
  CHECK_FALSE(d.p.draining());
  CHECK(d.a.notice.find("planned restart complete") != std::string::npos);
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.transitions == 1);  // only warming -> healthy at the start
  CHECK(d.p.counters(d.now).planned_restarts == 1);
}

TEST_CASE("policy: a planned restart whose replacement never comes -> degraded after the grace") {
  Config c = fast_config();
  c.planned_restart_grace = 2s;
  Driver d(c);
  d.healthy();
  d.take(d.p.server_draining(d.now, "SIGTERM"));
  d.take(d.p.connection_lost(d.now, "eof"));
  const TimePoint lost = d.now;
  while (d.p.state() == State::healthy) {
    if (d.advance().connect) d.take(d.p.connect_failed(d.now, "refused"));
  }
  CHECK(d.p.state() == State::degraded);
  CHECK(d.now - lost >= 2s);
  CHECK(d.now - lost <= 2s + 100ms);
  CHECK(d.last->reason.find("did not come back") != std::string::npos);
}

TEST_CASE("policy: server absent at start -> degraded when the gate opens, recovers when it appears") {
  Driver d;
  d.take(d.p.start(d.now));
  d.take(d.p.connect_failed(d.now, "cannot connect"));
  CHECK(d.p.state() == State::warming);
  d.take(d.p.gate_opened(d.now, "ready"));
  CHECK(d.p.state() == State::degraded);
  CHECK(d.last->reason.find("cannot connect") != std::string::npos);
  d.connect(9);
  d.ping_ok();
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: cold start failure threshold applies before the first success") {
  Config c = fast_config();
  c.cold_start_failure_threshold = 3;
  Driver d(c);
  d.take(d.p.start(d.now));
  d.take(d.p.connected(d.now, 1));
  d.take(d.p.gate_opened(d.now, "ready"));
  d.ping_timeout();
  d.ping_timeout();
  CHECK(d.p.state() == State::warming);
  d.ping_timeout();
  CHECK(d.p.state() == State::degraded);
}

TEST_CASE("policy: missed deadlines count as failures only after the gate opened") {
  Driver d;
  d.take(d.p.start(d.now));
  d.take(d.p.connected(d.now, 1));
  d.take(d.p.deadline_missed(d.now));
  d.take(d.p.deadline_missed(d.now));
  CHECK(d.p.state() == State::warming);
  d.take(d.p.gate_opened(d.now, "ready"));
  d.ping_ok();
  d.take(d.p.deadline_missed(d.now));
  CHECK(d.p.state() == State::healthy);
  d.take(d.p.deadline_missed(d.now));
  CHECK(d.p.state() == State::degraded);
}

TEST_CASE("policy: stale results are ignored; stopped is terminal; counters add up") {
  Driver d;
  d.healthy();
  d.take(d.p.ping_ok(d.now, 1ms));  // no ping in flight
  CHECK_FALSE(d.a.transition);
  d.now += 1s;
  d.take(d.p.stop(d.now));
  CHECK(d.p.state() == State::stopped);
  CHECK(d.take(d.p.tick(d.now + 1s)).send_ping == false);
  d.take(d.p.connection_lost(d.now, "eof"));
  CHECK_FALSE(d.a.transition);
  CHECK(d.p.next_wakeup() == TimePoint::max());
  auto c = d.p.counters(d.now + 5s);
  CHECK(c.pings_sent == 1);
  CHECK(c.pings_ok == 1);
  CHECK(c.transitions == 2);
  CHECK(c.time_in_state[static_cast<int>(State::stopped)] == 5s);
  CHECK(c.time_in_state[static_cast<int>(State::healthy)] >= 1s);
}

TEST_CASE("policy: jitter spreads the interval within bounds, reproducibly per seed") {
  Config c = fast_config();
  c.jitter = 0.2;
  c.ping_timeout = 1s;
  Driver d(c);
  d.healthy();
  std::vector<Duration> gaps;
  for (int i = 0; i < 50; ++i) {
    const TimePoint before = d.now - 1ms;  // sent 1 ms before the reply
    d.ping_ok();
    gaps.push_back(d.now - 1ms - before);
  }
  bool varied = false;
  for (auto g : gaps) {
    CHECK(g >= 80ms);
    CHECK(g <= 120ms);
    if (g != gaps.front()) varied = true;
  }
  CHECK(varied);
}

TEST_CASE("policy: random inputs never break invariants") {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    Driver d;
    std::mt19937_64 rng(seed);
    d.take(d.p.start(d.now));
    std::uint64_t pings_ok_at_degraded = 0;
    for (int i = 0; i < 2000; ++i) {
      d.now += std::chrono::milliseconds(rng() % 50);
      const State before = d.p.state();
      const bool gate_was_open = d.p.gate_open();
      switch (rng() % 10) {
        case 0: d.take(d.p.gate_opened(d.now, "r")); break;
        case 1: d.take(d.p.connected(d.now, 1 + rng() % 2)); break;
        case 2: d.take(d.p.connect_failed(d.now, "x")); break;
        case 3: d.take(d.p.ping_ok(d.now, 1ms)); break;
        case 4: d.take(d.p.ping_failed(d.now, static_cast<PingFailure>(rng() % 3), "x")); break;
        case 5: d.take(d.p.connection_lost(d.now, "x")); break;
        case 6: d.take(d.p.deadline_missed(d.now)); break;
        case 7:
          switch (rng() % 4) {
            case 0: d.take(d.p.registration_pending(d.now, rng() % 2)); break;
            case 1: d.take(d.p.server_draining(d.now, "x")); break;
            case 2: d.take(d.p.hello_answered(d.now, 1 + rng() % 2)); break;
            default: d.take(d.p.hello_failed(d.now, "x")); break;
          }
          break;
        default: d.take(d.p.tick(d.now)); break;
      }
      const auto c = d.p.counters(d.now);
      if (d.a.transition) {
        CHECK(d.a.transition->from == before);
        CHECK(d.a.transition->to != before);
        CHECK(d.p.gate_open());  // nothing is judged while warming
        if (d.a.transition->to == State::degraded) pings_ok_at_degraded = c.pings_ok;
        if (d.a.transition->from == State::degraded) CHECK(c.pings_ok - pings_ok_at_degraded >= 2);
      }
      if (d.a.send_ping) CHECK((gate_was_open || d.p.gate_open()));
      // Healthy without a connection only while a planned restart runs.
      if (d.p.state() == State::healthy) CHECK((d.p.connected() || d.p.draining()));
    }
  }
}
