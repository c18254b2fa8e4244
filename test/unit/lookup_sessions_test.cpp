// LookupSessions on its own: lookups, their read locks and who releases
// them, prefetch jobs, TTLs with fake time.
#include <doctest/doctest.h>

#include "collect_sink.hpp"
#include "kvlink/server/lookup_sessions.hpp"
#include "kvlink/store/keys.hpp"
#include "request_frame.hpp"

using namespace kvlink;
using namespace kvlink::wire;
using namespace std::chrono_literals;
using test::RequestFrame;

namespace {

constexpr std::uint64_t ns = 42;

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
  server::SessionState scheduler;
  std::shared_ptr<test::CollectSink> sink = std::make_shared<test::CollectSink>();
  TimePoint now{};
  std::vector<ChunkHash> hashes;

  Fixture() {
    REQUIRE_FALSE(pool.map());
    scheduler.hello_done = true;
    scheduler.instance_id = 2;
    std::vector<store::Token> t(4 * 256);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i);
    hashes = store::chunk_hashes(t, 256);
    // The first three chunks are in L1.
    for (std::size_t i = 0; i < 3; ++i) {
      store::Slot slot = 0;
      std::uint64_t gen = 0;
      const store::ChunkKey key{ns, hashes[i], 0};
      REQUIRE(store.reserve(key, store::Writer{4096, 1, 0}, now, slot, gen) == store::KvStore::Reserve::reserved);
      store.commit(key, gen, now);
    }
  }
  template <class Reply>
  Reply only_reply() {
    return sink->only_reply<Reply>();
  }
  std::uint32_t sync_lookup(std::uint64_t session_id, std::uint32_t world_size = 1) {
    lookups.lookup(scheduler, RequestFrame(SyncLookupRequest{ns, world_size, session_id, hashes}), *sink, now, true);
    return only_reply<LookupResult>().matched_chunks;
  }
};

}  // namespace

TEST_CASE("lookup sessions: SYNC_LOOKUP locks the matched prefix; END_SESSION releases it") {
  Fixture fx;
  CHECK(fx.sync_lookup(7) == 3);
  CHECK(fx.store.read_locks() == 3);
  CHECK(fx.lookups.sessions() == 1);
  CHECK(fx.totals.lookup_requested_tokens == 4 * fx.config.chunk_size);
  CHECK(fx.totals.lookup_hit_tokens == 3 * fx.config.chunk_size);
  fx.lookups.end_session(fx.scheduler, RequestFrame(EndSessionRequest{ns, 7, fx.hashes}), *fx.sink, fx.now);
  (void)fx.only_reply<Empty>();
  CHECK(fx.lookups.sessions() == 0);
  CHECK(fx.store.read_locks() == 0);
}

TEST_CASE("lookup sessions: a RETRIEVE's end releases its session's locks on that rank") {
  Fixture fx;
  CHECK(fx.sync_lookup(7) == 3);
  fx.lookups.release_retrieved(7, ns, 0, std::span(fx.hashes).first(2));
  CHECK(fx.store.read_locks() == 1);
  fx.lookups.release_retrieved(0, ns, 0, fx.hashes);  // session 0: none
  CHECK(fx.store.read_locks() == 1);
}

TEST_CASE("lookup sessions: the session TTL ends a forgotten session and releases its locks (fake time)") {
  Fixture fx;
  fx.config.session_ttl = 10s;
  CHECK(fx.sync_lookup(7) == 3);
  fx.lookups.tick(fx.now + 9s);
  CHECK(fx.lookups.sessions() == 1);
  fx.lookups.tick(fx.now + 10s);
  CHECK(fx.lookups.sessions() == 0);
  CHECK(fx.store.read_locks() == 0);
  CHECK_FALSE(fx.lookups.releasing());
}

TEST_CASE("lookup sessions: a LOOKUP job is reported once; an unpolled one expires (fake time)") {
  Fixture fx;
  fx.lookups.lookup(fx.scheduler, RequestFrame(LookupRequest{ns, 1, 7, fx.hashes}), *fx.sink, fx.now, false);
  const std::uint64_t job = fx.only_reply<LookupAccepted>().job_id;
  CHECK(fx.lookups.jobs() == 1);
  fx.lookups.query(RequestFrame(QueryPrefetchStatusRequest{job}), *fx.sink);
  const auto st = fx.only_reply<PrefetchStatus>();
  CHECK(st.state == PrefetchState::done);
  CHECK(st.matched_chunks == 3);
  fx.lookups.query(RequestFrame(QueryPrefetchStatusRequest{job}), *fx.sink);
  auto f = fx.sink->frames();
  REQUIRE(f.size() == 1);
  CHECK(f[0].first.is_error());
  CHECK(fx.counters.ops[static_cast<std::uint8_t>(Opcode::query_prefetch_status)].errors == 1);

  fx.lookups.lookup(fx.scheduler, RequestFrame(LookupRequest{ns, 1, 8, fx.hashes}), *fx.sink, fx.now, false);
  fx.sink->frames();
  fx.lookups.tick(fx.now + fx.config.job_ttl - 1s);
  CHECK(fx.lookups.jobs() == 1);
  fx.lookups.tick(fx.now + fx.config.job_ttl);
  CHECK(fx.lookups.jobs() == 0);
}

TEST_CASE("lookup sessions: a departed scheduler's sessions, locks and jobs go; another's stay") {
  Fixture fx;
  CHECK(fx.sync_lookup(7) == 3);
  server::SessionState other;
  other.hello_done = true;
  other.instance_id = 3;
  fx.lookups.lookup(other, RequestFrame(LookupRequest{ns, 1, 7, fx.hashes}), *fx.sink, fx.now, false);
  fx.sink->frames();
  CHECK(fx.store.read_locks() == 6);
  fx.lookups.release_instance(2);
  CHECK(fx.lookups.sessions() == 1);
  CHECK(fx.lookups.jobs() == 1);
  CHECK(fx.store.read_locks() == 3);
  fx.lookups.release_instance(3);
  CHECK(fx.store.read_locks() == 0);
  CHECK(fx.lookups.jobs() == 0);
}

TEST_CASE("lookup sessions: bad world sizes and ranges are refused") {
  Fixture fx;
  fx.lookups.lookup(fx.scheduler, RequestFrame(SyncLookupRequest{ns, 0, 7, fx.hashes}), *fx.sink, fx.now, true);
  const ErrorReply e = fx.sink->only_error();
  CHECK(e.code == to_wire(errc::bad_request));
  CHECK(e.message.find("world_size 0 is out of range") != std::string::npos);
  CHECK(fx.lookups.sessions() == 0);
}
