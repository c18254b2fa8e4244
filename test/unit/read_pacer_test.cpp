// The decisions of FrameStream's read loop, on fake time: how much to read,
// when a recvmsg is tried before readability, the pause while too much is
// queued and its stall timeout, the hold, and the inbound admission.
#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "net/read_pacer.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using net::ReadPacer;
using Next = ReadPacer::Next;

namespace {
const TimePoint t0 = TimePoint{} + 1000h;  // fake time
}

TEST_CASE("read pacer: reads start small and double while they come back full, up to the cap") {
  ReadPacer p;
  CHECK(p.next(0, false) == Next::read);
  CHECK(p.read_size() == ReadPacer::initial_read_size);
  p.on_read(100, p.read_size());  // short: stays
  CHECK(p.read_size() == ReadPacer::initial_read_size);
  std::size_t expected = ReadPacer::initial_read_size;
  while (expected < ReadPacer::max_read_size) {
    p.on_read(p.read_size(), p.read_size());
    expected *= 2;
    CHECK(p.read_size() == expected);
  }
  p.on_read(p.read_size(), p.read_size());  // full at the cap: no further
  CHECK(p.read_size() == ReadPacer::max_read_size);
  p.on_read(1, p.read_size());  // short reads never shrink it
  CHECK(p.read_size() == ReadPacer::max_read_size);
}

TEST_CASE("read pacer: with recvmsg, a speculative read only after a full one") {
  ReadPacer p;
  CHECK(p.next(0, true) == Next::wait_readable);  // nothing read yet
  p.on_read(2048, 2048);
  CHECK(p.next(0, true) == Next::receive);
  CHECK(p.next(0, false) == Next::read);  // Asio's reads decide for themselves
  p.on_read(10, 4096);
  CHECK(p.next(0, true) == Next::wait_readable);
}

TEST_CASE("read pacer: over the outbound limit reading pauses, and resumes at the limit") {
  ReadPacer p;
  CHECK(p.next(1'000'000, false) == Next::read);  // no limit by default
  p.limit_outbound(1000, 5s);
  CHECK(p.next(1000, false) == Next::read);  // at the limit is fine
  CHECK(p.next(1001, false) == Next::pause);
  p.start_pause(t0);
  CHECK(p.pause_deadline() == t0 + 5s);
  CHECK(p.check_pause(1001, true, t0).kind == ReadPacer::PauseCheck::wait);
  CHECK(p.check_pause(5000, true, t0 + 4s).kind == ReadPacer::PauseCheck::wait);
  const auto resumed = p.check_pause(1000, true, t0 + 4s);
  CHECK(resumed.kind == ReadPacer::PauseCheck::resume);
  CHECK_FALSE(resumed.error);
  CHECK(p.next(1000, false) == Next::read);
  // A new pause gets a new deadline.
  p.start_pause(t0 + 10s);
  CHECK(p.check_pause(2000, true, t0 + 14s).kind == ReadPacer::PauseCheck::wait);
}

TEST_CASE("read pacer: a pause ends the stream with limit_exceeded at exactly the stall deadline") {
  ReadPacer p;
  p.limit_outbound(1000, 250ms);
  p.start_pause(t0);
  CHECK(p.check_pause(4096, true, t0 + 250ms - 1ns).kind == ReadPacer::PauseCheck::wait);
  const auto end = p.check_pause(4096, true, t0 + 250ms);
  CHECK(end.kind == ReadPacer::PauseCheck::end);
  CHECK(end.error == errc::limit_exceeded);
  CHECK(end.error.detail().find("4096 bytes") != std::string::npos);
  CHECK(end.error.detail().find("limit 1000") != std::string::npos);
  CHECK(end.error.detail().find("250 ms") != std::string::npos);
  // Drained just in time: no end, even past the deadline.
  CHECK(p.check_pause(1000, true, t0 + 1s).kind == ReadPacer::PauseCheck::resume);
}

TEST_CASE("read pacer: a stream closed while paused ends with connection_lost") {
  ReadPacer p;
  p.limit_outbound(1000, 5s);
  p.start_pause(t0);
  const auto end = p.check_pause(2000, false, t0 + 1s);
  CHECK(end.kind == ReadPacer::PauseCheck::end);
  CHECK(end.error == errc::connection_lost);
}

TEST_CASE("read pacer: a stop mid-turn keeps the parsed frames for after it; hold and release") {
  ReadPacer p;
  p.limit_outbound(1000, 5s);
  p.begin_turn();
  CHECK_FALSE(p.stop_turn(500));
  CHECK(p.stop_turn(1500));  // over the limit: the rest wait
  CHECK(p.next(1500, false) == Next::pause);
  CHECK(p.next(500, false) == Next::handle_frames);  // drained: those frames first, then reads
  p.begin_turn();
  CHECK_FALSE(p.stop_turn(0));
  CHECK(p.next(0, false) == Next::read);

  p.hold();
  CHECK(p.held());
  CHECK(p.next(0, false) == Next::wait_hold);
  CHECK(p.next(5000, true) == Next::wait_hold);  // a hold comes before a pause
  p.begin_turn();
  CHECK(p.stop_turn(0));
  p.release_hold();
  CHECK_FALSE(p.held());
  CHECK(p.next(0, true) == Next::handle_frames);
  p.begin_turn();
  CHECK_FALSE(p.stop_turn(0));
  CHECK(p.next(0, true) == Next::wait_readable);
}

TEST_CASE("read pacer: inbound admission is asked after whole turns only, and its refusal is the stream's end") {
  ReadPacer p;
  CHECK_FALSE(p.checks_inbound());  // no bound by default
  std::uint32_t asked = 0;
  p.limit_inbound([&](std::uint32_t pending) {
    asked = pending;
    return pending > 100 ? Error(errc::limit_exceeded, "too much arriving") : Error();
  });
  CHECK(p.checks_inbound());
  CHECK_FALSE(p.admit_inbound(100));
  CHECK(asked == 100);
  const Error refused = p.admit_inbound(101);
  CHECK(refused == errc::limit_exceeded);
  CHECK(refused.detail() == "too much arriving");
  // A turn stopped with frames left: the front frame is whole, nothing to ask.
  p.hold();
  p.begin_turn();
  CHECK(p.stop_turn(0));
  CHECK_FALSE(p.checks_inbound());
  p.release_hold();
  p.begin_turn();
  CHECK_FALSE(p.stop_turn(0));
  CHECK(p.checks_inbound());
}
