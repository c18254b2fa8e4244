// Fuzzes whole server sessions: a byte stream is framed and handed to the
// RequestHandler as the Asio layer does, each frame to one of three
// connections (chosen by its request id), which may also close and reopen
// (a fresh connection, the same or another instance id: claims of ids bound
// to another secret, reconnects, re-registration). Sliced requests are
// continued one slice at a time between frames, as the server interleaves
// connections. The handler must answer every request without crashing,
// every reply must be a well-formed frame, L1 is pinned exactly while read
// locks are held, and once every connection is gone no lock is left.
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
  constexpr std::size_t connections = 3;
  server::SessionState sessions[connections];
  Sink sink;
  wire::FrameParser parser(1u << 16);
  parser.append({reinterpret_cast<const std::byte*>(data), size});
  TimePoint now{};
  auto check = [&] {
    const auto& store = handler.store();
    if ((store.read_locks() == 0) != (store.pinned_entries() == 0)) std::abort();
  };
  while (auto f = parser.next()) {
    const std::uint64_t pick = f->header.id;
    server::SessionState& session = sessions[pick % connections];
    // A request with a reply sent one-way closes its connection: keep that
    // for one frame in 16, so random flags do not end most sessions early.
    if (f->header.is_one_way() && f->header.opcode >= 1 && f->header.opcode <= wire::max_opcode &&
        !wire::one_way_allowed(static_cast<wire::Opcode>(f->header.opcode)) && pick % 16 != 0)
      f->header.flags &= static_cast<std::uint16_t>(~wire::flag::one_way);
    if (pick % 7 == 6) {
      // This connection closes before the frame; the frame opens a new one.
      handler.on_session_end(session, now);
      session = server::SessionState{};
    }
    if (!handler.handle(session, *f, sink, now)) {
      handler.on_session_end(session, now);
      session = server::SessionState{};
    }
    // The other connections' sliced requests go on a slice each.
    for (auto& other : sessions)
      if (other.unfinished) handler.continue_work(other, sink, now);
    handler.release_ended();  // as the server does between events
    check();
    now += std::chrono::milliseconds(10);
    handler.tick(now);
  }
  for (auto& session : sessions) {
    while (!handler.continue_work(session, sink, now)) {
    }
    handler.on_session_end(session, now);
  }
  while (!handler.release_ended()) {
  }
  check();
  // Every connection is gone: no lookup lock may be left.
  if (handler.store().read_locks() != 0) std::abort();
  // Every reply is a valid frame.
  wire::FrameParser replies;
  replies.append(sink.out);
  while (replies.next()) {
  }
  if (replies.failed() || replies.buffered() != 0) std::abort();
  return 0;
}
