// The Redis Cluster tier's data model (docs/tiers.md#redis-cluster), pure
// functions: where a chunk lives in the cluster and what its value looks
// like. No sockets, no hiredis.
//
// Key: "kvlink:v1:<namespace, 16 hex>:<chunk hash, 32 hex>:<rank>". The
// namespace already folds in the model, world size and cache salt, so two
// servers that compute the same key from the same prefix find each other's
// chunks, and nothing else. No hash tag: chunks spread over every master.
//
// Value: a 48-byte header, then the chunk's bytes.
//   0  magic "KVC1"        4  u32 format version (1)
//   8  u64 slot bytes (the layout class: the chunk size of its KV layout)
//  16  u64 byte count that follows the header
//  24  u64 chunk checksum (chunk_checksum: XXH3-64 seeded with the key)
//  32  u64 namespace      40  u64 XXH3-64 of bytes 0..39
// A value whose header or checksum does not match what the reader expects
// is a miss, counted, never served.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvlink/error.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::store {

// Redis Cluster's hash slot of `key`: CRC16 (XMODEM) of the key, or of the
// part between the first '{' and the next '}' when that part is not empty,
// modulo 16384.
inline constexpr std::uint16_t cluster_slots = 16384;
std::uint16_t cluster_slot(std::string_view key);

std::string cluster_key(const ChunkKey& key);

inline constexpr std::size_t cluster_header_bytes = 48;
inline constexpr std::uint32_t cluster_value_version = 1;

// The value stored for `key`: header + bytes.
std::vector<std::byte> encode_cluster_value(const ChunkKey& key, std::span<const std::byte> bytes);
// The header alone (encode_cluster_value() is it, then the bytes): for
// writers that put the value together where it is sent from.
std::array<std::byte, cluster_header_bytes> cluster_value_header(const ChunkKey& key,
                                                                 std::span<const std::byte> bytes);
// The chunk's bytes inside `value` if it is `key`'s chunk of `slot_bytes`
// bytes, whole and intact; otherwise why not (server_error: corrupt,
// foreign or of another layout; the caller counts and drops it).
Result<std::span<const std::byte>> decode_cluster_value(const ChunkKey& key, std::uint64_t slot_bytes,
                                                        std::span<const std::byte> value);

// A node's address as the cluster names it ("127.0.0.1:7001").
struct ClusterNode {
  std::string host;
  std::uint16_t port = 0;
  friend bool operator==(const ClusterNode&, const ClusterNode&) = default;
};
// "HOST:PORT" (an IPv6 host in brackets, or the last ':' splits), or why not.
Result<ClusterNode> parse_cluster_node(std::string_view text);
std::string to_string(const ClusterNode& node);

// A redirect in an error reply: "MOVED 3999 127.0.0.1:6381" (the slot has
// moved for good: update the map) or "ASK 3999 127.0.0.1:6381" (ask that
// node once, after ASKING).
struct ClusterRedirect {
  enum class Kind : std::uint8_t { moved, ask };
  Kind kind = Kind::moved;
  std::uint16_t slot = 0;
  ClusterNode node;
};
std::optional<ClusterRedirect> parse_redirect(std::string_view error);

// Which master serves each slot, and its replicas: what CLUSTER SLOTS
// said, corrected by MOVED redirects until the next refresh.
class SlotMap {
 public:
  struct Range {
    std::uint16_t first = 0;
    std::uint16_t last = 0;
    ClusterNode master;
    std::vector<ClusterNode> replicas;
  };
  // Replaces the map. Ranges may come in any order; slots no range names
  // have no node (a cluster being resharded or failed).
  void assign(const std::vector<Range>& ranges);
  // The master of `slot`, or null when none is known.
  const ClusterNode* master(std::uint16_t slot) const;
  const std::vector<ClusterNode>& replicas(std::uint16_t slot) const;
  // A MOVED redirect: `slot` is served by `node` from now on.
  void moved(std::uint16_t slot, const ClusterNode& node);
  // Every master the map names, once each.
  std::vector<ClusterNode> masters() const;
  // The slots `master` serves.
  std::uint32_t slots_of(const ClusterNode& master) const;
  // Slots with a master.
  std::uint32_t covered() const;
  bool empty() const { return covered() == 0; }

 private:
  struct Node {
    ClusterNode master;
    std::vector<ClusterNode> replicas;
  };
  std::uint32_t node_of(const ClusterNode& master, const std::vector<ClusterNode>& replicas);
  std::vector<Node> nodes_;
  std::vector<std::int32_t> slot_node_ = std::vector<std::int32_t>(cluster_slots, -1);
};

}  // namespace kvlink::store
