#include "kvlink/store/cluster_keys.hpp"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "kvlink/store/disk_journal.hpp"
#include "kvlink/store/little_endian.hpp"

namespace kvlink::store {

namespace {

// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster
// computes it, bit by bit: keys are short.
std::uint16_t crc16(std::string_view bytes) {
  std::uint16_t crc = 0;
  for (char c : bytes) {
    crc ^= static_cast<std::uint16_t>(static_cast<unsigned char>(c) << 8);
    for (int i = 0; i < 8; ++i) crc = (crc & 0x8000) ? static_cast<std::uint16_t>((crc << 1) ^ 0x1021) : static_cast<std::uint16_t>(crc << 1);
  }
  return crc;
}

constexpr char value_magic[4] = {'K', 'V', 'C', '1'};

Error corrupt(const ChunkKey& key, std::string_view why) {
  return Error(errc::server_error,
               fmt::format("the cluster's value for chunk {} rank {} is not usable ({}): a miss, dropped, never served",
                           to_string(key.hash), key.rank, why));
}

}  // namespace

std::uint16_t cluster_slot(std::string_view key) {
  if (auto open = key.find('{'); open != std::string_view::npos) {
    if (auto close = key.find('}', open + 1); close != std::string_view::npos && close > open + 1)
      key = key.substr(open + 1, close - open - 1);
  }
  return static_cast<std::uint16_t>(crc16(key) % cluster_slots);
}

std::string cluster_key(const ChunkKey& key) {
  return fmt::format("kvlink:v1:{:016x}:{}:{}", key.ns, to_string(key.hash), key.rank);
}

std::array<std::byte, cluster_header_bytes> cluster_value_header(const ChunkKey& key,
                                                                 std::span<const std::byte> bytes) {
  std::array<std::byte, cluster_header_bytes> h{};
  std::memcpy(h.data(), value_magic, 4);
  le::put_u32(h.data() + 4, cluster_value_version);
  le::put_u64(h.data() + 8, bytes.size());
  le::put_u64(h.data() + 16, bytes.size());
  le::put_u64(h.data() + 24, chunk_checksum(key, bytes));
  le::put_u64(h.data() + 32, key.ns);
  le::put_u64(h.data() + 40, XXH3_64bits(h.data(), 40));
  return h;
}

std::vector<std::byte> encode_cluster_value(const ChunkKey& key, std::span<const std::byte> bytes) {
  const auto h = cluster_value_header(key, bytes);
  std::vector<std::byte> v(cluster_header_bytes + bytes.size());
  std::memcpy(v.data(), h.data(), h.size());
  if (!bytes.empty()) std::memcpy(v.data() + h.size(), bytes.data(), bytes.size());
  return v;
}

Result<std::span<const std::byte>> decode_cluster_value(const ChunkKey& key, std::uint64_t slot_bytes,
                                                        std::span<const std::byte> value) {
  if (value.size() < cluster_header_bytes) return corrupt(key, fmt::format("{} bytes, shorter than its header", value.size()));
  const std::byte* h = value.data();
  if (std::memcmp(h, value_magic, 4) != 0) return corrupt(key, "not a kvlink value");
  if (le::get_u64(h + 40) != XXH3_64bits(h, 40)) return corrupt(key, "its header fails its checksum");
  const std::uint32_t version = le::get_u32(h + 4);
  if (version != cluster_value_version)
    return corrupt(key, fmt::format("format version {}, this server reads {}", version, cluster_value_version));
  if (le::get_u64(h + 32) != key.ns) return corrupt(key, "another namespace's value under this key");
  if (le::get_u64(h + 8) != slot_bytes)
    return corrupt(key, fmt::format("stored with another KV layout ({} bytes per chunk, this one {})", le::get_u64(h + 8),
                                    slot_bytes));
  const std::uint64_t n = le::get_u64(h + 16);
  if (n != slot_bytes || value.size() - cluster_header_bytes != n)
    return corrupt(key, fmt::format("{} bytes after the header, {} expected", value.size() - cluster_header_bytes,
                                    slot_bytes));
  const auto bytes = value.subspan(cluster_header_bytes);
  if (chunk_checksum(key, bytes) != le::get_u64(h + 24)) return corrupt(key, "its bytes fail their checksum");
  return bytes;
}

Result<ClusterNode> parse_cluster_node(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Error(errc::bad_request, fmt::format("'{}' is not a cluster node address ({}): give HOST:PORT, e.g. "
                                                "127.0.0.1:7001",
                                                text, why));
  };
  std::string_view host, port;
  if (text.starts_with('[')) {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return bad("an IPv6 address needs [ADDR]:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no port");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty()) return bad("no host");
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535)
    return bad("the port is not a number from 1 to 65535");
  return ClusterNode{std::string(host), static_cast<std::uint16_t>(value)};
}

std::string to_string(const ClusterNode& node) {
  return node.host.find(':') != std::string::npos ? fmt::format("[{}]:{}", node.host, node.port)
                                                   : fmt::format("{}:{}", node.host, node.port);
}

std::optional<ClusterRedirect> parse_redirect(std::string_view error) {
  ClusterRedirect r;
  if (error.starts_with("MOVED ")) r.kind = ClusterRedirect::Kind::moved;
  else if (error.starts_with("ASK ")) r.kind = ClusterRedirect::Kind::ask;
  else return std::nullopt;
  error.remove_prefix(r.kind == ClusterRedirect::Kind::moved ? 6 : 4);
  const auto space = error.find(' ');
  if (space == std::string_view::npos) return std::nullopt;
  unsigned slot = 0;
  auto [end, ec] = std::from_chars(error.data(), error.data() + space, slot);
  if (ec != std::errc() || end != error.data() + space || slot >= cluster_slots) return std::nullopt;
  auto node = parse_cluster_node(error.substr(space + 1));
  if (!node) return std::nullopt;
  r.slot = static_cast<std::uint16_t>(slot);
  r.node = std::move(*node);
  return r;
}

std::uint32_t SlotMap::node_of(const ClusterNode& master, const std::vector<ClusterNode>& replicas) {
  for (std::uint32_t i = 0; i < nodes_.size(); ++i)
    if (nodes_[i].master == master) {
      if (!replicas.empty()) nodes_[i].replicas = replicas;
      return i;
    }
  nodes_.push_back({master, replicas});
  return static_cast<std::uint32_t>(nodes_.size() - 1);
}

void SlotMap::assign(const std::vector<Range>& ranges) {
  nodes_.clear();
  std::fill(slot_node_.begin(), slot_node_.end(), -1);
  for (const auto& r : ranges) {
    if (r.first > r.last || r.last >= cluster_slots) continue;
    const auto n = static_cast<std::int32_t>(node_of(r.master, r.replicas));
    std::fill(slot_node_.begin() + r.first, slot_node_.begin() + r.last + 1, n);
  }
}

const ClusterNode* SlotMap::master(std::uint16_t slot) const {
  const std::int32_t n = slot < cluster_slots ? slot_node_[slot] : -1;
  return n < 0 ? nullptr : &nodes_[static_cast<std::size_t>(n)].master;
}

const std::vector<ClusterNode>& SlotMap::replicas(std::uint16_t slot) const {
  static const std::vector<ClusterNode> none;
  const std::int32_t n = slot < cluster_slots ? slot_node_[slot] : -1;
  return n < 0 ? none : nodes_[static_cast<std::size_t>(n)].replicas;
}

void SlotMap::moved(std::uint16_t slot, const ClusterNode& node) {
  if (slot >= cluster_slots) return;
  slot_node_[slot] = static_cast<std::int32_t>(node_of(node, {}));
}

std::vector<ClusterNode> SlotMap::masters() const {
  std::vector<bool> used(nodes_.size(), false);
  for (std::int32_t n : slot_node_)
    if (n >= 0) used[static_cast<std::size_t>(n)] = true;
  std::vector<ClusterNode> out;
  for (std::size_t i = 0; i < nodes_.size(); ++i)
    if (used[i]) out.push_back(nodes_[i].master);
  return out;
}

std::uint32_t SlotMap::slots_of(const ClusterNode& master) const {
  return static_cast<std::uint32_t>(std::count_if(slot_node_.begin(), slot_node_.end(), [&](std::int32_t n) {
    return n >= 0 && nodes_[static_cast<std::size_t>(n)].master == master;
  }));
}

std::uint32_t SlotMap::covered() const {
  return static_cast<std::uint32_t>(std::count_if(slot_node_.begin(), slot_node_.end(), [](std::int32_t n) { return n >= 0; }));
}

}  // namespace kvlink::store
