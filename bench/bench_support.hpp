// Helpers shared by the benchmark binaries.
#pragma once

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <exception>
#include <memory>
#include <utility>

#include "kvlink/net/connection.hpp"

namespace kvlink::bench {

// Runs `task` on `io` in this thread until it completes (a connection's
// reader keeps `io` busy forever, so run() alone would not return).
template <class T>
T run_until_done(asio::io_context& io, asio::awaitable<T> task) {
  bool done = false;
  std::exception_ptr error;
  T result{};
  asio::co_spawn(io, std::move(task), [&](std::exception_ptr e, T r) {
    error = e;
    result = std::move(r);
    done = true;
  });
  while (!done) io.run_one();
  if (error) std::rethrow_exception(error);
  return result;
}

// Closes the connection and lets its reader finish.
inline void disconnect(asio::io_context& io, std::shared_ptr<net::Connection>& conn) {
  bool closed = false;
  asio::post(io, [&] {
    conn->on_close([&](const Error&) { closed = true; });
    conn->close();
  });
  while (!closed) io.run_one();
  conn.reset();
  io.poll();
}

}  // namespace kvlink::bench
