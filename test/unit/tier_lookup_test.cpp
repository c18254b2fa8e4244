// Lookups with a tier below L1, on a fake tier whose reads complete when
// the test says: fetches into L1 (byte-exact, once per key however many
// lookups want it), SYNC_LOOKUP's deferred reply, LOOKUP's pending job,
// the wait's deadline, a degraded or failing tier, a fill that comes too
// late, and L1's write-back of its evictions.
#include <doctest/doctest.h>

#include <cstring>
#include <unordered_map>

#include "collect_sink.hpp"
#include "kvlink/server/lookup_sessions.hpp"
#include "kvlink/server/tier_chain.hpp"
#include "kvlink/server/tier_fetches.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/store/lower_tier.hpp"
#include "request_frame.hpp"

using namespace kvlink;
using namespace kvlink::wire;
using namespace std::chrono_literals;
using test::RequestFrame;

namespace {

constexpr std::uint64_t ns = 42;
constexpr std::uint64_t chunk_bytes = 4096;

std::vector<std::byte> pattern(std::uint8_t seed) {
  std::vector<std::byte> b(chunk_bytes);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>((i * 7 + seed) & 0xff);
  return b;
}

// Reads wait in `reads` until complete() (or never).
struct FakeTier final : store::LowerTier {
  std::unordered_map<store::ChunkKey, std::vector<std::byte>, store::ChunkKeyHasher> held;
  std::vector<std::pair<store::ChunkKey, ReadDone>> reads;
  bool healthy = true;
  int puts = 0;

  bool accepting() const override { return healthy; }
  std::optional<std::uint64_t> holds(const store::ChunkKey& key) const {
    auto it = held.find(key);
    if (it == held.end()) return std::nullopt;
    return it->second.size();
  }
  // Answers at once (like the disk), or, with `defer_finds`, when the test
  // calls answer_finds() (like a remote tier).
  bool defer_finds = false;
  std::vector<std::pair<std::vector<store::ChunkKey>, Found>> finds;
  void find(std::span<const store::ChunkKey> keys, Found done) override {
    finds.emplace_back(std::vector<store::ChunkKey>(keys.begin(), keys.end()), std::move(done));
    if (!defer_finds) answer_finds();
  }
  void answer_finds() {
    auto pending = std::move(finds);
    finds.clear();
    for (auto& [keys, done] : pending) {
      std::vector<std::optional<std::uint64_t>> sizes;
      for (const auto& k : keys) sizes.push_back(holds(k));
      done(std::move(sizes));
    }
  }
  bool put(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint) override {
    ++puts;
    held[key].assign(bytes.begin(), bytes.end());
    return true;
  }
  Error get(const store::ChunkKey& key, std::uint64_t bytes, TimePoint, ReadDone done) override {
    if (holds(key) != bytes) return Error(errc::not_found, "not on the fake tier with that size");
    reads.emplace_back(key, std::move(done));
    return {};
  }
  void tick(TimePoint) override {}
  store::LowerTierStats stats() const override { return {}; }
  // Completes every read so far, with `error` or the held bytes.
  void complete(const Error& error = {}) {
    auto pending = std::move(reads);
    reads.clear();
    for (auto& [key, done] : pending) {
      if (error) done(error, {});
      else done({}, held[key]);
    }
  }
};

struct Fixture {
  server::ServerConfig config;
  server::ServerCounters counters;
  server::Reporter reporter{counters};
  server::TrafficTotals totals;
  store::L1Pool pool{1 << 20, false, 1 << 16};
  store::KvStore store{pool, {}};
  server::InFlight in_flight;
  server::TierFetches fetches{store};
  server::LookupSessions lookups{config, store, reporter, totals, in_flight, fetches};
  FakeTier tier;
  server::SessionState scheduler;
  std::shared_ptr<test::CollectSink> sink = std::make_shared<test::CollectSink>();
  TimePoint now{};
  std::vector<ChunkHash> hashes;

  Fixture() {
    REQUIRE_FALSE(pool.map());
    fetches.set_tier(&tier);
    scheduler.hello_done = true;
    scheduler.instance_id = 2;
    std::vector<store::Token> t(5 * 256);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i);
    hashes = store::chunk_hashes(t, 256);
    // Chunks 0-1 in L1, 2-3 on the tier only, 4 nowhere.
    for (std::size_t i = 0; i < 2; ++i) {
      store::Slot slot = 0;
      std::uint64_t gen = 0;
      const store::ChunkKey k{ns, hashes[i], 0};
      REQUIRE(store.reserve(k, store::Writer{chunk_bytes, 1, 0}, now, slot, gen) == store::KvStore::Reserve::reserved);
      store.commit(k, gen, now);
    }
    for (std::size_t i = 2; i < 4; ++i) tier.held[key(i)] = pattern(static_cast<std::uint8_t>(i));
  }
  store::ChunkKey key(std::size_t i) const { return {ns, hashes[i], 0}; }
  void sync_lookup(std::uint64_t session_id, test::CollectSink& out) {
    lookups.lookup(scheduler, RequestFrame(SyncLookupRequest{ns, 1, session_id, hashes}), out, now, true);
  }
  // The chunk's bytes in L1, or empty when it is not there.
  std::vector<std::byte> in_l1(std::size_t i) const {
    const auto* e = store.find(key(i));
    if (!e) return {};
    const std::byte* p = pool.data(e->slot);
    return {p, p + chunk_bytes};
  }
};

}  // namespace

TEST_CASE("tier lookup: SYNC_LOOKUP past L1 waits for the tier's chunks, then answers with them locked in L1") {
  Fixture fx;
  fx.sync_lookup(7, *fx.sink);
  CHECK(fx.sink->frames().empty());  // waiting: no answer yet
  CHECK(fx.tier.reads.size() == 2);
  CHECK(fx.lookups.tier_waits() == 1);
  CHECK(fx.in_flight.total() == 1);  // a drain waits for it
  CHECK(fx.store.write_locks() == 2);  // the slots being filled serve nobody yet
  fx.tier.complete();
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 4);
  CHECK(fx.in_l1(2) == pattern(2));
  CHECK(fx.in_l1(3) == pattern(3));
  CHECK(fx.store.read_locks() == 4);  // the whole match, for this session
  CHECK(fx.lookups.tier_hits() == 2);
  CHECK(fx.lookups.tier_waits() == 0);
  CHECK(fx.in_flight.total() == 0);
  CHECK(fx.store.stats().hits == 4);
  CHECK(fx.store.stats().misses == 1);
  // Its END_SESSION releases them all, as for chunks found in L1.
  fx.lookups.end_session(fx.scheduler, RequestFrame(EndSessionRequest{ns, 7, fx.hashes}), *fx.sink, fx.now);
  (void)fx.sink->only_reply<Empty>();
  CHECK(fx.store.read_locks() == 0);
}

TEST_CASE("tier lookup: LOOKUP's job stays pending until the tier's chunks landed") {
  Fixture fx;
  fx.lookups.lookup(fx.scheduler, RequestFrame(LookupRequest{ns, 1, 7, fx.hashes}), *fx.sink, fx.now, false);
  const auto job = fx.sink->only_reply<LookupAccepted>().job_id;
  fx.lookups.query(RequestFrame(QueryPrefetchStatusRequest{job}), *fx.sink);
  CHECK(fx.sink->only_reply<PrefetchStatus>().state == PrefetchState::pending);
  fx.tier.complete();
  fx.lookups.query(RequestFrame(QueryPrefetchStatusRequest{job}), *fx.sink);
  const auto st = fx.sink->only_reply<PrefetchStatus>();
  CHECK(st.state == PrefetchState::done);
  CHECK(st.matched_chunks == 4);
  CHECK(fx.in_l1(3) == pattern(3));
}

TEST_CASE("tier lookup: concurrent lookups of the same chunks share one fetch per key") {
  Fixture fx;
  auto other = std::make_shared<test::CollectSink>();
  fx.sync_lookup(7, *fx.sink);
  fx.sync_lookup(8, *other);
  CHECK(fx.tier.reads.size() == 2);  // not 4
  CHECK(fx.fetches.stats().joined == 2);
  fx.tier.complete();
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 4);
  CHECK(other->only_reply<LookupResult>().matched_chunks == 4);
  CHECK(fx.store.read_locks() == 8);
}

TEST_CASE("tier lookup: a tier too slow for l2_lookup_wait -> the answer is L1's; the late bytes still land") {
  Fixture fx;
  fx.sync_lookup(7, *fx.sink);
  fx.now += fx.config.l2_lookup_wait - 1ms;
  fx.lookups.tick(fx.now);
  CHECK(fx.sink->frames().empty());
  fx.now += 1ms;
  fx.lookups.tick(fx.now);
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 2);
  CHECK(fx.in_flight.total() == 0);
  CHECK(fx.store.read_locks() == 2);
  fx.tier.complete();  // no second answer; the chunks are in L1 for the next lookup
  CHECK(fx.sink->frames().empty());
  CHECK(fx.in_l1(2) == pattern(2));
  fx.sync_lookup(9, *fx.sink);
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 4);
}

TEST_CASE("tier lookup: a degraded tier is not waited for") {
  Fixture fx;
  fx.tier.healthy = false;
  fx.sync_lookup(7, *fx.sink);
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 2);
  CHECK(fx.tier.reads.empty());
}

TEST_CASE("tier lookup: a failed read is a miss; nothing of it is served") {
  Fixture fx;
  fx.sync_lookup(7, *fx.sink);
  fx.tier.complete(Error(std::error_code(EIO, std::generic_category()), "read failed"));
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 2);
  CHECK(fx.in_l1(2).empty());
  CHECK(fx.store.write_locks() == 0);  // the reservations went
  CHECK(fx.fetches.stats().failed == 2);
}

TEST_CASE("tier lookup: bytes arriving after their L1 reservation expired are not written into L1") {
  Fixture fx;
  fx.config.l2_lookup_wait = 1s;
  fx.sync_lookup(7, *fx.sink);
  fx.now += fx.store.config().write_lock_ttl;
  fx.lookups.tick(fx.now);
  fx.store.tick(fx.now);  // the fill's reservations expire; their slots may go to other chunks
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 2);
  fx.tier.complete();
  CHECK(fx.in_l1(2).empty());
  CHECK(fx.fetches.stats().failed == 2);
}

TEST_CASE("tier lookup: a session that ended while waiting keeps no locks") {
  Fixture fx;
  fx.sync_lookup(7, *fx.sink);
  fx.lookups.release_instance(fx.scheduler.instance_id);
  fx.tier.complete();
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 0);
  CHECK(fx.store.read_locks() == 0);
  CHECK(fx.in_l1(3) == pattern(3));  // fetched all the same
}

TEST_CASE("tier write-back: L1's evictions reach the eviction hook with their bytes before the slot is reused") {
  store::L1Pool pool{4 * chunk_bytes, false, 4 * chunk_bytes};
  REQUIRE_FALSE(pool.map());
  store::KvStore st{pool, {}};
  FakeTier tier;
  st.set_eviction_hook([&](const store::ChunkKey& k, std::span<const std::byte> b) { tier.put(k, b, {}); });
  std::vector<store::Token> t(6 * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i);
  const auto hashes = store::chunk_hashes(t, 256);
  for (std::size_t i = 0; i < 6; ++i) {
    store::Slot slot = 0;
    std::uint64_t gen = 0;
    const store::ChunkKey k{ns, hashes[i], 0};
    REQUIRE(st.reserve(k, store::Writer{chunk_bytes, 1, 0}, {}, slot, gen) == store::KvStore::Reserve::reserved);
    const auto bytes = pattern(static_cast<std::uint8_t>(i));
    std::memcpy(pool.data(slot), bytes.data(), bytes.size());
    st.commit(k, gen, {});
  }
  CHECK(st.stats().evictions == 2);
  REQUIRE(tier.puts == 2);
  CHECK(tier.held.at({ns, hashes[0], 0}) == pattern(0));  // the least recent went first
  CHECK(tier.held.at({ns, hashes[1], 0}) == pattern(1));
  // CLEAR is no eviction: what it drops is not written down.
  CHECK(st.clear() == 4);
  CHECK(tier.puts == 2);
}

TEST_CASE("tier lookup: a tier that answers its find later (a remote one): the lookup waits for the find, then "
          "the fetches; its deadline covers both") {
  Fixture fx;
  fx.tier.defer_finds = true;
  fx.sync_lookup(7, *fx.sink);
  CHECK(fx.sink->frames().empty());
  CHECK(fx.tier.reads.empty());  // nothing fetched before the tier said what it has
  fx.tier.answer_finds();
  CHECK(fx.tier.reads.size() == 2);
  fx.tier.complete();
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 4);

  // A find that never answers: the lookup answers with L1's at its deadline.
  fx.sync_lookup(8, *fx.sink);
  fx.now += fx.config.l2_lookup_wait;
  fx.lookups.tick(fx.now);
  CHECK(fx.sink->only_reply<LookupResult>().matched_chunks == 4);  // 2-3 landed in L1 before
  fx.lookups.end_session(fx.scheduler, RequestFrame(EndSessionRequest{ns, 7, fx.hashes}), *fx.sink, fx.now);
  (void)fx.sink->only_reply<Empty>();
  fx.tier.answer_finds();  // late: nothing happens
  CHECK(fx.sink->frames().empty());
}

TEST_CASE("tier chain: find asks each tier for what the ones before it lack; get reads from the one that has it; "
          "evictions and stores go where each tier wants them") {
  FakeTier disk, cluster;
  cluster.defer_finds = true;  // remote: answers later
  server::TierChain chain;
  chain.add({&disk, "disk", true, false});
  chain.add({&cluster, "cluster", false, true});
  const store::ChunkKey a{1, {1, 1}, 0}, b{1, {2, 2}, 0}, c{1, {3, 3}, 0};
  disk.held[a] = pattern(1);
  cluster.held[a] = pattern(9);  // the disk's answer wins
  cluster.held[b] = pattern(2);
  std::optional<std::vector<std::optional<std::uint64_t>>> sizes;
  const std::vector<store::ChunkKey> keys{a, b, c};
  chain.find(keys, [&](auto s) { sizes = std::move(s); });
  CHECK_FALSE(sizes);
  REQUIRE(cluster.finds.size() == 1);
  CHECK(cluster.finds[0].first == std::vector<store::ChunkKey>{b, c});  // not a: the disk has it
  cluster.answer_finds();
  REQUIRE(sizes);
  CHECK((*sizes)[0] == chunk_bytes);
  CHECK((*sizes)[1] == chunk_bytes);
  CHECK_FALSE((*sizes)[2]);

  std::vector<std::byte> got_a, got_b;
  REQUIRE_FALSE(chain.get(a, chunk_bytes, {}, [&](const Error&, std::span<const std::byte> d) { got_a.assign(d.begin(), d.end()); }));
  REQUIRE_FALSE(chain.get(b, chunk_bytes, {}, [&](const Error&, std::span<const std::byte> d) { got_b.assign(d.begin(), d.end()); }));
  CHECK(chain.get(c, chunk_bytes, {}, [](const Error&, std::span<const std::byte>) {}) == errc::not_found);
  CHECK(disk.reads.size() == 1);
  CHECK(cluster.reads.size() == 1);
  disk.complete();
  cluster.complete();
  CHECK(got_a == pattern(1));
  CHECK(got_b == pattern(2));

  const auto bytes = pattern(3);
  chain.evicted(c, bytes, {});
  CHECK(disk.puts == 1);
  CHECK(cluster.puts == 0);
  chain.stored(c, bytes, {});
  CHECK(disk.puts == 1);
  CHECK(cluster.puts == 1);

  cluster.healthy = false;  // a tier that takes nothing is not asked
  sizes.reset();
  chain.find(keys, [&](auto s) { sizes = std::move(s); });
  REQUIRE(sizes);
  CHECK_FALSE((*sizes)[1]);
}
