// Server configuration: plain struct, documented defaults; kvlink-server's
// flags map 1:1 onto these fields.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvlink::server {

struct ServerConfig {
  // Endpoints to listen on (unix:/path, tcp:HOST:PORT). Empty: the default
  // unix socket (net::default_endpoint()).
  std::vector<std::string> listen;
  // Tokens per chunk, announced in HELLO.
  std::uint32_t chunk_size = 256;
  // Largest frame payload accepted from a client.
  std::uint32_t max_payload = 64u << 20;
  // Requests one connection may have outstanding.
  std::uint32_t max_in_flight = 4096;
  // Concurrent client connections; more are refused with an error.
  std::uint32_t max_connections = 1024;
  // Permission bits of unix sockets.
  unsigned unix_socket_mode = 0600;
  // Instances silent this long are reaped (their resources released).
  std::uint32_t reap_timeout_s = 120;
  // Longer grace for instances that registered KV caches but never pinged.
  std::uint32_t registration_grace_s = 3600;
};

}  // namespace kvlink::server
