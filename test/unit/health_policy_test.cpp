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
    now += p.config().ping_timeout;
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
  d.connect(7);  // same boot id: no re-registration
  CHECK_FALSE(d.a.reregister);
  d.ping_ok();
  CHECK(d.p.state() == State::degraded);
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: boot id change -> re-register before healthy") {
  Driver d;
  d.healthy();
  d.take(d.p.connection_lost(d.now, "eof"));
  d.connect(8);
  CHECK(d.a.notice.find("server restarted") != std::string::npos);
  auto& a = d.advance();
  REQUIRE(a.reregister);
  CHECK_FALSE(a.hello_first);
  CHECK_FALSE(a.send_ping);  // no pings count until re-registered
  CHECK(d.p.next_wakeup() == d.now + d.p.config().reregister_timeout);  // only the hook's deadline
  d.take(d.p.reregistered(d.now, false, "no memory"));
  CHECK(d.p.state() == State::degraded);
  REQUIRE(d.advance().reregister);
  d.take(d.p.reregistered(d.now, true, ""));
  d.ping_ok();
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
  CHECK(d.p.counters(d.now).reregistrations == 1);
}

TEST_CASE("policy: a re-registration that never completes times out and is retried") {
  Config c = fast_config();
  c.reregister_timeout = 500ms;
  Driver d(c);
  d.healthy();
  d.take(d.p.connection_lost(d.now, "eof"));
  d.connect(8);
  REQUIRE(d.advance().reregister);
  const TimePoint started = d.now;
  auto& a = d.advance();  // the hook hangs: the next thing due is its deadline
  CHECK(d.now - started == 500ms);
  CHECK(a.notice == "re-registration timed out");
  CHECK_FALSE(a.reregister);
  d.take(d.p.reregistered(d.now, true, ""));  // the late answer of the timed-out attempt
  CHECK(d.p.counters(d.now).reregistrations == 0);
  REQUIRE(d.advance().reregister);  // retried after about an interval
  d.take(d.p.reregistered(d.now, true, ""));
  d.ping_ok();
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
}

TEST_CASE("policy: unknown_instance -> degraded, HELLO + re-register, then recover") {
  Driver d;
  d.healthy();
  REQUIRE(d.advance().send_ping);
  d.take(d.p.ping_failed(d.now, PingFailure::unknown_instance, "unknown instance"));
  CHECK(d.p.state() == State::degraded);
  auto& a = d.advance();
  REQUIRE(a.reregister);
  CHECK(a.hello_first);
  d.take(d.p.reregistered(d.now, true, ""));
  d.ping_ok();
  d.ping_ok();
  CHECK(d.p.state() == State::healthy);
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
  CHECK_FALSE(d.a.reregister);  // first boot id seen: nothing to re-register
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
        case 7: d.take(d.p.reregistered(d.now, rng() % 2, "x")); break;
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
      if (d.p.state() == State::healthy) CHECK(d.p.connected());
    }
  }
}
