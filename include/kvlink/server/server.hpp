// kvlink-server's network layer: listeners on any number of unix: and tcp:
// endpoints, one coroutine session per connection. Requests are handled
// inline on the io thread by the RequestHandler, so HELLO and PING are never
// queued behind slow work (which later runs elsewhere and replies by post).
#pragma once

#include <asio/io_context.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

  // The endpoints actually bound (tcp port 0 resolved to the real port).
  const std::vector<std::string>& endpoints() const { return bound_; }
  std::uint64_t boot_id() const;
  RequestHandler& handler();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> bound_;
};

// A random 64-bit server boot id, never 0.
std::uint64_t random_boot_id();

}  // namespace kvlink::server
