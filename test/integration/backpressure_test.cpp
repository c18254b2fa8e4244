// Limits against the real kvlink-server: a client that pipelines requests
// and never reads its replies cannot make the server buffer without bound
// (reads stop at --max-outbound-bytes; the connection is closed after
// --outbound-stall-timeout-s), and --max-instances / --max-connections
// refuse the excess with errors naming the flag.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <asio/io_context.hpp>
#include <atomic>
#include <fstream>
#include <thread>

#include "kvlink/net/connection.hpp"
#include "kvlink/store/keys.hpp"
#include "server_process.hpp"
#include "client.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::run;

namespace {

wire::HelloRequest hello(wire::Role role = wire::Role::admin) {
  wire::HelloRequest h;
  h.role = role;
  const std::uint64_t id = net::random_instance_id();
  h.instance_id = id;
  h.client_name = "backpressure_test";
  return h;
}

using Admin = test::Client;

// A unix socket client that sends HELLO, then STATS requests as fast as
// the kernel takes them, and never reads.
struct NonReader {
  int fd = -1;
  std::uint64_t sent = 0;  // bytes the kernel accepted
  wire::Bytes batch;
  explicit NonReader(const std::string& endpoint) {
    fd = test::connect_unix(endpoint);
    const int small = 4096;  // keep kernel buffers small, so the server's own buffering shows
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    wire::Bytes h;
    wire::FrameBuilder(h).add(static_cast<std::uint8_t>(wire::Opcode::hello), 0, 1,
                              [&](wire::Writer& w) { wire::encode(w, hello()); });
    REQUIRE(::send(fd, h.data(), h.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(h.size()));
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (std::uint64_t id = 2; id < 2 + 1024; ++id)
      wire::FrameBuilder(batch).add(static_cast<std::uint8_t>(wire::Opcode::stats), 0, id, [](wire::Writer&) {});
  }
  ~NonReader() {
    if (fd >= 0) ::close(fd);
  }
  // Sends for up to `d`; returns false once the socket is closed by the peer.
  bool pump(std::chrono::milliseconds d) {
    const auto end = std::chrono::steady_clock::now() + d;
    std::size_t off = sent % batch.size();
    while (std::chrono::steady_clock::now() < end) {
      const ssize_t n = ::send(fd, batch.data() + off, batch.size() - off, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<std::uint64_t>(n);
        off = (off + static_cast<std::size_t>(n)) % batch.size();
        continue;
      }
      if (errno == EPIPE || errno == ECONNRESET) return false;
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, 10);
      if (p.revents & (POLLERR | POLLHUP)) return false;
    }
    return true;
  }
};

}  // namespace

TEST_CASE("limits: a client that never reads its replies stops being read; the server's memory stays bounded") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--max-outbound-bytes", "1MiB", "--outbound-stall-timeout-s", "600",
                        "--l1-size", "16MiB", "--log-level", "off"});
  server.start();
  asio::io_context io;
  Admin admin(io, server.endpoint());
  CHECK(admin.stat("connections_paused") == 0);
  const std::uint64_t rss_before = test::process_rss(server.pid());

  NonReader bad(server.endpoint());
  // Each 24-byte STATS request asks for a ~3 KiB reply: unbounded, the
  // server would queue over 100x what the client sends.
  REQUIRE(bad.pump(500ms));
  CHECK(test::run_until(io, [&] { return admin.stat("connections_paused") == 1; }, 10s));
  // Once reading stopped, the kernel buffers fill and the client's sends stop too.
  const std::uint64_t sent_when_paused = bad.sent;
  REQUIRE(bad.pump(2s));
  const std::uint64_t sent_more = bad.sent - sent_when_paused;
  CHECK(sent_more < 1u << 20);
  const std::uint64_t rss_after = test::process_rss(server.pid());
  MESSAGE("client sent " << bad.sent << " bytes; server RSS " << rss_before / 1024 << " KiB -> " << rss_after / 1024
                         << " KiB");
  // The queue bound (1 MiB) plus one read turn's replies, well below what
  // the unread replies of what was sent would need.
  CHECK(rss_after < rss_before + (48u << 20));
  CHECK(admin.stat("reads_paused") >= 1);
  // Everyone else is still served.
  CHECK_FALSE(admin.ping());
  Admin other(io, server.endpoint());
  CHECK_FALSE(other.ping());
}

TEST_CASE("limits: a reader stuck past --outbound-stall-timeout-s is disconnected and counted") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--max-outbound-bytes", "64KiB", "--outbound-stall-timeout-s", "1",
                        "--l1-size", "16MiB", "--log-level", "off"});
  server.start();
  asio::io_context io;
  Admin admin(io, server.endpoint());
  NonReader bad(server.endpoint());
  const auto deadline = std::chrono::steady_clock::now() + 15s;
  bool open = true;
  while (open && std::chrono::steady_clock::now() < deadline) open = bad.pump(100ms);
  CHECK_FALSE(open);  // the server closed it
  CHECK(test::run_until(io, [&] { return admin.stat("slow_reader_closes") == 1; }, 5s));
  CHECK(admin.stat("connections_paused") == 0);
  CHECK(admin.stat("connections_open") == 1);
  CHECK_FALSE(admin.ping());
}

TEST_CASE("limits: --max-instances refuses HELLO of one more instance, naming the flag") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--max-instances", "2", "--log-level", "off"});
  server.start();
  asio::io_context io;
  // Schedulers count as instances; admin connections (the CLI) never do.
  Admin a(io, server.endpoint(), wire::Role::scheduler);
  Admin b(io, server.endpoint(), wire::Role::scheduler);
  Admin admin(io, server.endpoint());
  auto r = run(io, net::connect(io.get_executor(), test::parse(server.endpoint()), hello(wire::Role::scheduler), 5s));
  CHECK(r.error == errc::limit_exceeded);
  CHECK(r.error.message().find("--max-instances") != std::string::npos);
  CHECK(admin.stat("instances_refused") == 1);
  CHECK_FALSE(b.ping());
}

TEST_CASE("limits: --max-connections refuses one more connection, naming the flag") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--max-connections", "1", "--log-level", "off"});
  server.start();
  asio::io_context io;
  Admin a(io, server.endpoint());
  auto r = run(io, net::connect(io.get_executor(), test::parse(server.endpoint()), hello(), 5s));
  // Refused before HELLO is read: the connection-level error says why.
  CHECK(r.error == errc::connection_lost);
  CHECK(r.error.message().find("server is at its limit of 1 connections (--max-connections)") != std::string::npos);
  CHECK(a.stat("connections_refused") == 1);
}

TEST_CASE("limits: another client's largest LOOKUP, FREE_LOOKUP_LOCKS and END_SESSION do not stall a PING") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--log-level", "warn", "--l1-size", "64MiB", "--no-huge-pages"});
  server.start();
  asio::io_context io;
  Admin pinger(io, server.endpoint());
  // The abuser pipelines 16 rounds at once: a LOOKUP at world size 1024
  // opens a session, then FREE_LOOKUP_LOCKS and END_SESSION over its 4096
  // chunks (2^22 keys each, the per-request limit). Unsliced, each of those
  // held the io thread for about 15 ms in a release build.
  std::vector<store::Token> tokens(4096 * 256);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<store::Token>(i * 7 + 1);
  const auto hashes = store::chunk_hashes(tokens, 256);
  const std::uint64_t ns = 0x5eed;
  wire::Bytes frames;
  wire::FrameBuilder b(frames);
  b.add(static_cast<std::uint8_t>(wire::Opcode::hello), 0, 1,
        [&](wire::Writer& w) { wire::encode(w, hello(wire::Role::scheduler)); });
  constexpr int rounds = 16;
  for (std::uint64_t r = 0; r < rounds; ++r) {
    b.add(static_cast<std::uint8_t>(wire::Opcode::sync_lookup), 0, 10 + r,
          [&](wire::Writer& w) { wire::encode(w, wire::SyncLookupRequest{ns, 1024, r + 1, hashes}); });
    b.add(static_cast<std::uint8_t>(wire::Opcode::free_lookup_locks), wire::flag::one_way, 0, [&](wire::Writer& w) {
      wire::encode(w, wire::FreeLookupLocksRequest{ns, 1024, r + 1, hashes, 0, 4096});
    });
    b.add(static_cast<std::uint8_t>(wire::Opcode::end_session), wire::flag::one_way, 0,
          [&](wire::Writer& w) { wire::encode(w, wire::EndSessionRequest{ns, r + 1, hashes}); });
  }
  const int fd = test::connect_unix(server.endpoint());
  std::thread sender([&] {
    for (std::size_t off = 0; off < frames.size();) {
      const ssize_t n = ::send(fd, frames.data() + off, frames.size() - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += static_cast<std::size_t>(n);
    }
  });
  // Reads the abuser's replies (HELLO + one per round) until all arrived.
  std::atomic<int> replies{0}, errors{0};
  std::thread reader([&] {
    wire::FrameParser parser;
    while (replies.load() < rounds + 1) {
      auto space = parser.prepare(65536);
      const ssize_t n = ::recv(fd, space.data(), space.size(), 0);
      if (n <= 0) break;
      parser.commit(static_cast<std::size_t>(n));
      while (auto f = parser.next()) {
        if (f->header.is_error()) errors.fetch_add(1);
        replies.fetch_add(1);
      }
    }
  });
  std::vector<double> rtts;
  const auto t0 = std::chrono::steady_clock::now();
  while (replies.load() < rounds + 1 && std::chrono::steady_clock::now() - t0 < 60s) {
    const auto p0 = std::chrono::steady_clock::now();
    REQUIRE_FALSE(pinger.ping());
    rtts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count());
    std::this_thread::sleep_for(1ms);
  }
  sender.join();
  ::shutdown(fd, SHUT_RDWR);
  reader.join();
  ::close(fd);
  std::sort(rtts.begin(), rtts.end());
  REQUIRE(rtts.size() > 5);
  const double median = rtts[rtts.size() / 2], worst = rtts.back();
  MESSAGE("PING median " << median << " ms, longest " << worst << " ms over " << rtts.size() << " pings while "
                         << rounds << " rounds of 2^22-key requests ran");
  CHECK(replies.load() == rounds + 1);  // every request answered
  CHECK(errors.load() == 0);
  // Unsliced, a PING waited behind whole requests (15 ms each in a release
  // build, ten times that under sanitizers): a median of several ms, and
  // 30-37 ms at worst. Sliced, it waits for one slice of 1024 keys.
  const double slow = test::under_sanitizer ? 10 : 1;
  CHECK(median < 3.0 * slow);
  CHECK(worst < 25.0 * slow);
}
