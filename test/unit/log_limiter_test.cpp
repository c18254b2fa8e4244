// The per-connection log limit with fake time: at most N lines a window,
// the rest summarised once; and the request handler's one-way drops through
// it, with its counters still exact.
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "kvlink/log.hpp"
#include "kvlink/log_limiter.hpp"
#include "kvlink/server/request_handler.hpp"

using namespace kvlink;
using namespace std::chrono_literals;

TEST_CASE("log limiter: N lines a window pass, the rest are held back and reported once the window ends") {
  LogLimiter lim({3, 1s});
  const TimePoint t0{};
  int written = 0;
  for (int i = 0; i < 10; ++i) written += lim.allow(t0 + i * 10ms) ? 1 : 0;
  CHECK(written == 3);
  // Still inside the window: nothing to report yet.
  CHECK(lim.take_held_back(t0 + 999ms) == 0);
  // The window ended: the 7 held back, once.
  CHECK(lim.take_held_back(t0 + 1s) == 7);
  CHECK(lim.take_held_back(t0 + 1s) == 0);
  // A new window, a new share.
  CHECK(lim.allow(t0 + 1s));
  CHECK(lim.allow(t0 + 1s));
  CHECK(lim.allow(t0 + 1s));
  CHECK_FALSE(lim.allow(t0 + 1s));
  CHECK(lim.take_held_back(t0 + 1500ms) == 0);
  // The source goes away: what is held back is reported, window or not.
  CHECK(lim.take_held_back(t0 + 1500ms, true) == 1);
  CHECK(lim.take_held_back(t0 + 1500ms, true) == 0);
}

TEST_CASE("log limiter: a quiet source is never held back; held-back lines of old windows add up") {
  LogLimiter lim({2, 1s});
  const TimePoint t0{};
  for (int i = 0; i < 20; ++i) CHECK(lim.allow(t0 + i * 600ms));  // one line every 0.6 s
  LogLimiter burst({1, 1s});
  CHECK(burst.allow(t0));
  CHECK_FALSE(burst.allow(t0 + 1ms));
  CHECK(burst.allow(t0 + 2s));  // new window; nobody took the count in between
  CHECK_FALSE(burst.allow(t0 + 2s));
  CHECK(burst.take_held_back(t0 + 3s) == 2);
}

namespace {

struct Sink final : server::ReplySink {
  wire::Bytes out;
  wire::Bytes& buffer() override { return out; }
  void flush() override {}
  std::weak_ptr<ReplySink> weak_self() override { return {}; }
};

// Captures the log for the test's duration.
struct CaptureLog {
  std::shared_ptr<std::vector<std::string>> lines = std::make_shared<std::vector<std::string>>();
  log::Level old_level = log::level();
  CaptureLog() {
    log::set_level(log::Level::info);
    log::set_sink([l = lines](log::Level, std::string_view line) { l->emplace_back(line); });
  }
  ~CaptureLog() {
    log::set_sink(nullptr);
    log::set_level(old_level);
  }
  std::size_t count(std::string_view what) const {
    std::size_t n = 0;
    for (const auto& l : *lines) n += l.find(what) != std::string::npos ? 1 : 0;
    return n;
  }
};

}  // namespace

TEST_CASE("request handler: a flood of malformed one-way requests logs a few lines and one summary, counts all") {
  CaptureLog log;
  server::ServerConfig config;
  server::RequestHandler handler(config, 1);
  server::SessionState session;
  session.peer.text = "pid 4242 uid 1000";  // what the network layer fills in
  Sink sink;
  TimePoint now{};
  {
    wire::Bytes bytes;
    wire::HelloRequest h;
    h.instance_id = 0xabc;
    wire::FrameBuilder(bytes).add(static_cast<std::uint8_t>(wire::Opcode::hello), 0, 1,
                                  [&](wire::Writer& w) { wire::encode(w, h); });
    wire::FrameParser p;
    p.append(bytes);
    REQUIRE(handler.handle(session, *p.next(), sink, now));
  }
  // A one-way REPORT_BLOCK_ALLOCATION with a payload too short to decode.
  auto malformed = [&] {
    wire::Bytes bytes;
    wire::FrameBuilder(bytes).add(static_cast<std::uint8_t>(wire::Opcode::report_block_allocation),
                                  wire::flag::one_way, 0, [](wire::Writer& w) { w.num<std::uint8_t>(7); });
    wire::FrameParser p;
    p.append(bytes);
    CHECK(handler.handle(session, *p.next(), sink, now));
  };
  const std::size_t per_second = session.log_limiter.config().lines;
  const auto op = static_cast<std::size_t>(wire::Opcode::report_block_allocation);
  sink.out.clear();
  for (int i = 0; i < 1000; ++i) malformed();
  CHECK(sink.out.empty());  // one-way: no replies
  CHECK(handler.counters().protocol_errors == 1000);
  CHECK(handler.counters().ops[op].errors == 1000);
  CHECK(log.count("dropped one-way REPORT_BLOCK_ALLOCATION from pid 4242 uid 1000") == per_second);
  CHECK(log.count("more like this") == 0);
  // A second later: the summary of the first second, then the new line.
  now += 1s;
  malformed();
  CHECK(log.count("... and " + std::to_string(1000 - per_second) + " more like this from pid 4242 uid 1000") == 1);
  CHECK(log.lines->back().find("dropped one-way") != std::string::npos);
  CHECK(log.count("dropped one-way") == per_second + 1);
  // More in that second, then the connection ends: their summary comes at once.
  for (int i = 0; i < 50; ++i) malformed();
  CHECK(log.count("dropped one-way") == 2 * per_second);
  handler.on_session_end(session, now + 10ms);
  CHECK(log.count("... and " + std::to_string(51 - per_second) + " more like this") == 1);
  CHECK(handler.counters().protocol_errors == 1051);
  CHECK(handler.counters().ops[op].errors == 1051);
}

TEST_CASE("request handler: each connection has its own share of the log") {
  CaptureLog log;
  server::ServerConfig config;
  server::RequestHandler handler(config, 1);
  server::SessionState a, b;
  Sink sink;
  const TimePoint now{};
  auto malformed = [&](server::SessionState& s) {
    wire::Bytes bytes;
    wire::FrameBuilder(bytes).add(static_cast<std::uint8_t>(wire::Opcode::end_session), wire::flag::one_way, 0,
                                  [](wire::Writer& w) { w.num<std::uint8_t>(7); });
    wire::FrameParser p;
    p.append(bytes);
    handler.handle(s, *p.next(), sink, now);
  };
  for (int i = 0; i < 100; ++i) malformed(a);
  malformed(b);
  CHECK(log.count("dropped one-way") == a.log_limiter.config().lines + 1);
}
