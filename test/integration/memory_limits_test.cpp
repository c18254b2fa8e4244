// Inbound memory against the real kvlink-server: a client that trickles a
// frame announced at --max-payload makes the server hold that frame, and
// no more, while it arrives; the memory comes back when the frame completes
// or its client goes away; and --max-inbound-bytes bounds what all such
// frames together hold: the one that would pass it is refused with an error
// naming the flag, and nobody else notices.
#include <doctest/doctest.h>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <asio/io_context.hpp>
#include <fstream>

#include "kvlink/net/connection.hpp"
#include "server_process.hpp"
#include "client.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

constexpr std::uint32_t MiB = 1u << 20;

// The server's resident set says what its buffers hold only without a
// sanitizer: ASan keeps freed memory in quarantine, TSan adds shadow memory
// to every byte. Sanitizer builds check the accounting (the STATS gauge).
constexpr bool rss_tells = !test::under_sanitizer;


// A raw unix-socket client that sends a frame's bytes as it is told.
struct Trickler {
  int fd = -1;
  wire::Bytes frame;  // header + payload
  std::size_t sent = 0;
  // A request of an opcode the server does not know (it answers with an
  // error and keeps the connection) with a payload of `payload` bytes.
  Trickler(const std::string& endpoint, std::uint32_t payload, std::uint64_t id) {
    fd = test::connect_unix(endpoint);
    wire::FrameBuilder(frame).add(200, 0, id, [&](wire::Writer& w) {
      wire::Bytes zeros(payload);
      w.raw(zeros.data(), zeros.size());
    });
  }
  ~Trickler() { go_away(); }
  void send(std::size_t n) {
    n = std::min(n, frame.size() - sent);
    while (n > 0) {
      const ssize_t k = ::send(fd, frame.data() + sent, n, MSG_NOSIGNAL);
      REQUIRE(k > 0);
      sent += static_cast<std::size_t>(k);
      n -= static_cast<std::size_t>(k);
    }
  }
  void send_rest() { send(frame.size()); }
  void go_away() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  // The next frame from the server, within `limit`; nullopt at EOF or timeout.
  std::optional<std::pair<wire::Header, wire::ErrorReply>> read_reply(std::chrono::milliseconds limit = 10s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (auto f = parser.next()) {
        wire::ErrorReply e;
        if (f->header.is_error()) REQUIRE_FALSE(wire::decode(f->payload, e, "error"));
        return std::pair{f->header, e};
      }
      REQUIRE_FALSE(parser.failed());
      if (!wait_readable(end)) return std::nullopt;
      auto space = parser.prepare(4096);
      const ssize_t k = ::recv(fd, space.data(), space.size(), 0);
      if (k <= 0) return std::nullopt;
      parser.commit(static_cast<std::size_t>(k));
    }
    return std::nullopt;
  }
  // Whether the server closed the connection within `limit`.
  bool closed_by_server(std::chrono::milliseconds limit = 10s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    char buf[4096];
    while (wait_readable(end)) {
      const ssize_t k = ::recv(fd, buf, sizeof buf, 0);
      if (k == 0 || (k < 0 && errno == ECONNRESET)) return true;
    }
    return false;
  }

 private:
  wire::FrameParser parser;
  bool wait_readable(std::chrono::steady_clock::time_point end) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
    if (left <= 0ms) return false;
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(left.count())) > 0;
  }
};

}  // namespace

TEST_CASE("memory limits: a frame trickled at --max-payload is held while it arrives, then given back") {
  TempDir dir;
  // The default --max-payload: 64 MiB.
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--log-level", "off"});
  server.start();
  asio::io_context io;
  test::Client admin(io, server.endpoint());
  const std::uint32_t max_payload = 64 * MiB;
  CHECK(admin.stat("inbound_buffered_bytes") == 0);
  CHECK(admin.stat("inbound_limit_bytes") == 4 * std::int64_t{max_payload});
  const std::uint64_t rss_before = test::process_rss(server.pid());

  SUBCASE("the client completes the frame") {
    Trickler t(server.endpoint(), max_payload, 7);
    t.send(wire::header_size + 1000);
    REQUIRE(admin.stat_becomes("inbound_buffered_bytes", max_payload));
    const std::uint64_t rss_held = test::process_rss(server.pid());
    MESSAGE("server RSS " << rss_before / 1024 << " KiB -> " << rss_held / 1024 << " KiB with the frame arriving");
    // It holds the frame (that is what the gauge counts), not twice it.
    if (rss_tells) CHECK(rss_held < rss_before + max_payload + 24 * MiB);
    for (int i = 0; i < 100; ++i) t.send(1000);  // a trickle
    CHECK(admin.stat("inbound_buffered_bytes") == max_payload);
    CHECK_FALSE(admin.ping());
    t.send_rest();
    auto reply = t.read_reply();
    REQUIRE(reply);
    CHECK(reply->first.id == 7);
    CHECK(reply->second.code == static_cast<std::uint16_t>(errc::unknown_opcode));
    CHECK(admin.stat_becomes("inbound_buffered_bytes", 0));
    // The connection stays, and its buffer went back to the allocator and the system.
    if (rss_tells) CHECK(test::eventually([&] { return test::process_rss(server.pid()) < rss_before + 16 * MiB; }));
    Trickler again(server.endpoint(), 100, 8);
    again.send_rest();
    CHECK(again.read_reply());
  }
  SUBCASE("the client goes away") {
    Trickler t(server.endpoint(), max_payload, 7);
    t.send(wire::header_size + 1000);
    REQUIRE(admin.stat_becomes("inbound_buffered_bytes", max_payload));
    CHECK(admin.stat("connections_open") == 2);
    t.go_away();
    CHECK(admin.stat_becomes("connections_open", 1));
    CHECK(admin.stat("inbound_buffered_bytes") == 0);
    if (rss_tells) CHECK(test::eventually([&] { return test::process_rss(server.pid()) < rss_before + 16 * MiB; }));
  }
  CHECK(admin.stat("inbound_refused") == 0);
  CHECK_FALSE(admin.ping());
}

TEST_CASE("memory limits: past --max-inbound-bytes a large frame is refused naming the flag; others go on") {
  TempDir dir;
  const std::uint32_t max_payload = 8 * MiB;
  ServerProcess server({"--listen", dir.socket(), "--max-payload", std::to_string(max_payload),
                        "--max-inbound-bytes", "12MiB", "--l1-size", "16MiB", "--log-level", "off"});
  server.start();
  asio::io_context io;
  test::Client admin(io, server.endpoint());
  CHECK_FALSE(admin.ping());
  CHECK(admin.stat("inbound_limit_bytes") == 12 * MiB);

  Trickler a(server.endpoint(), max_payload, 1);
  a.send(wire::header_size + 1000);
  REQUIRE(admin.stat_becomes("inbound_buffered_bytes", max_payload));
  CHECK_FALSE(admin.ping());

  // Another 8 MiB would make 16 MiB: refused at its header, with a reply to
  // its request naming the flag, and the connection closed.
  Trickler b(server.endpoint(), max_payload, 2);
  b.send(wire::header_size + 1000);
  auto reply = b.read_reply();
  REQUIRE(reply);
  CHECK(reply->first.id == 2);
  CHECK(reply->first.is_error());
  CHECK(reply->second.code == static_cast<std::uint16_t>(errc::limit_exceeded));
  CHECK(reply->second.message.find("--max-inbound-bytes") != std::string::npos);
  MESSAGE(reply->second.message);
  CHECK(b.closed_by_server());
  CHECK(admin.stat("inbound_refused") == 1);
  CHECK(admin.stat("inbound_buffered_bytes") == max_payload);
  CHECK_FALSE(admin.ping());

  // The first frame is unharmed: it completes and is answered.
  for (int i = 0; i < 10; ++i) a.send(1000);
  a.send_rest();
  reply = a.read_reply();
  REQUIRE(reply);
  CHECK(reply->first.id == 1);
  CHECK(reply->second.code == static_cast<std::uint16_t>(errc::unknown_opcode));
  CHECK(admin.stat_becomes("inbound_buffered_bytes", 0));

  // Room came back: a large frame is admitted again.
  Trickler c(server.endpoint(), max_payload, 3);
  c.send(wire::header_size + 1000);
  CHECK(admin.stat_becomes("inbound_buffered_bytes", max_payload));
  c.send_rest();
  reply = c.read_reply();
  REQUIRE(reply);
  CHECK(reply->first.id == 3);
  CHECK(admin.stat("inbound_refused") == 1);
  CHECK_FALSE(admin.ping());
}

TEST_CASE("memory limits: --max-inbound-bytes below --max-payload does not start") {
  std::string out;
  const int rc = test::run_command(ServerProcess::binary("KVLINK_SERVER") +
                                       " --listen unix:/nonexistent/x.sock --max-payload 8388608 --max-inbound-bytes 4MiB",
                                   out);
  CHECK(rc == 2);
  CHECK(out.find("--max-inbound-bytes") != std::string::npos);
  CHECK(out.find("--max-payload") != std::string::npos);
}
