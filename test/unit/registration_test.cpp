// The registration lifecycle with fake time: every order of events the
// worker adapter meets, no sockets.
#include <doctest/doctest.h>

#include <random>

#include "kvlink/health/registration.hpp"

using namespace kvlink;
using namespace kvlink::health;
using namespace std::chrono_literals;
using Kind = RegistrationLifecycle::Action::Kind;
using Outcome = RegistrationLifecycle::Outcome;
using Phase = RegistrationLifecycle::Phase;

namespace {

RegistrationLifecycle::Backoff backoff() { return {10ms, 2.0, 80ms}; }

struct Driver {
  TimePoint now{};
  RegistrationLifecycle r{backoff()};
  RegistrationLifecycle::Action a;
  RegistrationLifecycle::Action& take(RegistrationLifecycle::Action x) { return a = std::move(x); }
  // Acknowledges the REGISTER just sent.
  void ack() {
    REQUIRE(a.kind == Kind::send_register);
    CHECK(take(r.answered(now, a.attempt, Outcome::acknowledged, "")).kind == Kind::acknowledged);
    CHECK(r.held());
  }
};

}  // namespace

TEST_CASE("registration: engine before server: kept, sent on the first connection, gate-independent") {
  Driver d;
  CHECK(d.take(d.r.register_requested(d.now)).kind == Kind::none);  // no server yet
  CHECK(d.r.pending());
  CHECK(d.r.next_wakeup() == TimePoint::max());  // nothing to do until a connection comes up
  d.now += 30s;
  CHECK(d.take(d.r.connection_up(d.now, false, false)).kind == Kind::send_register);
  CHECK(d.r.phase() == Phase::sending);
  d.ack();
  CHECK_FALSE(d.r.pending());
  CHECK(d.r.acknowledgements() == 1);
}

TEST_CASE("registration: a dropped connection to a server that kept it sends nothing; one that lost it gets it") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  d.ack();
  d.take(d.r.connection_lost(d.now));
  CHECK(d.r.held());  // only the next HELLO can tell
  CHECK(d.take(d.r.connection_up(d.now, true, false)).kind == Kind::none);
  CHECK(d.r.held());
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.connection_up(d.now, false, false)).kind == Kind::send_register);  // restarted, or reaped
  CHECK(d.r.pending());
  d.ack();
}

TEST_CASE("registration: a not_registered answer sends it again at once") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  d.ack();
  CHECK(d.take(d.r.not_registered(d.now)).kind == Kind::send_register);
  // A second not_registered from a transfer in flight meanwhile: still one REGISTER.
  CHECK(d.take(d.r.not_registered(d.now)).kind == Kind::none);
}

TEST_CASE("registration: transient failures are retried with a growing, capped backoff") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  std::vector<Duration> waits;
  for (int i = 0; i < 6; ++i) {
    REQUIRE(d.a.kind == Kind::send_register);
    CHECK(d.take(d.r.answered(d.now, d.a.attempt, Outcome::transient, "timed out")).kind == Kind::none);
    CHECK(d.r.phase() == Phase::waiting);
    const TimePoint at = d.r.next_wakeup();
    waits.push_back(at - d.now);
    CHECK(d.take(d.r.tick(at - 1ms)).kind == Kind::none);
    d.now = at;
    d.take(d.r.tick(d.now));
  }
  CHECK(waits == std::vector<Duration>{10ms, 20ms, 40ms, 80ms, 80ms, 80ms});
  d.ack();
  // A new connection starts the backoff over.
  d.take(d.r.connection_lost(d.now));
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.answered(d.now, d.a.attempt, Outcome::transient, "x"));
  CHECK(d.r.next_wakeup() - d.now == 10ms);
}

TEST_CASE("registration: a refusal drops it once; nothing is retried until the engine registers again") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  auto& a = d.take(d.r.answered(d.now, d.a.attempt, Outcome::refused, "slot size does not fit"));
  CHECK(a.kind == Kind::refused);
  CHECK(a.reason == "slot size does not fit");
  CHECK(d.r.phase() == Phase::none);
  CHECK_FALSE(d.r.pending());
  CHECK(d.r.next_wakeup() == TimePoint::max());
  d.now += 1h;
  CHECK(d.take(d.r.tick(d.now)).kind == Kind::none);
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.connection_up(d.now, false, false)).kind == Kind::none);
  CHECK(d.take(d.r.register_requested(d.now)).kind == Kind::send_register);
}

TEST_CASE("registration: unregister racing an in-flight REGISTER: UNREGISTER goes out, the late ack is ignored") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  const auto attempt = d.a.attempt;
  CHECK(d.take(d.r.unregister_requested(d.now)).kind == Kind::send_unregister);
  CHECK_FALSE(d.r.awaiting(attempt));
  CHECK(d.take(d.r.answered(d.now, attempt, Outcome::acknowledged, "")).kind == Kind::none);
  CHECK(d.r.phase() == Phase::none);
  CHECK(d.r.acknowledgements() == 0);
}

TEST_CASE("registration: shutdown racing an in-flight REGISTER: one UNREGISTER, then nothing ever again") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  const auto attempt = d.a.attempt;
  CHECK(d.take(d.r.shutdown_requested(d.now)).kind == Kind::send_unregister);
  CHECK(d.r.stopped());
  CHECK(d.take(d.r.answered(d.now, attempt, Outcome::acknowledged, "")).kind == Kind::none);
  CHECK(d.take(d.r.answered(d.now, attempt, Outcome::refused, "x")).kind == Kind::none);
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.connection_up(d.now, false, false)).kind == Kind::none);
  CHECK(d.take(d.r.register_requested(d.now)).kind == Kind::none);
  CHECK(d.take(d.r.not_registered(d.now)).kind == Kind::none);
  CHECK(d.take(d.r.shutdown_requested(d.now)).kind == Kind::none);
}

TEST_CASE("registration: shutdown with nothing registered sends nothing") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  CHECK(d.take(d.r.shutdown_requested(d.now)).kind == Kind::none);
}

TEST_CASE("registration: registering again while one is in flight supersedes it") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  const auto first = d.a.attempt;
  CHECK(d.take(d.r.register_requested(d.now)).kind == Kind::send_register);
  const auto second = d.a.attempt;
  CHECK(second != first);
  CHECK(d.take(d.r.answered(d.now, first, Outcome::acknowledged, "")).kind == Kind::none);
  CHECK(d.r.pending());
  CHECK(d.take(d.r.answered(d.now, second, Outcome::acknowledged, "")).kind == Kind::acknowledged);
}

TEST_CASE("registration: a REGISTER lost with its connection is sent again on the next one") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  const auto lost = d.a.attempt;
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.answered(d.now, lost, Outcome::transient, "connection lost")).kind == Kind::none);
  CHECK(d.r.next_wakeup() == TimePoint::max());  // no connection: nothing to retry on
  // The server kept an older registration of this instance: not ours to trust.
  CHECK(d.take(d.r.connection_up(d.now, true, false)).kind == Kind::send_register);
}

TEST_CASE("registration: unregister while disconnected is owed to a server that still holds it") {
  Driver d;
  d.take(d.r.connection_up(d.now, false, false));
  d.take(d.r.register_requested(d.now));
  d.ack();
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.unregister_requested(d.now)).kind == Kind::none);
  CHECK(d.take(d.r.connection_up(d.now, true, false)).kind == Kind::send_unregister);
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.connection_up(d.now, true, false)).kind == Kind::none);  // said once
}

TEST_CASE("registration: a draining server gets no REGISTER; its replacement does") {
  Driver d;
  d.take(d.r.register_requested(d.now));
  CHECK(d.take(d.r.connection_up(d.now, false, true)).kind == Kind::none);
  CHECK(d.r.next_wakeup() == TimePoint::max());
  d.take(d.r.connection_lost(d.now));
  CHECK(d.take(d.r.connection_up(d.now, false, false)).kind == Kind::send_register);
}

TEST_CASE("registration: random event orders keep the invariants") {
  for (std::uint64_t seed = 1; seed <= 50; ++seed) {
    std::mt19937_64 rng(seed);
    Driver d;
    bool connected = false;
    std::uint64_t last_attempt = 0;
    for (int i = 0; i < 2000; ++i) {
      d.now += std::chrono::milliseconds(rng() % 30);
      RegistrationLifecycle::Action a;
      switch (rng() % 9) {
        case 0: a = d.r.register_requested(d.now); break;
        case 1: a = d.r.unregister_requested(d.now); break;
        case 2: connected = true; a = d.r.connection_up(d.now, rng() % 2, rng() % 4 == 0); break;
        case 3: connected = false; a = d.r.connection_lost(d.now); break;
        case 4: a = d.r.answered(d.now, last_attempt, static_cast<Outcome>(rng() % 3), "x"); break;
        case 5: a = d.r.not_registered(d.now); break;
        case 6: if (rng() % 20 == 0) a = d.r.shutdown_requested(d.now); break;
        default: a = d.r.tick(d.now); break;
      }
      if (a.kind == Kind::send_register) {
        CHECK(connected);  // never sent without a connection
        CHECK_FALSE(d.r.stopped());
        CHECK(a.attempt != last_attempt);
        last_attempt = a.attempt;
      }
      if (a.kind == Kind::send_unregister) CHECK(connected);
      // At most one REGISTER counts at a time: the latest one sent.
      CHECK((d.r.phase() == Phase::sending) == d.r.awaiting(last_attempt));
      if (d.r.stopped()) CHECK(d.r.phase() == Phase::none);
      if (d.r.phase() == Phase::waiting && connected && d.r.next_wakeup() <= d.now) {
        // Anything due is sent by the next tick.
        const auto t = d.r.tick(d.now);
        CHECK(t.kind == Kind::send_register);
        last_attempt = t.attempt;
      }
    }
  }
}
