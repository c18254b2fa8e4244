// Fuzzes a whole server session: a byte stream from a client is framed and
// handed to the RequestHandler exactly as the Asio session does. The
// handler must answer every request without crashing, and every reply it
// writes must itself be a well-formed frame.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "kvlink/log.hpp"
#include "kvlink/server/request_handler.hpp"

using namespace kvlink;

namespace {

struct Sink final : server::ReplySink {
  wire::Bytes out;
  wire::Bytes& buffer() override { return out; }
  void flush() override {}
  std::weak_ptr<ReplySink> weak_self() override { return {}; }
};

}  // namespace

// Every log line is formatted (so its formatting is fuzzed too) and dropped:
// at ~10^4 sessions a second the server's info lines would be gigabytes.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  log::set_level(log::Level::debug);
  log::set_sink([](log::Level, std::string_view) {});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A small L1 and the in-process transfer engine (completes at once).
  static const server::ServerConfig config = [] {
    server::ServerConfig c;
    c.l1_size = 16u << 20;
    c.huge_pages = false;
    c.instance_l1_quota_fraction = 0.5;  // the quota path too
    return c;
  }();
  static transfer::NullTransferEngine engine;
  server::RequestHandler handler(config, 1, engine);
  server::SessionState session;
  Sink sink;
  wire::FrameParser parser(1u << 16);
  parser.append({reinterpret_cast<const std::byte*>(data), size});
  TimePoint now{};
  bool open = true;
  while (open) {
    auto f = parser.next();
    if (!f) break;
    open = handler.handle(session, *f, sink, now);
    now += std::chrono::milliseconds(10);
    handler.tick(now);
  }
  handler.on_session_end(session, now);
  // Every reply is a valid frame.
  wire::FrameParser replies;
  replies.append(sink.out);
  while (replies.next()) {
  }
  if (replies.failed() || replies.buffered() != 0) std::abort();
  return 0;
}
