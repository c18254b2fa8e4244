// Helpers shared by the integration tests: run an io_context until a
// coroutine finishes or a condition holds (always with a hang guard), parse
// endpoints, run a command and capture its output.
#pragma once

#include <doctest/doctest.h>
#include <sys/wait.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#include "kvlink/net/endpoint.hpp"

namespace kvlink::test {

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

inline net::Endpoint parse(const std::string& text) {
  net::Endpoint ep;
  std::string error;
  REQUIRE_MESSAGE(net::parse_endpoint(text, ep, error), error);
  return ep;
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
