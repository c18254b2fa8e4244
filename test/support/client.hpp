// A client connection for integration tests: HELLO in a role (admin by
// default: never an instance), then calls one at a time on the test's
// io_context, with the server's error message kept for the assertions.
#pragma once

#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <chrono>
#include <memory>
#include <string>
#include <tuple>

#include "kvlink/net/connection.hpp"
#include "test_support.hpp"

namespace kvlink::test {

// A call's outcome: the error (if any), the reply, the server's message.
template <class R>
struct Reply {
  std::error_code ec;
  R reply;
  std::string message;
};

struct Client {
  asio::io_context& io;
  std::shared_ptr<net::Connection> conn;

  Client(asio::io_context& io, const std::string& endpoint, wire::Role role = wire::Role::admin,
         std::string name = "test_client")
      : io(io) {
    wire::HelloRequest h;
    h.role = role;
    h.instance_id = net::random_instance_id();
    h.client_name = std::move(name);
    auto r = run(io, net::connect(io.get_executor(), parse(endpoint), h, std::chrono::seconds(5)));
    REQUIRE_MESSAGE(!r.error, r.error.message());
    conn = r.connection;
  }
  ~Client() { conn->close(); }

  // `fd` >= 0 travels with the request (REGISTER_KV_CACHE's memfd).
  template <class M>
  static asio::awaitable<Reply<typename M::reply_type>> call_co(std::shared_ptr<net::Connection> c, M m,
                                                                int fd = -1) {
    using namespace std::chrono_literals;
    // (No co_await inside ?: — g++ 12 miscompiles it.)
    std::tuple<std::error_code, typename M::reply_type> t;
    if (fd >= 0)
      t = co_await c->async_call_with_fd(std::move(m), fd, 5s, asio::experimental::as_tuple(asio::use_awaitable));
    else
      t = co_await c->async_call(std::move(m), 5s, asio::experimental::as_tuple(asio::use_awaitable));
    auto& [ec, r] = t;
    co_return Reply<typename M::reply_type>{ec, std::move(r), ec ? c->last_error_message() : std::string()};
  }
  template <class M>
  Reply<typename M::reply_type> call(M m, int fd = -1) {
    return run(io, call_co(conn, std::move(m), fd));
  }
  // The reply of a call that must succeed.
  template <class M>
  typename M::reply_type ok(M m, int fd = -1) {
    auto r = call(std::move(m), fd);
    REQUIRE_MESSAGE(!r.ec, r.ec.message() << ": " << r.message);
    return r.reply;
  }

  // One STATS value; -1 when the call failed, -2 when there is no such key.
  std::int64_t stat(const std::string& name) {
    auto r = call(wire::StatsRequest{});
    if (r.ec) return -1;
    for (auto& e : r.reply.entries)
      if (e.name == name) return e.value;
    return -2;
  }
  // Whether `name` reaches `value` within 10 s.
  bool stat_becomes(const std::string& name, std::int64_t value) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < end)
      if (stat(name) == value) return true;
    return stat(name) == value;
  }
  std::error_code ping() { return call(wire::PingRequest{}).ec; }
};

}  // namespace kvlink::test
