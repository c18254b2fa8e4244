// Server configuration: plain struct, documented defaults; kvlink-server's
// flags map 1:1 onto these fields.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "kvlink/error.hpp"

namespace kvlink::server {

struct ServerConfig {
  // Endpoints to listen on (unix:/path, tcp:HOST:PORT). Empty: the default
  // unix socket (net::default_endpoint()).
  std::vector<std::string> listen;
  // Tokens per chunk, announced in HELLO.
  std::uint32_t chunk_size = 256;
  // Largest frame payload accepted from a client.
  std::uint32_t max_payload = 64u << 20;
  // Requests one connection may have outstanding (announced in HELLO).
  // The server enforces it on requests still being worked on (STORE and
  // RETRIEVE copies): the excess gets limit_exceeded error replies.
  std::uint32_t max_in_flight = 4096;
  // Concurrent client connections; more are refused with an error.
  std::uint32_t max_connections = 1024;
  // Instances (distinct ids said HELLO, not yet gone) the server keeps;
  // HELLO of another is refused with an error.
  std::uint32_t max_instances = 4096;
  // Replies a connection may have queued before the server stops reading its
  // requests (a client that does not read its replies), and how long the
  // queue may stay above that without draining before the connection is closed.
  std::uint64_t max_outbound_bytes = 8u << 20;
  std::chrono::seconds outbound_stall_timeout{30};
  // Payload bytes of frames still arriving, summed over all connections
  // (a client trickling a large frame makes the server hold it). A frame
  // that would pass it is refused with an error and its connection closed;
  // payloads up to 64 KiB are always admitted. 0: 4 x max_payload.
  std::uint64_t max_inbound_bytes = 0;
  // Permission bits of unix sockets; with unix_group set, the sockets are
  // chowned to that group (and the default mode becomes 0660).
  unsigned unix_socket_mode = 0600;
  std::string unix_group;
  // The HTTP admin listener (HOST:PORT; "": none): /healthz, /readyz,
  // /status, /metrics and the status page. Loopback unless auth_token is
  // set, which /status and /metrics then require as a bearer token.
  std::string http;
  // What /status says of the transfer engine ("cpu, 2 threads", ...).
  std::string transfer_engine_summary;
  // Shared secret every HELLO must carry when non-empty (compared in
  // constant time). Required when listening on a non-loopback address.
  std::string auth_token;
  // L1 slots one instance's STOREs may hold: a byte count, or a fraction of
  // L1 (0: no quota). At its quota an instance's oldest stored chunk makes
  // room; past it (nothing of its own evictable) chunks are skipped.
  std::uint64_t instance_l1_quota_bytes = 0;
  double instance_l1_quota_fraction = 0;

  // ---- store (flags: --l1-size, --no-huge-pages, --read-lock-ttl-s, ...) ----
  // Bytes of L1 memory for chunk slots (--l1-size accepts 512MiB, 8GiB, ...).
  // Mapped when the server starts: a size it cannot serve fails start().
  std::uint64_t l1_size = std::uint64_t{1} << 30;
  // L1 is cut into slabs of this many bytes, each holding chunks of one KV
  // layout (0: an eighth of L1, at most 1 GiB). A layout's chunk must fit
  // in a slab; a slab wastes its tail (slab size mod chunk size).
  std::uint64_t l1_slab_size = 0;
  // Pin L1 in RAM at startup (mlock; needs the locked-memory limit).
  bool l1_lock = false;
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
  // Instances silent this long are reaped (their resources and KV-cache
  // registration released). 0: no reaper; a registration then stays until
  // UNREGISTER, even after its instance's connections closed.
  std::uint32_t reap_timeout_s = 120;
  // Silence allowed to instances that hold a KV-cache registration but never
  // pinged (an engine still loading its model). Not below reap_timeout_s.
  std::uint32_t registration_grace_s = 3600;
  // ---- tiers below L1 (docs/tiers.md) ----
  // The local disk tier: a directory (one server each) and the bytes it may
  // take ("": no disk tier). Its space is split between up to
  // l2_disk_layouts chunk sizes.
  std::string l2_disk;
  std::uint64_t l2_disk_size = 0;
  std::uint32_t l2_disk_layouts = 1;
  // Write every stored chunk to the tier as well (write-through), not only
  // the chunks L1 evicts (write-back).
  bool l2_write_through = false;
  // The longest a lookup waits for chunks coming up from a tier; then it
  // answers with what reached L1. Keep it below the engines' call timeout.
  std::chrono::milliseconds l2_lookup_wait{500};
  // Bytes of tier writes and of tier reads in flight at most; evicted chunks
  // past the write bound are dropped, lookups past the read bound miss.
  std::uint64_t l2_max_write_bytes = std::uint64_t{256} << 20;
  std::uint64_t l2_max_read_bytes = std::uint64_t{256} << 20;
  // An I/O of the tier without a completion this long marks it degraded.
  std::chrono::milliseconds l2_io_deadline{2000};
  // The shared tier: a Redis Cluster given by some of its nodes
  // (HOST:PORT; empty: none), its password (read from a file or
  // KVLINK_REDIS_PASSWORD), a TTL for the chunks stored there (0: none),
  // each command's deadline, the ping interval (and ping timeout) of the
  // heartbeat watching each master (an engine link's default), and whether
  // L1's evictions go there too (every stored chunk is written through).
  std::vector<std::string> l2_redis_cluster;
  std::string l2_redis_password;
  std::chrono::seconds l2_redis_ttl{0};
  std::chrono::milliseconds l2_redis_deadline{500};
  std::chrono::milliseconds l2_redis_ping{1000};
  bool l2_redis_write_back = false;

  // Planned restart (SIGTERM/SIGINT): how long the server waits for STOREs
  // and RETRIEVEs in flight before closing the connections. 0: no wait.
  std::chrono::seconds drain_timeout{10};
};

// The heartbeat interval clients use unless configured otherwise
// (health::Config::interval); reap timeouts below three of them reap
// healthy clients that miss two heartbeats.
inline constexpr std::uint32_t default_client_heartbeat_s = 1;
inline constexpr std::uint32_t min_safe_reap_timeout_s = 3 * default_client_heartbeat_s;

// Checks the reaper flags: an error if they cannot be served; sets
// `warning` (else leaves it empty) for a reap timeout that risks reaping
// live clients.
inline Error check_reaper(const ServerConfig& c, std::string& warning) {
  warning.clear();
  if (c.reap_timeout_s == 0) return {};  // no reaper: the grace is unused
  if (c.registration_grace_s < c.reap_timeout_s)
    return Error(errc::bad_request, "--registration-grace-s " + std::to_string(c.registration_grace_s) + " is shorter than --reap-timeout-s " +
           std::to_string(c.reap_timeout_s) +
           ": the grace is the longer silence allowed to registered instances that never pinged; raise "
           "--registration-grace-s or lower --reap-timeout-s");
  if (c.reap_timeout_s < min_safe_reap_timeout_s)
    warning = "--reap-timeout-s " + std::to_string(c.reap_timeout_s) + " is below " +
              std::to_string(min_safe_reap_timeout_s) + " s (3 x the clients' default " +
              std::to_string(default_client_heartbeat_s) +
              " s heartbeat interval): live clients that miss a heartbeat or two will be reaped and must "
              "register again";
  return {};
}

}  // namespace kvlink::server
