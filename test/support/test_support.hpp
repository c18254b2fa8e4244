// Helpers shared by the integration and GPU tests: run an io_context until a
// coroutine finishes or a condition holds (always with a hang guard), parse
// endpoints, run a command and capture its output.
#pragma once

#include <doctest/doctest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/use_future.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <future>
#include <optional>
#include <string>
#include <thread>

#include "kvlink/health/policy.hpp"
#include "kvlink/net/connection.hpp"
#include "kvlink/net/endpoint.hpp"

namespace kvlink::test {

// Built with ASan or TSan: everything runs several times slower, freed
// memory stays in quarantine and every byte has shadow memory.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool under_sanitizer = true;
#else
inline constexpr bool under_sanitizer = false;
#endif

using namespace std::chrono_literals;

// Runs `task` on `io` until it finishes; fails the test if it takes longer
// than `limit` (a hang guard, not a speed check).
template <class T>
T run(asio::io_context& io, asio::awaitable<T> task, std::chrono::seconds limit = 20s) {
  std::optional<T> result;
  std::exception_ptr error;
  asio::co_spawn(io, std::move(task), [&](std::exception_ptr e, T r) {
    error = e;
    if (!e) result = std::move(r);
  });
  io.restart();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!result && !error && std::chrono::steady_clock::now() < deadline) io.run_one_for(100ms);
  if (error) std::rethrow_exception(error);
  REQUIRE_MESSAGE(result.has_value(), "the test's coroutine did not finish in time");
  return std::move(*result);
}

// Runs `io` until `done()` holds or `limit` passes; returns done().
template <class Pred>
bool run_until(asio::io_context& io, Pred done, std::chrono::milliseconds limit = 10s) {
  io.restart();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < deadline) io.run_one_for(10ms);
  return done();
}

// Runs `io` for `d`: only where a test asserts that nothing happens.
inline void run_for(asio::io_context& io, std::chrono::steady_clock::duration d) {
  const auto end = std::chrono::steady_clock::now() + d;
  run_until(io, [&] { return std::chrono::steady_clock::now() >= end; },
            std::chrono::duration_cast<std::chrono::milliseconds>(d) + 1s);
}

// Heartbeat settings for adapter tests: faults are noticed within a few
// hundred milliseconds, reconnects retry every few milliseconds.
inline health::Config fast_health() {
  health::Config c;
  c.interval = 50ms;
  c.ping_timeout = 100ms;
  c.reconnect_initial = 5ms;
  c.reconnect_max = 50ms;
  c.connect_timeout = 200ms;
  return c;
}

inline net::Endpoint parse(const std::string& text) {
  auto ep = net::parse_endpoint(text);
  REQUIRE_MESSAGE(ep, ep.error().message());
  return *ep;
}

// A blocking connection to the unix socket of `endpoint` ("unix:/path"), for
// tests that speak raw frames; the caller closes it.
inline int connect_unix(const std::string& endpoint) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string path = parse(endpoint).path;
  REQUIRE(path.size() < sizeof addr.sun_path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

// Polls `done` (a cheap, thread-safe check) from a test thread until it
// holds or `limit` passes; returns done(). For state owned by another
// thread (adapters on a Runtime); with an io_context of the test's own,
// use run_until.
template <class Pred>
bool eventually(Pred done, std::chrono::milliseconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Whether process `pid` is stopped (SIGSTOP is delivered asynchronously:
// wait for this before relying on the server not serving anything).
inline bool process_stopped(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(f, line);
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'T';
}

// Resident set of process `pid`, in bytes.
inline std::uint64_t process_rss(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.starts_with("VmRSS:")) return std::stoull(line.substr(6)) * 1024;
  FAIL("no VmRSS for " << pid);
  return 0;
}

// One counter of the server's STATS, read over an admin connection of its own.
inline std::int64_t server_stat(const std::string& endpoint, const std::string& name) {
  asio::io_context io;
  wire::HelloRequest h;
  h.role = wire::Role::admin;
  h.instance_id = net::random_instance_id();
  auto c = run(io, net::connect(io.get_executor(), parse(endpoint), h, 5s));
  REQUIRE_MESSAGE(!c.error, c.error.message());
  auto f = c.connection->async_call(wire::StatsRequest{}, 5s, asio::use_future);
  REQUIRE(run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  auto reply = f.get();
  c.connection->close();
  run_until(io, [] { return false; }, 50ms);  // let the close go out
  for (auto& e : reply.entries)
    if (e.name == name) return e.value;
  FAIL("no stat " << name);
  return -1;
}

// Runs a shell command, capturing stdout and stderr into `out`; returns its
// exit status (-1 if it did not exit normally).
inline int run_command(const std::string& command, std::string& out) {
  FILE* f = ::popen((command + " 2>&1").c_str(), "r");
  REQUIRE(f != nullptr);
  char buf[4096];
  out.clear();
  while (std::size_t n = std::fread(buf, 1, sizeof buf, f)) out.append(buf, n);
  const int status = ::pclose(f);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace kvlink::test
