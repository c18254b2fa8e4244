// Chunk keys, the L1 slot pool and the index (LRU, watermarks, locks) with
// fake time.
#include <doctest/doctest.h>

#include <numeric>
#include <cstring>
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
  CHECK(check_namespace({"", 1, ""}).message().find("model name is empty") != std::string::npos);
  CHECK(check_namespace({"m", 1, std::string(257, 'x')}).message().find("257 bytes") != std::string::npos);
  CHECK_FALSE(check_namespace({"m", 1, std::string(256, 'x')}));
  CHECK(check_namespace({"m", 0, ""}) == errc::bad_request);
  CHECK(check_namespace({"m", 0, ""}).message().find("world_size") != std::string::npos);
  CHECK_THROWS_AS(namespace_id({"", 1, ""}), std::invalid_argument);
  CHECK_FALSE(check_chunk_size(256, 16));
  CHECK(check_chunk_size(250, 16).message().find("not a multiple of the engine block size 16") != std::string::npos);
  CHECK(check_chunk_size(256, 0) == errc::bad_request);
}

TEST_CASE("parse_size accepts units and refuses nonsense clearly") {
  CHECK(parse_size("512MiB").value() == 512ull << 20);
  CHECK(parse_size("8GiB").value() == 8ull << 30);
  CHECK(parse_size("4096").value() == 4096);
  CHECK(parse_size("2g").value() == 2ull << 30);
  CHECK(parse_size("1GB").value() == 1000000000ull);
  CHECK(parse_size("1.5k").value() == 1536);
  auto refusal = [](std::string_view text) {
    auto r = parse_size(text);
    CHECK(r.error() == errc::bad_request);
    return r.error().message();
  };
  CHECK(refusal("").find("does not start with a number") != std::string::npos);
  CHECK(refusal("lots").find("does not start with a number") != std::string::npos);
  CHECK(refusal("12parsecs").find("unknown unit 'parsecs'") != std::string::npos);
  CHECK(refusal("1.2.3G").find("malformed") != std::string::npos);
  CHECK(refusal("99999999TiB").find("too large") != std::string::npos);
}

TEST_CASE("L1 pool: slabs of one layout, O(1) allocate and free, a slot fits or is refused naming the flag") {
  L1Pool pool(10 * 4096 + 100, false, 4096);
  LayoutClass cls = 0;
  REQUIRE_FALSE(pool.class_for(4096, cls));
  CHECK(pool.num_slabs() == 10);
  LayoutClass again = 9;
  CHECK_FALSE(pool.class_for(4096, again));
  CHECK(again == cls);
  CHECK(pool.check_layout(8192).message().find("raise --l1-slab-size") != std::string::npos);
  CHECK(pool.check_layout(0).message().find("0 bytes") != std::string::npos);
  std::set<Slot> got;
  for (int i = 0; i < 10; ++i) {
    auto s = pool.allocate(cls);
    REQUIRE(s);
    got.insert(*s);
    std::memset(pool.data(*s), i, 4096);  // the memory is really there
  }
  CHECK(got.size() == 10);
  CHECK_FALSE(pool.allocate(cls));
  CHECK(pool.class_used(cls) == 10);
  CHECK(pool.free_slabs() == 0);
  pool.free(3 * 4096);
  CHECK(pool.free_slabs() == 1);  // a slab of one slot is empty again
  CHECK(pool.allocate(cls) == std::optional<Slot>(3 * 4096));
  L1Pool tiny(100, false);
  CHECK(tiny.class_for(4096, cls).message().find("raise --l1-size") != std::string::npos);
}

TEST_CASE("L1 pool: layouts share the slabs; an emptied slab goes back for any layout; waste is the slab tails") {
  L1Pool pool(4 * 10000, false, 10000);
  LayoutClass a = 0, b = 0;
  REQUIRE_FALSE(pool.class_for(3000, a));  // 3 per slab, 1000 bytes wasted in each
  REQUIRE_FALSE(pool.class_for(5000, b));  // 2 per slab, none wasted
  CHECK(a != b);
  CHECK(pool.slots_per_slab(a) == 3);
  std::vector<Slot> as;
  for (int i = 0; i < 6; ++i) as.push_back(*pool.allocate(a));  // two slabs
  CHECK(pool.class_slabs(a) == 2);
  CHECK(pool.bytes_wasted() == 2000);
  auto b1 = pool.allocate(b), b2 = pool.allocate(b), b3 = pool.allocate(b);
  REQUIRE(b3);
  CHECK(pool.class_slabs(b) == 2);
  CHECK(pool.free_slabs() == 0);
  CHECK(pool.active_classes() == 2);
  CHECK_FALSE(pool.allocate(a));
  for (Slot s : as) {
    CHECK(pool.class_of(s) == a);
    std::memset(pool.data(s), 0xa, 3000);
  }
  std::memset(pool.data(*b1), 0xb, 5000);
  // Slots of both layouts never overlap.
  std::set<std::pair<Slot, Slot>> ranges;
  for (Slot s : as) ranges.insert({s, s + 3000});
  for (auto s : {b1, b2, b3}) ranges.insert({*s, *s + 5000});
  Slot end = 0;
  for (auto [from, to] : ranges) {
    CHECK(from >= end);
    end = to;
  }
  // Freeing one slab's three chunks of A gives the slab to B.
  const std::uint32_t slab = pool.slab_of(as[0]);
  for (Slot s : as)
    if (pool.slab_of(s) == slab) pool.free(s);
  CHECK(pool.class_slabs(a) == 1);
  CHECK(pool.free_slabs() == 1);
  CHECK(pool.allocate(b));  // the room left in B's second slab
  CHECK(pool.class_slabs(b) == 2);
  CHECK(pool.allocate(b));
  CHECK(pool.class_slabs(b) == 3);
  CHECK(pool.bytes_used() == 3 * 3000 + 5 * 5000);
}

TEST_CASE("L1 pool: mapped up front; a size it cannot serve is refused naming --l1-size") {
  L1Pool pool(4 * 4096, false, 4096);
  REQUIRE_FALSE(pool.map());
  CHECK(pool.mapped());
  CHECK(pool.num_slabs() == 4);
  CHECK(pool.active_classes() == 0);
  L1Pool none(0, false);
  CHECK(none.map().message().find("--l1-size is 0") != std::string::npos);
  L1Pool too_big(std::uint64_t{1} << 50, false);  // 1 PiB
  CHECK(too_big.map().message().find("lower --l1-size") != std::string::npos);
  CHECK_FALSE(too_big.mapped());
  L1Pool slab_too_big(4096, false, 8192);
  CHECK(slab_too_big.map().message().find("lower --l1-slab-size") != std::string::npos);
}

TEST_CASE("L1 pool: the default slab is an eighth of L1, in whole huge pages, at most 1 GiB") {
  CHECK(default_slab_bytes(std::uint64_t{8} << 30) == std::uint64_t{1} << 30);
  CHECK(default_slab_bytes(std::uint64_t{64} << 30) == std::uint64_t{1} << 30);
  CHECK(default_slab_bytes(std::uint64_t{100} << 20) == std::uint64_t{12} << 20);
  CHECK(default_slab_bytes(64 * 1024) == 8 * 1024);
  CHECK(default_slab_bytes(8 * 1024) == 8 * 1024);  // too small to cut: one slab
}

TEST_CASE("L1 pool: huge pages are tried and fall back") {
  L1Pool pool(8u << 20, true, 2u << 20);
  LayoutClass cls = 0;
  REQUIRE_FALSE(pool.class_for(1u << 20, cls));
  auto s = pool.allocate(cls);
  REQUIRE(s);
  std::memset(pool.data(*s), 1, 1u << 20);
  CHECK(pool.num_slabs() == 4);
}

namespace {
struct StoreFixture {
  L1Pool pool{8 * 1024, false};  // one slab of 8 slots
  StoreConfig cfg;
  KvStore store{pool, cfg};
  TimePoint now{};
  Writer w{1024};
  std::uint64_t used() const { return pool.bytes_used() / 1024; }
  bool put(std::uint64_t i, std::uint32_t rank = 0) {
    Slot slot = 0;
    std::uint64_t gen = 0;
    if (store.reserve({1, h(i), rank}, w, now, slot, gen) != KvStore::Reserve::reserved) return false;
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
  Slot slot = 0;
  std::uint64_t gen = 0;
  REQUIRE(f.store.reserve({1, h(1), 0}, f.w, f.now, slot, gen) == KvStore::Reserve::reserved);
  CHECK(f.store.write_locks() == 1);
  Slot s2 = 0;
  std::uint64_t g2 = 0;
  CHECK(f.store.reserve({1, h(1), 0}, f.w, f.now, s2, g2) == KvStore::Reserve::locked);
  CHECK_FALSE(f.has(1));  // not readable while being written
  f.store.commit({1, h(1), 0}, gen, f.now);
  CHECK(f.has(1));
  CHECK(f.store.write_locks() == 0);
  CHECK(f.store.reserve({1, h(1), 0}, f.w, f.now, s2, g2) == KvStore::Reserve::present);
  // Abort frees the slot.
  REQUIRE(f.store.reserve({1, h(2), 0}, f.w, f.now, slot, gen) == KvStore::Reserve::reserved);
  CHECK(f.used() == 2);
  f.store.abort({1, h(2), 0}, gen);
  CHECK(f.used() == 1);
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
  Slot slot = 0;
  std::uint64_t gen = 0;
  CHECK(f.store.reserve({1, h(999), 0}, f.w, f.now, slot, gen) == KvStore::Reserve::no_room);
  CHECK(f.store.entries() == 8);
}

TEST_CASE("watermarks: tick evicts down to the low watermark") {
  L1Pool pool(100 * 64, false, 100 * 64);  // one slab: no free slab, so the watermarks apply
  const Writer w{64};
  StoreConfig cfg;
  cfg.high_watermark = 0.9;
  cfg.low_watermark = 0.5;
  KvStore store(pool, cfg);
  TimePoint now{};
  for (std::uint64_t i = 0; i < 95; ++i) {
    Slot s = 0;
    std::uint64_t g = 0;
    REQUIRE(store.reserve({1, h(i), 0}, w, now, s, g) == KvStore::Reserve::reserved);
    store.commit({1, h(i), 0}, g, now);
  }
  store.lock({1, h(0), 0}, 3, now);
  store.tick(now);
  CHECK(pool.class_used(0) == 50);
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
  Slot slot = 0;
  std::uint64_t gen = 0;
  REQUIRE(f.store.reserve({1, h(5), 0}, f.w, f.now, slot, gen) == KvStore::Reserve::reserved);
  const auto used = f.used();
  f.now += 601s;
  f.store.tick(f.now);
  CHECK(f.used() == used - 1);
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
  CHECK(f.used() == 1);
}

TEST_CASE("layouts: a second layout takes slabs up to its share, locked slabs stay, then each evicts its own") {
  L1Pool pool(8 * 4096, false, 4096);  // 8 slabs
  KvStore store(pool, {});
  TimePoint now{};
  const Writer a{1024}, b{2048};  // 4 and 2 chunks per slab
  auto put = [&](const Writer& w, std::uint64_t ns, std::uint64_t i) {
    Slot slot = 0;
    std::uint64_t gen = 0;
    if (store.reserve({ns, h(i), 0}, w, now, slot, gen) != KvStore::Reserve::reserved) return false;
    std::memset(pool.data(slot), static_cast<int>(ns), w.slot_bytes);
    store.commit({ns, h(i), 0}, gen, now);
    return true;
  };
  auto has = [&](std::uint64_t ns, std::uint64_t i) { return store.find({ns, h(i), 0}) != nullptr; };
  for (std::uint64_t i = 0; i < 28; ++i) REQUIRE(put(a, 1, i));
  // A slab is still free: no layout is short of room, the watermarks wait.
  store.tick(now);
  CHECK(store.stats().evictions == 0);
  for (std::uint64_t i = 28; i < 32; ++i) REQUIRE(put(a, 1, i));
  CHECK(pool.class_slabs(0) == 8);
  store.lock({1, h(0), 0}, 7, now);  // pins the first slab
  // B, below its share (4 of 8), takes A's first slab whose chunks are all
  // evictable: the second one, chunks 4..7.
  REQUIRE(put(b, 2, 0));
  CHECK(store.stats().slabs_moved == 1);
  CHECK(store.stats().evictions == 4);
  CHECK(has(1, 0));
  for (std::uint64_t i = 4; i < 8; ++i) CHECK_FALSE(has(1, i));
  for (std::uint64_t i = 1; i < 8; ++i) REQUIRE(put(b, 2, i));
  CHECK(pool.class_slabs(0) == 4);
  CHECK(pool.class_slabs(1) == 4);
  CHECK(store.stats().slabs_moved == 4);
  // At its share, B evicts its own least recent chunk; A keeps its slabs.
  REQUIRE(put(b, 2, 8));
  CHECK_FALSE(has(2, 0));
  CHECK(pool.class_slabs(0) == 4);
  REQUIRE(put(a, 1, 100));
  CHECK(pool.class_slabs(1) == 4);
  CHECK(has(1, 0));  // locked: never evicted
  // Every chunk still holds what its layout wrote.
  for (std::uint64_t i = 1; i <= 8; ++i) {
    const auto* e = store.find({2, h(i), 0});
    REQUIRE(e);
    CHECK(store.slot_bytes(*e) == 2048);
    for (std::size_t k = 0; k < 2048; ++k) REQUIRE(pool.data(e->slot)[k] == std::byte{2});
  }
  CHECK(store.pinned_bytes() == 1024);
}

TEST_CASE("layouts: a key present with another chunk size is not overwritten, and says so") {
  L1Pool pool(8 * 4096, false, 4096);
  KvStore store(pool, {});
  Slot slot = 0;
  std::uint64_t gen = 0;
  REQUIRE(store.reserve({1, h(1), 0}, Writer{1024}, {}, slot, gen) == KvStore::Reserve::reserved);
  store.commit({1, h(1), 0}, gen, {});
  CHECK(store.reserve({1, h(1), 0}, Writer{2048}, {}, slot, gen) == KvStore::Reserve::other_layout);
  CHECK(store.reserve({1, h(1), 0}, Writer{1024}, {}, slot, gen) == KvStore::Reserve::present);
}
