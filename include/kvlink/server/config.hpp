// Server configuration: plain struct, documented defaults; kvlink-server's
// flags map 1:1 onto these fields.
#pragma once

#include <chrono>
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

  // ---- store (flags: --l1-size, --no-huge-pages, --read-lock-ttl-s, ...) ----
  // Bytes of L1 memory for chunk slots (--l1-size accepts 512MiB, 8GiB, ...).
  // Mapped once, lazily, when the first KV cache registers.
  std::uint64_t l1_size = std::uint64_t{1} << 30;
  // Try huge pages (MAP_HUGETLB) for L1, falling back to ordinary pages.
  bool huge_pages = true;
  // Read locks taken by lookups expire after this unless released first.
  std::chrono::seconds read_lock_ttl{300};
  // Write locks of a STORE whose copy never completes expire after this.
  std::chrono::seconds write_lock_ttl{600};
  // Prefetch jobs never polled are dropped after this.
  std::chrono::seconds job_ttl{60};
  // Request sessions with no activity are dropped after this.
  std::chrono::seconds session_ttl{600};
  // Eviction starts above high_watermark of the slots and stops at low_watermark.
  double high_watermark = 0.95;
  double low_watermark = 0.85;
  // Copy threads of the CPU transfer engine (--transfer-threads).
  unsigned transfer_threads = 2;
  // Instances silent this long are reaped (their resources released).
  std::uint32_t reap_timeout_s = 120;
  // Longer grace for instances that registered KV caches but never pinged.
  std::uint32_t registration_grace_s = 3600;
};

}  // namespace kvlink::server
