// kvlink-server's network layer: listeners on any number of unix: and tcp:
// endpoints, one coroutine session per connection. Requests are handled
// inline on the io thread by the RequestHandler, so HELLO and PING are never
// queued behind slow work (which later runs elsewhere and replies by post).
#pragma once

#include <asio/io_context.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/request_handler.hpp"

namespace kvlink::server {

class Server {
 public:
  // `engine` copies STORE/RETRIEVE data; it must outlive the server. The
  // default completes at once and copies nothing (in-process tests and
  // benchmarks of the control plane; kvlink-server passes its CPU engine).
  Server(asio::io_context& io, ServerConfig config,
         transfer::TransferEngine& engine = default_transfer_engine());
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds every endpoint and starts accepting. Throws std::runtime_error
  // with a message naming the endpoint and what to do when one cannot be
  // bound.
  void start();
  // Stops accepting, closes every session and removes unix socket files.
  // Idempotent; call on the io thread.
  void stop();

  // Planned restart (SIGTERM): stops accepting at once (removes the unix
  // socket files, then closes the listeners, so a replacement can bind the
  // same paths now), refuses new transfers (shutting_down), sends every
  // connection a SERVER_NOTICE{draining}, waits until no STORE/RETRIEVE is
  // in flight and their replies left, or `timeout` passed (0: no wait),
  // then stop()s and calls `done`. Logs a line at each end. Once only; call
  // on the io thread.
  struct DrainReport {
    bool timed_out = false;          // the timeout cut it
    Duration elapsed{};              // from the start of the drain
    std::uint64_t transfers_cut = 0; // still in flight when the connections closed
    std::size_t connections = 0;     // open when it ended (then closed)
  };
  void drain(Duration timeout, std::function<void(const DrainReport&)> done = {});

  // The endpoints actually bound (tcp port 0 resolved to the real port).
  const std::vector<std::string>& endpoints() const;
  // The HTTP admin listener's URL (http://HOST:PORT), "" without --http.
  const std::string& admin_url() const { return admin_url_; }
  std::uint64_t boot_id() const;
  RequestHandler& handler();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string admin_url_;
};

// Why `config` must not be served as it is (unauthorized), or success:
// listening on a non-loopback address needs an auth token.
Error check_access(const ServerConfig& config);

// A random 64-bit server boot id, never 0.
std::uint64_t random_boot_id();

}  // namespace kvlink::server
