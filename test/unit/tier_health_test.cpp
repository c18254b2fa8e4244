// A storage tier's health (store/tier_health.hpp) on fake time: errors and
// stalls degrade it, probes with backoff recover it.
#include <doctest/doctest.h>

#include <cerrno>

#include "kvlink/store/tier_health.hpp"

using namespace kvlink;
using namespace kvlink::store;
using namespace std::chrono_literals;

namespace {

TierHealthConfig no_jitter() {
  TierHealthConfig c;
  c.op_deadline = 1s;
  c.probe_initial = 100ms;
  c.probe_multiplier = 2;
  c.probe_max = 1s;
  c.probe_jitter = 0;
  return c;
}

Error io_error(int err, const char* text) { return Error(std::error_code(err, std::generic_category()), text); }

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("tier health: an I/O error degrades the tier and says so in one line") {
  TierHealth h(no_jitter(), "disk tier /x", 1);
  TimePoint now{};
  CHECK(h.accepting());
  auto ok = h.op_started(now, "write class 0 slot 1");
  CHECK_FALSE(h.op_finished(ok, now + 1ms, {}).transition);

  auto op = h.op_started(now, "write class 0 slot 2");
  now += 5ms;
  auto a = h.op_finished(op, now, io_error(EIO, "Input/output error (EIO): check the disk"));
  REQUIRE(a.transition);
  CHECK(a.transition->to == TierState::degraded);
  CHECK(contains(a.transition->line, "disk tier /x: healthy -> DEGRADED: write class 0 slot 2: Input/output error"));
  CHECK(contains(a.transition->line, "serving from L1 only"));
  CHECK(contains(a.transition->line, "first probe in 100 ms"));
  CHECK_FALSE(h.accepting());
  CHECK(h.state() == TierState::degraded);
  CHECK(h.counters().io_errors == 1);
  CHECK(h.next_wakeup() == now + 100ms);
}

TEST_CASE("tier health: errors about one chunk are not the tier's failures") {
  TierHealth h(no_jitter(), "disk tier", 1);
  auto op = h.op_started(TimePoint{}, "read class 0 slot 3");
  CHECK_FALSE(h.op_finished(op, TimePoint{}, Error(errc::server_error, "checksum mismatch")).transition);
  op = h.op_started(TimePoint{}, "read class 0 slot 4");
  CHECK_FALSE(h.op_finished(op, TimePoint{}, Error(errc::not_found, "past the end")).transition);
  CHECK(h.accepting());
  CHECK(is_tier_failure(io_error(ENOSPC, "full")));
  CHECK(is_tier_failure(Error(errc::timed_out)));
  CHECK_FALSE(is_tier_failure(Error()));
}

TEST_CASE("tier health: the failure threshold counts consecutive failures") {
  TierHealthConfig c = no_jitter();
  c.failure_threshold = 2;
  TierHealth h(c, "disk tier", 1);
  TimePoint now{};
  auto fail = [&] { return h.op_finished(h.op_started(now, "write"), now, io_error(EIO, "EIO")); };
  CHECK_FALSE(fail().transition);
  CHECK_FALSE(h.op_finished(h.op_started(now, "write"), now, {}).transition);  // resets the count
  CHECK_FALSE(fail().transition);
  auto a = fail();
  REQUIRE(a.transition);
  CHECK(contains(a.transition->line, "(2 consecutive failures)"));
}

TEST_CASE("tier health: an operation past its deadline is a stall") {
  TierHealth h(no_jitter(), "disk tier", 1);
  TimePoint now{};
  CHECK(h.next_wakeup() == TimePoint::max());
  auto first = h.op_started(now, "read class 1 slot 9");
  auto second = h.op_started(now + 300ms, "read class 1 slot 10");
  CHECK(h.next_wakeup() == now + 1s);
  CHECK_FALSE(h.tick(now + 999ms).transition);
  auto a = h.tick(now + 1s);
  REQUIRE(a.transition);
  CHECK(contains(a.transition->line, "read class 1 slot 9 stalled: no completion 1000 ms after it started"));
  CHECK(h.counters().stalls == 1);
  // The second stalls too, without a second transition; late completions are ignored.
  CHECK_FALSE(h.tick(now + 1300ms).transition);
  CHECK(h.counters().stalls == 2);
  CHECK_FALSE(h.op_finished(first, now + 5s, {}).transition);
  CHECK_FALSE(h.op_finished(second, now + 5s, io_error(EIO, "EIO")).transition);
  CHECK(h.counters().io_errors == 0);
  CHECK_FALSE(h.accepting());
}

TEST_CASE("tier health: probes back off exponentially up to the cap, and a success recovers") {
  TierHealth h(no_jitter(), "disk tier /x", 1);
  TimePoint now{};
  REQUIRE(h.op_finished(h.op_started(now, "write"), now, io_error(ENOSPC, "No space left on device")).transition);
  std::vector<Duration> gaps;
  TimePoint last = now;
  for (int i = 0; i < 6; ++i) {
    const TimePoint t = h.next_wakeup();
    CHECK_FALSE(h.tick(t - 1ns).probe);
    auto a = h.tick(t);
    REQUIRE(a.probe);
    gaps.push_back(t - last);
    now = t + 10ms;  // the probe takes 10 ms and fails
    CHECK_FALSE(h.probe_finished(now, a.probe_id, io_error(ENOSPC, "full")).transition);
    last = now;
  }
  CHECK(gaps == std::vector<Duration>{100ms, 200ms, 400ms, 800ms, 1s, 1s});
  CHECK(h.counters().probes_failed == 6);

  auto a = h.tick(h.next_wakeup());
  REQUIRE(a.probe);
  now = h.next_wakeup() - 500ms;  // well before its deadline
  auto r = h.probe_finished(now, a.probe_id, {});
  REQUIRE(r.transition);
  CHECK(r.transition->to == TierState::healthy);
  CHECK(r.transition->outage == now - TimePoint{});
  CHECK(contains(r.transition->line, "disk tier /x: RECOVERED -> healthy after"));
  CHECK(h.accepting());
  CHECK(h.next_wakeup() == TimePoint::max());
  CHECK(h.backoff() == 100ms);  // the next outage starts over
}

TEST_CASE("tier health: success_threshold probes back to back") {
  TierHealthConfig c = no_jitter();
  c.success_threshold = 2;
  TierHealth h(c, "disk tier", 1);
  TimePoint now{};
  REQUIRE(h.op_finished(h.op_started(now, "write"), now, io_error(EROFS, "read-only")).transition);
  now = h.next_wakeup();
  auto a = h.tick(now);
  REQUIRE(a.probe);
  CHECK_FALSE(h.probe_finished(now + 1ms, a.probe_id, {}).transition);
  CHECK(h.next_wakeup() == now + 1ms);  // the confirming probe goes at once
  auto b = h.tick(now + 1ms);
  REQUIRE(b.probe);
  auto r = h.probe_finished(now + 2ms, b.probe_id, {});
  REQUIRE(r.transition);
  CHECK(contains(r.transition->line, "2 consecutive probes succeeded"));
}

TEST_CASE("tier health: a probe past its deadline has failed, and its late answer is ignored") {
  TierHealth h(no_jitter(), "disk tier", 1);
  TimePoint now{};
  REQUIRE(h.op_finished(h.op_started(now, "write"), now, io_error(EIO, "EIO")).transition);
  now = h.next_wakeup();
  auto a = h.tick(now);
  REQUIRE(a.probe);
  CHECK(h.next_wakeup() == now + 1s);
  now += 1s;
  CHECK_FALSE(h.tick(now).probe);
  CHECK(h.counters().probes_failed == 1);
  CHECK(h.next_wakeup() == now + 200ms);
  CHECK_FALSE(h.probe_finished(now + 1ms, a.probe_id, {}).transition);  // stale
  auto b = h.tick(now + 200ms);
  REQUIRE(b.probe);
  CHECK(b.probe_id != a.probe_id);
  CHECK(h.probe_finished(now + 201ms, b.probe_id, {}).transition);
}

TEST_CASE("tier health: jitter spreads the probes, the same seed the same way") {
  TierHealthConfig c = no_jitter();
  c.probe_jitter = 0.2;
  auto schedule = [&](std::uint64_t seed) {
    TierHealth h(c, "disk tier", seed);
    TimePoint now{};
    (void)h.op_finished(h.op_started(now, "write"), now, io_error(EIO, "EIO"));
    std::vector<Duration> gaps;
    for (int i = 0; i < 5; ++i) {
      const TimePoint t = h.next_wakeup();
      gaps.push_back(t - now);
      auto a = h.tick(t);
      REQUIRE(a.probe);
      now = t;
      (void)h.probe_finished(now, a.probe_id, io_error(EIO, "EIO"));
    }
    return gaps;
  };
  const auto a = schedule(7);
  CHECK(a == schedule(7));
  CHECK(a != schedule(8));
  const Duration nominal[] = {100ms, 200ms, 400ms, 800ms, 1s};
  for (int i = 0; i < 5; ++i) {
    CHECK(a[i] >= nominal[i] * 0.8);
    CHECK(a[i] <= nominal[i] * 1.2);
  }
}
