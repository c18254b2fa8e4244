// The multiplexed RPC connection against the real kvlink-server process.
#include <doctest/doctest.h>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/use_future.hpp>
#include <filesystem>
#include <sys/wait.h>

#include <thread>

#include "kvlink/net/connection.hpp"
#include "net/frame_stream.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::parse;
using kvlink::test::run;
using kvlink::test::run_until;

namespace {

wire::HelloRequest hello(wire::Role role = wire::Role::scheduler) {
  wire::HelloRequest h;
  h.role = role;
  h.instance_id = net::random_instance_id();
  h.client_name = "rpc_test";
  return h;
}

std::shared_ptr<net::Connection> connect(asio::io_context& io, const std::string& endpoint) {
  auto r = run(io, net::connect(io.get_executor(), parse(endpoint), hello(), 5s));
  REQUIRE_MESSAGE(!r.error, r.error.message());
  return r.connection;
}

asio::awaitable<std::error_code> ping(std::shared_ptr<net::Connection> c, std::chrono::milliseconds timeout) {
  auto [ec, reply] = co_await c->async_call(wire::PingRequest{}, timeout, asio::experimental::as_tuple(asio::use_awaitable));
  co_return ec;
}

// Issues `n` pings at once on one connection and counts the successes.
asio::awaitable<int> pipelined_pings(std::shared_ptr<net::Connection> c, int n, std::size_t* max_pending) {
  int ok = 0;
  int done = 0;
  auto ex = co_await asio::this_coro::executor;
  for (int i = 0; i < n; ++i) {
    c->async_call(wire::PingRequest{}, 10s, [&](std::error_code ec, wire::PingReply) {
      ++done;
      if (!ec) ++ok;
    });
  }
  *max_pending = c->pending();
  asio::steady_timer t(ex);
  while (done < n) {
    t.expires_after(1ms);
    co_await t.async_wait(asio::use_awaitable);
  }
  co_return ok;
}

}  // namespace

TEST_CASE("HELLO returns the server's boot id; PING works over unix and tcp") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--listen", "tcp:127.0.0.1:0", "--chunk-size", "128"});
  server.start();
  REQUIRE(server.endpoints().size() == 2);
  CHECK(server.endpoint(1).starts_with("tcp:127.0.0.1:"));
  CHECK(server.endpoint(1) != "tcp:127.0.0.1:0");

  // The unix socket is private to its owner.
  auto perms = std::filesystem::status(dir.path() + "/kvlink.sock").permissions();
  CHECK((perms & (std::filesystem::perms::group_all | std::filesystem::perms::others_all)) ==
        std::filesystem::perms::none);

  asio::io_context io;
  for (const auto& ep : server.endpoints()) {
    CAPTURE(ep);
    auto r = run(io, net::connect(io.get_executor(), parse(ep), hello(), 5s));
    REQUIRE_MESSAGE(!r.error, r.error.message());
    CHECK(r.hello.chunk_size == 128);
    CHECK(server.ready_line().find(fmt::format("{:016x}", r.hello.boot_id)) != std::string::npos);
    CHECK(run(io, ping(r.connection, 2s)) == std::error_code{});
    r.connection->close();
  }
}

TEST_CASE("many pipelined requests on one connection all complete") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--listen", "tcp:127.0.0.1:0"});
  server.start();
  asio::io_context io;
  for (const auto& ep : server.endpoints()) {
    CAPTURE(ep);
    auto c = connect(io, ep);
    std::size_t max_pending = 0;
    const int n = 2000;
    CHECK(run(io, pipelined_pings(c, n, &max_pending)) == n);
    CHECK(max_pending == n);  // all were in flight at once
    CHECK(c->pending() == 0);
    CHECK(c->stats().replies == static_cast<std::uint64_t>(n) + 1);  // + HELLO
  }
}

TEST_CASE("a request past its deadline leaves the pending table at once; its late reply is dropped") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto c = connect(io, server.endpoint());
  server.stop();  // SIGSTOP: the request is never answered in time
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(run(io, ping(c, 100ms)) == errc::timed_out);
  const auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= 100ms);
  CHECK(waited < 5s);
  CHECK(c->pending() == 0);
  CHECK(c->stats().timeouts == 1);
  server.resume();
  CHECK(run_until(io, [&] { return c->stats().late_replies == 1; }));
  CHECK(run(io, ping(c, 2s)) == std::error_code{});  // the connection is still fine
}

TEST_CASE("a cancelled request completes with operation_aborted and leaves the table") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto c = connect(io, server.endpoint());
  server.stop();
  asio::cancellation_signal cancel;
  std::optional<std::error_code> result;
  c->async_call(wire::PingRequest{}, 30s,
                asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, wire::PingReply) { result = ec; }));
  CHECK(run_until(io, [&] { return c->pending() == 1; }));
  asio::post(io, [&] { cancel.emit(asio::cancellation_type::terminal); });
  CHECK(run_until(io, [&] { return result.has_value(); }));
  CHECK(*result == asio::error::operation_aborted);
  CHECK(c->pending() == 0);
  CHECK(c->stats().cancelled == 1);
  server.resume();
}

TEST_CASE("server killed mid-request: pending calls fail fast with connection_lost") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto c = connect(io, server.endpoint());
  std::optional<Error> closed;
  c->on_close([&](const Error& end) { closed = end; });
  server.stop();
  int lost = 0;
  for (int i = 0; i < 10; ++i)
    c->async_call(wire::PingRequest{}, 60s, [&](std::error_code ec, wire::PingReply) { lost += ec == errc::connection_lost; });
  CHECK(run_until(io, [&] { return c->pending() == 10; }));
  const auto t0 = std::chrono::steady_clock::now();
  server.kill();
  CHECK(run_until(io, [&] { return lost == 10; }, 5s));
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  CHECK(closed.has_value());
  CHECK_FALSE(c->is_open());
  // Calls on a closed connection fail at once.
  CHECK(run(io, ping(c, 10s)) == errc::connection_lost);
}

TEST_CASE("a peer that said why and closed: our failed write does not throw its last frames away") {
  // The server refusing a connection (--max-connections) writes its reason
  // and closes, often before the client's HELLO goes out. The HELLO's write
  // then fails (EPIPE) with the reason already in our receive buffer: the
  // reader must still hand it over, then end at the peer's close.
  asio::io_context io;
  asio::local::stream_protocol::socket ours(io), theirs(io);
  asio::local::connect_pair(ours, theirs);
  net::FrameStream stream{net::Socket(std::move(ours))};
  std::deque<UniqueFd> fds;
  stream.receive_fds_into(&fds);  // the reader waits for readability, then reads itself
  std::vector<std::uint64_t> ids;
  std::optional<Error> end;
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    end = co_await stream.read_frames([&](const wire::Frame& f) {
      ids.push_back(f.header.id);
      return true;
    });
  }, asio::detached);
  io.poll();  // the reader found nothing and waits
  io.restart();
  wire::Bytes bytes;
  wire::FrameBuilder(bytes).add(static_cast<std::uint8_t>(wire::Opcode::hello), wire::flag::response | wire::flag::error,
                                7, [](wire::Writer& w) { wire::encode(w, wire::ErrorReply{}); });
  asio::write(theirs, asio::buffer(bytes));
  theirs.close();
  stream.send(static_cast<std::uint8_t>(wire::Opcode::ping), 0, 1, [](wire::Writer&) {}, nullptr);
  CHECK(run_until(io, [&] { return end.has_value(); }, 5s));
  CHECK(ids == std::vector<std::uint64_t>{7});
  REQUIRE(end);
  CHECK(end->detail() == "peer closed the connection");
}

TEST_CASE("garbage bytes close only that connection; others keep working") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto good = connect(io, server.endpoint());

  asio::local::stream_protocol::socket raw(io);
  raw.connect(asio::local::stream_protocol::endpoint(dir.path() + "/kvlink.sock"));
  const std::string garbage = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  asio::write(raw, asio::buffer(garbage));
  // The server answers with an error frame, then closes.
  wire::Bytes reply(4096);
  std::size_t got = 0;
  std::error_code ec;
  while (!ec) got += raw.read_some(asio::buffer(reply.data() + got, reply.size() - got), ec);
  CHECK(ec == asio::error::eof);
  wire::FrameParser p;
  p.append(std::span(reply.data(), got));
  auto f = p.next();
  REQUIRE(f);
  CHECK(f->header.is_error());
  wire::ErrorReply err;
  REQUIRE_FALSE(wire::decode(f->payload, err, "error"));
  CHECK(err.code == static_cast<std::uint16_t>(errc::protocol_error));
  CHECK(err.message.find("magic") != std::string::npos);

  CHECK(run(io, ping(good, 2s)) == std::error_code{});
}

TEST_CASE("an unknown opcode gets an error reply and the connection stays up") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  asio::local::stream_protocol::socket raw(io);
  raw.connect(asio::local::stream_protocol::endpoint(dir.path() + "/kvlink.sock"));
  wire::Bytes out;
  wire::FrameBuilder b(out);
  b.add(static_cast<std::uint8_t>(wire::Opcode::hello), 0, 1, [](wire::Writer& w) { wire::encode(w, hello()); });
  b.add(250, 0, 2, [](wire::Writer&) {});
  b.add(static_cast<std::uint8_t>(wire::Opcode::ping), 0, 3, [](wire::Writer&) {});
  asio::write(raw, asio::buffer(out));
  wire::FrameParser p;
  std::vector<wire::Header> headers;
  while (headers.size() < 3) {
    auto space = p.prepare(4096);
    std::size_t n = raw.read_some(asio::buffer(space.data(), space.size()));
    p.commit(n);
    while (auto f = p.next()) headers.push_back(f->header);
  }
  CHECK_FALSE(headers[0].is_error());
  CHECK(headers[1].id == 2);
  CHECK(headers[1].is_error());
  CHECK(headers[2].id == 3);
  CHECK_FALSE(headers[2].is_error());
}

TEST_CASE("connecting to an absent server fails with a clear error") {
  TempDir dir;
  asio::io_context io;
  auto r = run(io, net::connect(io.get_executor(), parse(dir.socket("none.sock")), hello(), 2s));
  CHECK(r.error == errc::not_connected);
  CHECK(r.error.message().find("none.sock") != std::string::npos);
  CHECK_FALSE(r.connection);
}

TEST_CASE("a stopped server makes connect time out, not hang") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  server.stop();
  asio::io_context io;
  auto r = run(io, net::connect(io.get_executor(), parse(server.endpoint()), hello(), 200ms));
  CHECK(r.error == errc::timed_out);
  server.resume();
}

TEST_CASE("use_future works while the io_context runs on its own thread") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto c = connect(io, server.endpoint());
  auto guard = asio::make_work_guard(io);
  io.restart();
  std::thread runner([&] { io.run(); });
  std::vector<std::future<wire::PingReply>> futures;
  for (int i = 0; i < 100; ++i) futures.push_back(c->async_call(wire::PingRequest{}, 5s, asio::use_future));
  int ok = 0;
  for (auto& f : futures) {
    REQUIRE(f.wait_for(10s) == std::future_status::ready);
    f.get();
    ++ok;
  }
  CHECK(ok == 100);
  server.stop();
  // The timeout arrives as a value through a callback, not as an exception
  // crossing threads: libstdc++'s exception_ptr refcount is invisible to TSan.
  std::promise<std::error_code> late_result;
  auto late = late_result.get_future();
  c->async_call(wire::PingRequest{}, 50ms, [&](std::error_code ec, wire::PingReply) { late_result.set_value(ec); });
  REQUIRE(late.wait_for(10s) == std::future_status::ready);
  CHECK(late.get() == errc::timed_out);
  server.resume();
  guard.reset();
  c->close();
  runner.join();
}

// A deferred operation does nothing until it is launched.
asio::awaitable<std::error_code> deferred_ping(std::shared_ptr<net::Connection> c, std::uint64_t* sent_before_launch) {
  auto op = c->async_call(wire::PingRequest{}, 2s, asio::experimental::deferred);
  *sent_before_launch = c->stats().calls;
  auto [ec, reply] = co_await std::move(op)(asio::experimental::as_tuple(asio::use_awaitable));
  co_return ec;
}

TEST_CASE("experimental::deferred: the call starts only when launched") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  asio::io_context io;
  auto c = connect(io, server.endpoint());
  const std::uint64_t calls_before = c->stats().calls;
  std::uint64_t sent_before_launch = 0;
  CHECK(run(io, deferred_ping(c, &sent_before_launch)) == std::error_code{});
  CHECK(sent_before_launch == calls_before);
  CHECK(c->stats().calls == calls_before + 1);
}

TEST_CASE("SIGTERM drains and exits 0, removing the socket file") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  CHECK(std::filesystem::exists(dir.path() + "/kvlink.sock"));
  CHECK(server.terminate() == 0);
  CHECK_FALSE(std::filesystem::exists(dir.path() + "/kvlink.sock"));
}

TEST_CASE("a second server on a live socket refuses to start; a stale socket is reused") {
  TempDir dir;
  ServerProcess first({"--listen", dir.socket()});
  first.start();
  ServerProcess second({"--listen", dir.socket()});
  CHECK_THROWS_WITH_AS(second.start(3s), doctest::Contains("another server"), std::runtime_error);
  first.kill();  // leaves a stale socket file behind
  CHECK(std::filesystem::exists(dir.path() + "/kvlink.sock"));
  ServerProcess third({"--listen", dir.socket()});
  third.start();
  asio::io_context io;
  CHECK(run(io, ping(connect(io, third.endpoint()), 2s)) == std::error_code{});
}

TEST_CASE("kvlink-cli ping reports round trips, and fails clearly without a server") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket()});
  server.start();
  const std::string cli = ServerProcess::binary("KVLINK_CLI");
  auto run_cli = [&](const std::string& args, std::string& out) { return kvlink::test::run_command(cli + " " + args, out); };
  std::string out;
  CHECK(run_cli("ping --server " + server.endpoint() + " --count 3 --interval-ms 0", out) == 0);
  CHECK(out.find("3 sent, 3 ok") != std::string::npos);
  CHECK(out.find("p50") != std::string::npos);
  CHECK(run_cli("ping --server " + dir.socket("absent.sock") + " --count 1", out) != 0);
  CHECK(out.find("cannot connect") != std::string::npos);
  server.stop();
  CHECK(run_cli("ping --server " + server.endpoint() + " --count 1 --timeout-ms 200", out) != 0);
  CHECK(out.find("timed out") != std::string::npos);
  server.resume();
}
