// Chunk keys, the L1 slot pool and the index (LRU, watermarks, locks) with
// fake time.
#include <doctest/doctest.h>

#include <numeric>
#include <set>

#include "kvlink/store/keys.hpp"
#include "kvlink/store/kv_store.hpp"
#include "kvlink/store/l1_pool.hpp"

using namespace kvlink;
using namespace kvlink::store;
using namespace std::chrono_literals;

namespace {
std::vector<Token> tokens(std::size_t n, Token start = 0) {
  std::vector<Token> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}
ChunkHash h(std::uint64_t i) { return ChunkHash{i * 7919 + 1, i}; }
}  // namespace

TEST_CASE("keys: the rolling hash names whole prefixes") {
  const auto a = tokens(1024);
  auto b = a;
  b[600] = 99999;  // diverges inside chunk 2 (256-token chunks)
  const auto ha = chunk_hashes(a, 256);
  const auto hb = chunk_hashes(b, 256);
  REQUIRE(ha.size() == 4);
  REQUIRE(hb.size() == 4);
  CHECK(ha[0] == hb[0]);
  CHECK(ha[1] == hb[1]);
  CHECK(ha[2] != hb[2]);
  CHECK(ha[3] != hb[3]);  // everything after the divergence changes
  // Same prefix, different length: same hashes for the shared chunks.
  const auto hshort = chunk_hashes(std::span(a).first(512), 256);
  REQUIRE(hshort.size() == 2);
  CHECK(hshort[0] == ha[0]);
  CHECK(hshort[1] == ha[1]);
  // Chunk i depends on chunk i-1: the same tokens at another position hash differently.
  CHECK(chunk_hash(ChunkHash{}, std::span(a).subspan(256, 256)) != ha[1]);
  CHECK(chunk_hash(ha[0], std::span(a).subspan(256, 256)) == ha[1]);
}

TEST_CASE("keys: a partial tail chunk is never keyed") {
  CHECK(chunk_hashes(tokens(255), 256).empty());
  CHECK(chunk_hashes(tokens(511), 256).size() == 1);
  CHECK(chunk_hashes(tokens(512), 256).size() == 2);
  CHECK(chunk_hashes(tokens(0), 256).empty());
}

TEST_CASE("keys: namespaces separate models, world sizes and salts") {
  const std::uint64_t base = namespace_id({"llama-3-8b", 1, ""});
  CHECK(base != 0);
  CHECK(base == namespace_id({"llama-3-8b", 1, ""}));
  CHECK(base != namespace_id({"llama-3-70b", 1, ""}));
  CHECK(base != namespace_id({"llama-3-8b", 2, ""}));
  CHECK(base != namespace_id({"llama-3-8b", 1, "tenant-a"}));
  CHECK(namespace_id({"ab", 1, "c"}) != namespace_id({"a", 1, "bc"}));
}

TEST_CASE("keys: validation names what is wrong") {
  CHECK(check_namespace({"", 1, ""}).find("model name is empty") != std::string::npos);
  CHECK(check_namespace({"m", 1, std::string(257, 'x')}).find("257 bytes") != std::string::npos);
  CHECK(check_namespace({"m", 1, std::string(256, 'x')}).empty());
  CHECK(check_namespace({"m", 0, ""}).find("world_size") != std::string::npos);
  CHECK_THROWS_AS(namespace_id({"", 1, ""}), std::invalid_argument);
  CHECK(check_chunk_size(256, 16).empty());
  CHECK(check_chunk_size(250, 16).find("not a multiple of the engine block size 16") != std::string::npos);
  CHECK_FALSE(check_chunk_size(256, 0).empty());
}

TEST_CASE("parse_size accepts units and refuses nonsense clearly") {
  std::uint64_t b = 0;
  CHECK(parse_size("512MiB", b) == "");
  CHECK(b == 512ull << 20);
  CHECK(parse_size("8GiB", b) == "");
  CHECK(b == 8ull << 30);
  CHECK(parse_size("4096", b) == "");
  CHECK(b == 4096);
  CHECK(parse_size("2g", b) == "");
  CHECK(b == 2ull << 30);
  CHECK(parse_size("1GB", b) == "");
  CHECK(b == 1000000000ull);
  CHECK(parse_size("1.5k", b) == "");
  CHECK(b == 1536);
  CHECK(parse_size("", b).find("does not start with a number") != std::string::npos);
  CHECK(parse_size("lots", b).find("does not start with a number") != std::string::npos);
  CHECK(parse_size("12parsecs", b).find("unknown unit 'parsecs'") != std::string::npos);
  CHECK(parse_size("1.2.3G", b).find("malformed") != std::string::npos);
  CHECK(parse_size("99999999TiB", b).find("too large") != std::string::npos);
}

TEST_CASE("L1 pool: fixed slots, O(1) allocate and free, one slot size") {
  L1Pool pool(10 * 4096 + 100, false);
  CHECK_FALSE(pool.configured());
  CHECK_FALSE(pool.allocate());
  REQUIRE(pool.configure(4096) == "");
  CHECK(pool.num_slots() == 10);
  CHECK(pool.configure(4096) == "");
  CHECK(pool.configure(8192).find("first registration") != std::string::npos);
  std::set<std::uint32_t> got;
  for (int i = 0; i < 10; ++i) {
    auto s = pool.allocate();
    REQUIRE(s);
    got.insert(*s);
    std::memset(pool.data(*s), i, 4096);  // the memory is really there
  }
  CHECK(got.size() == 10);
  CHECK_FALSE(pool.allocate());
  CHECK(pool.used_slots() == 10);
  pool.free(3);
  CHECK(pool.free_slots() == 1);
  CHECK(pool.allocate() == std::optional<std::uint32_t>(3));
  L1Pool tiny(100, false);
  CHECK(tiny.configure(4096).find("raise --l1-size") != std::string::npos);
}

TEST_CASE("L1 pool: mapped up front; a size it cannot serve is refused naming --l1-size") {
  L1Pool pool(4 * 4096, false);
  REQUIRE(pool.map() == "");
  CHECK(pool.mapped());
  CHECK_FALSE(pool.configured());
  REQUIRE(pool.configure(4096) == "");
  CHECK(pool.num_slots() == 4);
  L1Pool none(0, false);
  CHECK(none.map().find("--l1-size is 0") != std::string::npos);
  L1Pool too_big(std::uint64_t{1} << 50, false);  // 1 PiB
  CHECK(too_big.map().find("lower --l1-size") != std::string::npos);
  CHECK_FALSE(too_big.mapped());
}

TEST_CASE("L1 pool: huge pages are tried and fall back") {
  L1Pool pool(8u << 20, true);
  REQUIRE(pool.configure(1u << 20) == "");
  CHECK(pool.num_slots() == 8);
  auto s = pool.allocate();
  REQUIRE(s);
  std::memset(pool.data(*s), 1, 1u << 20);
}

namespace {
struct StoreFixture {
  L1Pool pool{8 * 1024, false};
  StoreConfig cfg;
  KvStore store{pool, cfg};
  TimePoint now{};
  StoreFixture() { REQUIRE(pool.configure(1024) == ""); }  // 8 slots
  bool put(std::uint64_t i, std::uint32_t rank = 0) {
    std::uint32_t slot = 0;
    std::uint64_t gen = 0;
    if (store.reserve({1, h(i), rank}, now, slot, gen) != KvStore::Reserve::reserved) return false;
    store.commit({1, h(i), rank}, gen, now);
    return true;
  }
  bool has(std::uint64_t i, std::uint32_t rank = 0) { return store.find({1, h(i), rank}) != nullptr; }
};
}  // namespace

TEST_CASE("index: lookup matches the longest prefix present for every rank") {
  StoreFixture f;
  for (std::uint64_t i = 0; i < 3; ++i) {
    REQUIRE(f.put(i, 0));
    REQUIRE(f.put(i, 1));
  }
  REQUIRE(f.put(3, 0));  // chunk 3 only on rank 0
  std::vector<ChunkHash> q{h(0), h(1), h(2), h(3), h(4)};
  CHECK(f.store.lookup(1, 1, q, f.now, std::nullopt) == 4);
  CHECK(f.store.lookup(1, 2, q, f.now, std::nullopt) == 3);
  CHECK(f.store.lookup(2, 1, q, f.now, std::nullopt) == 0);  // other namespace
  std::vector<ChunkHash> gap{h(0), h(9), h(2)};
  CHECK(f.store.lookup(1, 2, gap, f.now, std::nullopt) == 1);
  // Locking: one lock per (chunk, rank) matched, none after the first miss.
  CHECK(f.store.lookup(1, 2, q, f.now, Holder{42}) == 3);
  CHECK(f.store.read_locks() == 6);
  CHECK(f.store.find({1, h(3), 0})->read_locks == 0);
  CHECK(f.store.stats().hits == 4 + 3 + 0 + 1 + 3);
}

TEST_CASE("index: STORE skips present and in-flight chunks") {
  StoreFixture f;
  std::uint32_t slot = 0;
  std::uint64_t gen = 0;
  REQUIRE(f.store.reserve({1, h(1), 0}, f.now, slot, gen) == KvStore::Reserve::reserved);
  CHECK(f.store.write_locks() == 1);
  std::uint32_t s2 = 0;
  std::uint64_t g2 = 0;
  CHECK(f.store.reserve({1, h(1), 0}, f.now, s2, g2) == KvStore::Reserve::locked);
  CHECK_FALSE(f.has(1));  // not readable while being written
  f.store.commit({1, h(1), 0}, gen, f.now);
  CHECK(f.has(1));
  CHECK(f.store.write_locks() == 0);
  CHECK(f.store.reserve({1, h(1), 0}, f.now, s2, g2) == KvStore::Reserve::present);
  // Abort frees the slot.
  REQUIRE(f.store.reserve({1, h(2), 0}, f.now, slot, gen) == KvStore::Reserve::reserved);
  CHECK(f.pool.used_slots() == 2);
  f.store.abort({1, h(2), 0}, gen);
  CHECK(f.pool.used_slots() == 1);
  CHECK(f.store.entries() == 1);
}

TEST_CASE("LRU: locked entries survive pressure, the least recent go first") {
  StoreFixture f;
  for (std::uint64_t i = 0; i < 8; ++i) REQUIRE(f.put(i));
  std::vector<ChunkHash> locked{h(0), h(1)};
  REQUIRE(f.store.lookup(1, 1, locked, f.now, Holder{7}) == 2);  // lock the two oldest
  std::vector<ChunkHash> read{h(2)};
  REQUIRE(f.store.lookup(1, 1, read, f.now, std::nullopt) == 1);  // a read refreshes chunk 2
  // Full: the next store evicts the least recent unlocked entry (3).
  REQUIRE(f.put(100));
  CHECK(f.store.stats().evictions == 1);
  CHECK_FALSE(f.has(3));
  CHECK(f.has(0));
  CHECK(f.has(1));
  CHECK(f.has(2));
  // Store more than fits: the locked ones always remain.
  for (std::uint64_t i = 200; i < 220; ++i) f.put(i);
  CHECK(f.has(0));
  CHECK(f.has(1));
  CHECK(f.store.stats().evictions >= 6);
  // With everything locked, a store has no room and says so (no eviction of locked).
  std::vector<ChunkHash> all;
  for (std::uint64_t i = 200; i < 220; ++i)
    if (f.has(i)) all.push_back(h(i));
  for (const auto& x : all) f.store.lock({1, x, 0}, 7, f.now);
  std::uint32_t slot = 0;
  std::uint64_t gen = 0;
  CHECK(f.store.reserve({1, h(999), 0}, f.now, slot, gen) == KvStore::Reserve::no_room);
  CHECK(f.store.entries() == 8);
}

TEST_CASE("watermarks: tick evicts down to the low watermark") {
  L1Pool pool(100 * 64, false);
  REQUIRE(pool.configure(64) == "");
  StoreConfig cfg;
  cfg.high_watermark = 0.9;
  cfg.low_watermark = 0.5;
  KvStore store(pool, cfg);
  TimePoint now{};
  for (std::uint64_t i = 0; i < 95; ++i) {
    std::uint32_t s = 0;
    std::uint64_t g = 0;
    REQUIRE(store.reserve({1, h(i), 0}, now, s, g) == KvStore::Reserve::reserved);
    store.commit({1, h(i), 0}, g, now);
  }
  store.lock({1, h(0), 0}, 3, now);
  store.tick(now);
  CHECK(pool.used_slots() == 50);
  CHECK(store.stats().evictions == 45);
  CHECK(store.find({1, h(0), 0}) != nullptr);   // locked, oldest, kept
  CHECK(store.find({1, h(1), 0}) == nullptr);   // oldest unlocked, gone
  CHECK(store.find({1, h(94), 0}) != nullptr);  // newest kept
}

TEST_CASE("locks: release by holder only, pinned entries, and expiry with fake time") {
  StoreFixture f;
  REQUIRE(f.put(1));
  REQUIRE(f.put(2));
  const ChunkKey k1{1, h(1), 0}, k2{1, h(2), 0};
  f.store.lock(k1, 10, f.now);
  f.store.lock(k1, 11, f.now);
  CHECK(f.store.find(k1)->read_locks == 2);
  CHECK(f.store.pinned_entries() == 1);
  CHECK(f.store.release_one(k1, 11));
  CHECK_FALSE(f.store.release_one(k1, 99));  // never another holder's lock
  CHECK(f.store.read_locks() == 1);
  CHECK(f.store.release_one(k1, 10));
  CHECK(f.store.read_locks() == 0);
  CHECK(f.store.pinned_entries() == 0);
  // release_all drops only that holder's locks.
  f.store.lock(k2, 10, f.now);
  f.store.lock(k2, 10, f.now);
  f.store.lock(k2, 12, f.now);
  f.store.release_all(k2, 10);
  CHECK(f.store.find(k2)->read_locks == 1);
  CHECK(f.store.pinned_entries() == 1);
  // Expiry: nothing before the TTL, everything after.
  f.now += 299s;
  f.store.tick(f.now);
  CHECK(f.store.read_locks() == 1);
  f.now += 2s;
  f.store.tick(f.now);
  CHECK(f.store.read_locks() == 0);
  CHECK(f.store.stats().expired_read_locks == 1);
  CHECK(f.store.pinned_entries() == 0);
  // Relocking pushes the expiry out.
  f.store.lock(k1, 10, f.now);
  f.now += 200s;
  f.store.lock(k1, 10, f.now);
  f.now += 200s;
  f.store.tick(f.now);
  CHECK(f.store.read_locks() == 2);
  // A write lock whose copy never completes expires and frees its slot;
  // the late commit is ignored.
  std::uint32_t slot = 0;
  std::uint64_t gen = 0;
  REQUIRE(f.store.reserve({1, h(5), 0}, f.now, slot, gen) == KvStore::Reserve::reserved);
  const auto used = f.pool.used_slots();
  f.now += 601s;
  f.store.tick(f.now);
  CHECK(f.pool.used_slots() == used - 1);
  CHECK(f.store.stats().expired_write_locks == 1);
  f.store.commit({1, h(5), 0}, gen, f.now);
  CHECK_FALSE(f.has(5));
}

TEST_CASE("clear drops unlocked entries only") {
  StoreFixture f;
  for (std::uint64_t i = 0; i < 4; ++i) REQUIRE(f.put(i));
  f.store.lock({1, h(2), 0}, 1, f.now);
  CHECK(f.store.clear() == 3);
  CHECK(f.store.entries() == 1);
  CHECK(f.has(2));
  CHECK(f.pool.used_slots() == 1);
}
