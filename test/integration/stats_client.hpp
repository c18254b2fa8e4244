// A client connection for integration tests that reads the server's STATS
// and pings: an admin connection by default (never an instance), or one of
// another role when a test needs instances.
#pragma once

#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <chrono>
#include <memory>
#include <string>

#include "kvlink/net/connection.hpp"
#include "test_support.hpp"

namespace kvlink::test {

struct StatsClient {
  asio::io_context& io;
  std::shared_ptr<net::Connection> conn;

  StatsClient(asio::io_context& io, const std::string& ep, wire::Role role = wire::Role::admin) : io(io) {
    wire::HelloRequest h;
    h.role = role;
    h.instance_id = net::random_instance_id();
    h.client_name = "stats_client";
    auto r = run(io, net::connect(io.get_executor(), parse(ep), h, std::chrono::seconds(5)));
    REQUIRE_MESSAGE(!r.ec, r.error);
    conn = r.connection;
  }
  ~StatsClient() { conn->close(); }

  // One STATS value; -1 when the call failed, -2 when there is no such key.
  std::int64_t stat(const std::string& name) { return run(io, stat_co(conn, name)); }
  // Whether `name` reaches `value` within 10 s.
  bool stat_becomes(const std::string& name, std::int64_t value) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < end)
      if (stat(name) == value) return true;
    return stat(name) == value;
  }
  std::error_code ping() { return run(io, ping_co(conn)); }

 private:
  static asio::awaitable<std::int64_t> stat_co(std::shared_ptr<net::Connection> c, std::string name) {
    auto [ec, r] = co_await c->async_call(wire::StatsRequest{}, std::chrono::seconds(5),
                                          asio::experimental::as_tuple(asio::use_awaitable));
    if (ec) co_return -1;
    for (auto& e : r.entries)
      if (e.name == name) co_return e.value;
    co_return -2;
  }
  static asio::awaitable<std::error_code> ping_co(std::shared_ptr<net::Connection> c) {
    auto [ec, r] = co_await c->async_call(wire::PingRequest{}, std::chrono::seconds(5),
                                          asio::experimental::as_tuple(asio::use_awaitable));
    co_return ec;
  }
};

}  // namespace kvlink::test
