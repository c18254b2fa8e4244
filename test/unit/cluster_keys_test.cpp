// The Redis Cluster tier's data model: hash slots as Redis computes them
// (its documented examples), keys, the self-checked value header (every
// way a value can be wrong is a miss), node addresses, MOVED/ASK
// redirects and the slot map.
#include <doctest/doctest.h>

#include "kvlink/store/cluster_keys.hpp"

using namespace kvlink;
using namespace kvlink::store;

namespace {
ChunkKey key(std::uint64_t i) { return ChunkKey{0x1234, ChunkHash{i * 31 + 7, i}, 1}; }
std::vector<std::byte> bytes_of(std::size_t n, int seed) {
  std::vector<std::byte> b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>((i * 11 + static_cast<std::size_t>(seed)) & 0xff);
  return b;
}
}  // namespace

TEST_CASE("cluster keys: hash slots match Redis Cluster's (CRC16 XMODEM mod 16384, hash tags)") {
  CHECK(cluster_slot("123456789") == 0x31C3);  // the CRC16/XMODEM check value
  CHECK(cluster_slot("foo") == 12182);          // CLUSTER KEYSLOT foo
  CHECK(cluster_slot("{user1000}.following") == cluster_slot("{user1000}.followers"));
  CHECK(cluster_slot("{user1000}.following") == cluster_slot("user1000"));
  CHECK(cluster_slot("foo{}{bar}") == cluster_slot(std::string_view("foo{}{bar}")));  // an empty tag: the whole key
  CHECK(cluster_slot("foo{{bar}}zap") == cluster_slot("{bar"));
  CHECK(cluster_slot("foo{bar}{zap}") == cluster_slot("bar"));
  CHECK(cluster_slot("") == 0);
}

TEST_CASE("cluster keys: a chunk's key names its namespace, hash and rank") {
  const auto k = key(3);
  const std::string s = cluster_key(k);
  CHECK(s == "kvlink:v1:0000000000001234:" + to_string(k.hash) + ":1");
  CHECK(cluster_key(ChunkKey{k.ns, k.hash, 2}) != s);
  CHECK(cluster_key(ChunkKey{k.ns + 1, k.hash, 1}) != s);
}

TEST_CASE("cluster keys: a value reads back as the chunk; every way it can be wrong is refused") {
  const auto k = key(1);
  const auto chunk = bytes_of(8192, 5);
  auto v = encode_cluster_value(k, chunk);
  REQUIRE(v.size() == cluster_header_bytes + chunk.size());
  auto got = decode_cluster_value(k, 8192, v);
  REQUIRE_MESSAGE(got, got.error().message());
  CHECK(std::equal(got->begin(), got->end(), chunk.begin(), chunk.end()));

  auto refused = [&](std::vector<std::byte> value, const ChunkKey& as, std::uint64_t slot_bytes, const char* why) {
    auto r = decode_cluster_value(as, slot_bytes, value);
    REQUIRE_FALSE(r);
    CHECK(r.error() == errc::server_error);
    CHECK_MESSAGE(r.error().message().find(why) != std::string::npos, r.error().message());
  };
  auto flipped = v;
  flipped[cluster_header_bytes + 100] ^= std::byte{1};
  refused(flipped, k, 8192, "fail their checksum");
  auto header = v;
  header[20] ^= std::byte{1};
  refused(header, k, 8192, "header fails its checksum");
  refused(std::vector<std::byte>(v.begin(), v.end() - 1), k, 8192, "bytes after the header");
  refused(std::vector<std::byte>(v.begin(), v.begin() + 10), k, 8192, "shorter than its header");
  refused(v, k, 4096, "another KV layout");
  refused(v, ChunkKey{k.ns + 1, k.hash, k.rank}, 8192, "another namespace");
  refused(v, key(2), 8192, "fail their checksum");  // intact bytes of another key
  auto magic = v;
  magic[0] = std::byte{'X'};
  refused(magic, k, 8192, "not a kvlink value");
}

TEST_CASE("cluster keys: node addresses") {
  auto n = parse_cluster_node("127.0.0.1:7001");
  REQUIRE(n);
  CHECK(n->host == "127.0.0.1");
  CHECK(n->port == 7001);
  CHECK(to_string(*n) == "127.0.0.1:7001");
  auto v6 = parse_cluster_node("[::1]:7002");
  REQUIRE(v6);
  CHECK(v6->host == "::1");
  CHECK(to_string(*v6) == "[::1]:7002");
  for (const char* bad : {"", "host", ":7001", "h:0", "h:65536", "h:70x", "[::1]7001", "[::1"}) {
    CAPTURE(bad);
    auto r = parse_cluster_node(bad);
    REQUIRE_FALSE(r);
    CHECK(r.error().message().find("HOST:PORT") != std::string::npos);
  }
}

TEST_CASE("cluster keys: MOVED and ASK redirects") {
  auto m = parse_redirect("MOVED 3999 127.0.0.1:6381");
  REQUIRE(m);
  CHECK(m->kind == ClusterRedirect::Kind::moved);
  CHECK(m->slot == 3999);
  CHECK(m->node == ClusterNode{"127.0.0.1", 6381});
  auto a = parse_redirect("ASK 1 10.0.0.2:7000");
  REQUIRE(a);
  CHECK(a->kind == ClusterRedirect::Kind::ask);
  for (const char* not_one : {"ERR wrong", "MOVED", "MOVED x 1.2.3.4:5", "MOVED 16384 1.2.3.4:5", "MOVED 1 nohost",
                              "ASK 1"})
    CHECK_FALSE(parse_redirect(not_one));
}

TEST_CASE("cluster keys: the slot map follows CLUSTER SLOTS and MOVED") {
  SlotMap map;
  CHECK(map.empty());
  const ClusterNode a{"127.0.0.1", 7000}, b{"127.0.0.1", 7001}, c{"127.0.0.1", 7002}, ra{"127.0.0.1", 7003};
  map.assign({{0, 5460, a, {ra}}, {10923, 16383, c, {}}, {5461, 10922, b, {}}});
  CHECK(map.covered() == cluster_slots);
  CHECK(*map.master(0) == a);
  CHECK(*map.master(5461) == b);
  CHECK(*map.master(16383) == c);
  CHECK(map.replicas(100) == std::vector<ClusterNode>{ra});
  CHECK(map.masters().size() == 3);
  map.moved(100, b);  // a slot migrated
  CHECK(*map.master(100) == b);
  CHECK(*map.master(101) == a);
  CHECK(map.slots_of(a) == 5460);
  CHECK(map.slots_of(b) == 5463);
  CHECK(map.slots_of(ra) == 0);  // a replica serves none
  map.assign({{0, 99, a, {}}});  // a cluster with slots uncovered
  CHECK(map.covered() == 100);
  CHECK(map.master(100) == nullptr);
  CHECK(map.masters() == std::vector<ClusterNode>{a});
}
