// Server limits and access control without sockets: the auth token check,
// max instances, max in flight, the per-instance L1 quota (handler and
// store), the "non-loopback needs a token" rule and endpoint defaults.
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <unistd.h>

#include "kvlink/net/auth_token.hpp"
#include "kvlink/net/endpoint.hpp"
#include "collect_sink.hpp"
#include "kvlink/server/request_handler.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/store/keys.hpp"

using namespace kvlink;
using namespace kvlink::wire;

namespace {

using Collect = kvlink::test::CollectSink;

// Completes jobs only when told.
struct DeferredEngine final : transfer::TransferEngine {
  std::vector<transfer::TransferDone> done;
  void submit(transfer::TransferJob, transfer::TransferDone d) override { done.push_back(std::move(d)); }
  void complete_all() {
    auto ds = std::move(done);
    for (auto& d : ds) d({});
  }
};

const std::uint64_t ns = store::namespace_id({"limits-model", 1, ""});

// 2 layers x 2 planes x 16 blocks x 256 bytes: 16 KiB per chunk.
KvLayout layout() { return paged_layout(2, 1000, 16, 1, 8, 2); }

std::vector<ChunkHash> hashes(std::size_t n, std::uint32_t salt) {
  std::vector<store::Token> t(n * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i * 31 + salt);
  return store::chunk_hashes(t, 256);
}

std::vector<std::uint32_t> blocks(std::size_t chunks) {
  std::vector<std::uint32_t> v(chunks * 16);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint32_t>(i % 1000);
  return v;
}

struct Fixture {
  server::ServerConfig config = [] {
    server::ServerConfig c;
    c.l1_size = 1u << 20;  // 64 chunks of 16 KiB
    c.huge_pages = false;
    return c;
  }();
  transfer::NullTransferEngine null_engine;
  DeferredEngine deferred;
  std::unique_ptr<server::RequestHandler> handler;
  std::shared_ptr<Collect> sink = std::make_shared<Collect>();
  TimePoint now{};
  std::uint64_t next_id = 1;

  void make(bool defer = false) {
    handler = std::make_unique<server::RequestHandler>(
        config, 7, defer ? static_cast<transfer::TransferEngine&>(deferred) : null_engine);
  }
  // Sends `m`; returns handle()'s verdict (false: close the connection).
  template <class M>
  bool send(server::SessionState& s, const M& m) {
    Bytes bytes;
    FrameBuilder(bytes).add(static_cast<std::uint8_t>(M::opcode), 0, next_id++, [&](Writer& w) { encode(w, m); });
    FrameParser p;
    p.append(bytes);
    auto f = p.next();
    REQUIRE(f);
    return handler->handle(s, *f, *sink, now);
  }
  // The one reply's error, or nullopt for a success.
  std::optional<ErrorReply> only_reply() {
    auto f = sink->frames();
    REQUIRE(f.size() == 1);
    if (!f[0].first.is_error()) return std::nullopt;
    ErrorReply e;
    REQUIRE_FALSE(decode(f[0].second, e, "error"));
    return e;
  }
  HelloRequest hello_req(std::uint64_t id, std::string token = {}) {
    HelloRequest h;
    h.role = Role::worker;
    h.instance_id = id;
    h.auth_token = std::move(token);
    return h;
  }
  void hello(server::SessionState& s, std::uint64_t id) {
    REQUIRE(send(s, hello_req(id, config.auth_token)));
    REQUIRE_FALSE(only_reply());
  }
  void register_cache(server::SessionState& s) {
    RegisterKvCacheRequest r;
    r.ns = ns;
    r.model = "limits-model";
    r.layout = layout();
    REQUIRE(send(s, r));
    auto e = only_reply();
    REQUIRE_MESSAGE(!e, e->message);
  }
  StoreRequest store_req(std::size_t chunks, std::uint32_t salt) {
    StoreRequest st;
    st.ns = ns;
    st.hashes = hashes(chunks, salt);
    st.block_ids = blocks(chunks);
    return st;
  }
  std::int64_t stat(server::SessionState& s, const std::string& name) {
    REQUIRE(send(s, StatsRequest{}));
    auto f = sink->frames();
    REQUIRE(f.size() == 1);
    StatsReply r;
    REQUIRE_FALSE(decode(f[0].second, r, "reply"));
    for (auto& e : r.entries)
      if (e.name == name) return e.value;
    FAIL("no stat named " << name);
    return -1;
  }
};

}  // namespace

TEST_CASE("limits: tokens compare equal only when identical") {
  CHECK(server::constant_time_equal("secret", "secret"));
  CHECK_FALSE(server::constant_time_equal("secret", "secreT"));
  CHECK_FALSE(server::constant_time_equal("secret", "secret2"));
  CHECK_FALSE(server::constant_time_equal("", "x"));
  CHECK(server::constant_time_equal("", ""));
}

TEST_CASE("limits: with an auth token configured, HELLO without it or with a wrong one is refused and closes") {
  Fixture fx;
  fx.config.auth_token = "s3cret";
  fx.make();
  for (std::string token : {"", "wrong", "s3cret "}) {
    CAPTURE(token);
    server::SessionState s;
    CHECK_FALSE(fx.send(s, fx.hello_req(1, token)));  // close the connection
    auto e = fx.only_reply();
    REQUIRE(e);
    CHECK(e->code == static_cast<std::uint16_t>(errc::unauthorized));
    CHECK(e->message.find(token.empty() ? "no auth token" : "wrong auth token") == 0);
    CHECK(e->message.find("--auth-token-file") != std::string::npos);
    CHECK(e->message.find("KVLINK_AUTH_TOKEN") != std::string::npos);
    CHECK_FALSE(s.hello_done);
    // Nothing else is served before a good HELLO.
    CHECK(fx.send(s, PingRequest{}));
    CHECK(fx.only_reply()->code == static_cast<std::uint16_t>(errc::bad_request));
  }
  CHECK(fx.handler->counters().auth_failures == 3);
  CHECK(fx.handler->liveness().size() == 0);  // refused instances are not known
  server::SessionState good;
  fx.hello(good, 1);
  CHECK(fx.stat(good, "auth_failures") == 3);
}

TEST_CASE("limits: without a configured token any HELLO token is accepted") {
  Fixture fx;
  fx.make();
  server::SessionState s;
  CHECK(fx.send(s, fx.hello_req(1, "whatever")));
  CHECK_FALSE(fx.only_reply());
}

TEST_CASE("limits: HELLO of an instance beyond --max-instances is refused; known ones are not") {
  Fixture fx;
  fx.config.max_instances = 2;
  fx.make();
  server::SessionState a, b, c, a2;
  fx.hello(a, 1);
  fx.hello(b, 2);
  CHECK_FALSE(fx.send(c, fx.hello_req(3)));
  auto e = fx.only_reply();
  REQUIRE(e);
  CHECK(e->code == static_cast<std::uint16_t>(errc::limit_exceeded));
  CHECK(e->message.find("--max-instances") != std::string::npos);
  // A second connection of a known instance is fine.
  fx.hello(a2, 1);
  CHECK(fx.stat(a, "instances_refused") == 1);
  // Once an instance is reaped, a new one fits.
  fx.handler->on_session_end(b, fx.now);
  fx.now += std::chrono::seconds(fx.config.reap_timeout_s + 1);
  fx.handler->tick(fx.now);  // reaps 1 and 2 (both silent)
  server::SessionState d;
  fx.hello(d, 3);
}

TEST_CASE("limits: an instance that leaves without a registration frees its --max-instances slot at once") {
  Fixture fx;
  fx.config.max_instances = 2;
  fx.make();
  server::SessionState a, b, c, d;
  fx.hello(a, 1);
  fx.register_cache(a);
  fx.hello(b, 2);
  // Admin connections never take a slot.
  server::SessionState admin;
  HelloRequest h = fx.hello_req(99);
  h.role = Role::admin;
  REQUIRE(fx.send(admin, h));
  REQUIRE_FALSE(fx.only_reply());
  fx.handler->on_session_end(b, fx.now);  // no registration: forgotten, no reaper needed
  fx.hello(c, 3);
  // 1 left with its registration: it keeps its slot.
  fx.handler->on_session_end(a, fx.now);
  CHECK_FALSE(fx.send(d, fx.hello_req(4)));
  REQUIRE(fx.only_reply());
  CHECK(fx.stat(admin, "instances_live") == 2);
  CHECK(fx.stat(admin, "instances_refused") == 1);
}

TEST_CASE("limits: requests beyond --max-in-flight still working get limit_exceeded (PING never); replies resume after") {
  Fixture fx;
  fx.config.max_in_flight = 2;
  fx.make(true);
  server::SessionState w;
  fx.hello(w, 1);
  fx.register_cache(w);
  REQUIRE(fx.send(w, fx.store_req(1, 1)));
  REQUIRE(fx.send(w, fx.store_req(1, 2)));
  CHECK(fx.sink->frames().empty());  // both copies still running
  CHECK(*w.in_flight == 2);
  REQUIRE(fx.send(w, fx.store_req(1, 3)));
  auto e = fx.only_reply();
  REQUIRE(e);
  CHECK(e->code == static_cast<std::uint16_t>(errc::limit_exceeded));
  CHECK(e->message.find("2 requests in progress") != std::string::npos);
  CHECK(e->message.find("--max-in-flight") != std::string::npos);
  REQUIRE(fx.send(w, PingRequest{}));
  CHECK_FALSE(fx.only_reply());  // the heartbeat never waits behind the data path
  fx.deferred.complete_all();
  CHECK(fx.sink->frames().size() == 2);
  CHECK(*w.in_flight == 0);
  REQUIRE(fx.send(w, PingRequest{}));
  CHECK_FALSE(fx.only_reply());
  CHECK(fx.stat(w, "in_flight_refused") == 1);
  CHECK(fx.stat(w, "op_store_errors") == 1);
}

TEST_CASE("limits: a completion after the session ended does not touch it") {
  Fixture fx;
  fx.make(true);
  auto w = std::make_unique<server::SessionState>();
  fx.hello(*w, 1);
  fx.register_cache(*w);
  REQUIRE(fx.send(*w, fx.store_req(2, 1)));
  std::weak_ptr<std::uint32_t> counter = w->in_flight;
  fx.handler->on_session_end(*w, fx.now);
  w.reset();
  CHECK(*counter.lock() == 1);  // the completion keeps the counter alive
  fx.deferred.complete_all();
  CHECK(counter.expired());
}

TEST_CASE("limits: --instance-l1-quota as a fraction: an instance's STOREs store what fits, oldest first out") {
  Fixture fx;
  fx.config.instance_l1_quota_fraction = 0.25;  // 16 of 64 slots
  fx.make();
  server::SessionState a, b;
  fx.hello(a, 1);
  fx.hello(b, 2);
  CHECK(fx.handler->quota_bytes() == 16 * 16384);
  fx.register_cache(a);
  fx.register_cache(b);
  CHECK(fx.handler->quota_slots(16384) == 16);  // in chunks of the registered layout
  CHECK(fx.handler->quota_slots(4 * 16384) == 4);

  // 20 chunks in one STORE: 16 fit; the 4 beyond cannot evict this STORE's
  // own chunks (being written), so they are skipped: success with counts.
  REQUIRE(fx.send(a, fx.store_req(20, 1)));
  auto f = fx.sink->frames();
  REQUIRE(f.size() == 1);
  REQUIRE_FALSE(f[0].first.is_error());
  StoreResult r;
  REQUIRE_FALSE(decode(f[0].second, r, "reply"));
  CHECK(r.stored_chunks == 16);
  CHECK(r.skipped_chunks == 4);
  CHECK(fx.handler->store().owned_slots(1) == 16);

  // Another instance has its own quota.
  REQUIRE(fx.send(b, fx.store_req(10, 2)));
  fx.sink->frames();
  CHECK(fx.handler->store().owned_slots(2) == 10);

  // A later STORE of A replaces A's oldest chunks, never B's.
  REQUIRE(fx.send(a, fx.store_req(4, 3)));
  fx.sink->frames();
  CHECK(fx.handler->store().owned_slots(1) == 16);
  CHECK(fx.handler->store().owned_slots(2) == 10);
  SyncLookupRequest lk;
  lk.ns = ns;
  lk.hashes = hashes(20, 1);
  REQUIRE(fx.send(b, lk));
  auto lf = fx.sink->frames();
  LookupResult lr;
  REQUIRE_FALSE(decode(lf[0].second, lr, "reply"));
  CHECK(lr.matched_chunks == 0);  // chunk 0 of the first prompt was the oldest: gone
  lk.hashes = hashes(10, 2);
  REQUIRE(fx.send(b, lk));
  lf = fx.sink->frames();
  REQUIRE_FALSE(decode(lf[0].second, lr, "reply"));
  CHECK(lr.matched_chunks == 10);
  CHECK(fx.stat(a, "quota_evictions") == 4);
  CHECK(fx.stat(a, "quota_refusals") == 4);
  CHECK(fx.stat(a, "instance_l1_quota_bytes") == 16 * 16384);
}

TEST_CASE("limits: --instance-l1-quota in bytes; no quota by default") {
  Fixture fx;
  fx.config.instance_l1_quota_bytes = 5 * 16384 + 100;  // 5 chunks
  fx.make();
  server::SessionState a;
  fx.hello(a, 1);
  fx.register_cache(a);
  CHECK(fx.handler->quota_slots(16384) == 5);
  Fixture none;
  none.make();
  server::SessionState b;
  none.hello(b, 1);
  none.register_cache(b);
  CHECK(none.handler->quota_slots(16384) == 0);
  REQUIRE(none.send(b, none.store_req(40, 1)));
  none.sink->frames();
  CHECK(none.handler->store().owned_slots(1) == 40);
}

TEST_CASE("store quota: over_quota only when none of the owner's entries is evictable; counts follow drops") {
  store::L1Pool pool(16 * 4096, false);
  store::KvStore kv(pool, {});
  auto writer = [](store::Owner owner) { return store::Writer{4096, owner, 3}; };
  TimePoint now{};
  auto key = [](std::uint64_t i) { return store::ChunkKey{1, ChunkHash{i, i}, 0}; };
  store::Slot slot = 0;
  std::uint64_t gen[8] = {};
  using R = store::KvStore::Reserve;
  for (int i = 0; i < 3; ++i) REQUIRE(kv.reserve(key(i), writer(42), now, slot, gen[i]) == R::reserved);
  CHECK(kv.owned_slots(42) == 3);
  // All three still being written: nothing of 42's to evict.
  CHECK(kv.reserve(key(3), writer(42), now, slot, gen[3]) == R::over_quota);
  // Another owner is not limited by 42's quota.
  CHECK(kv.reserve(key(4), writer(43), now, slot, gen[4]) == R::reserved);
  for (int i = 0; i < 3; ++i) kv.commit(key(i), gen[i], now);
  kv.lock(key(0), 9, now);  // read-locked: not evictable, so key 1 goes first
  CHECK(kv.reserve(key(3), writer(42), now, slot, gen[3]) == R::reserved);
  CHECK(kv.find(key(0)) != nullptr);
  CHECK(kv.find(key(1)) == nullptr);
  CHECK(kv.find(key(2)) != nullptr);
  CHECK(kv.owned_slots(42) == 3);
  CHECK(kv.stats().quota_evictions == 1);
  CHECK(kv.stats().quota_refusals == 1);
  kv.abort(key(3), gen[3]);
  CHECK(kv.owned_slots(42) == 2);
  kv.release_all(key(0), 9);
  CHECK(kv.clear() == 2);
  CHECK(kv.owned_slots(42) == 0);
  CHECK(kv.owned_slots(43) == 1);  // still being written
}

TEST_CASE("access: a non-loopback endpoint needs an auth token; loopback and unix do not") {
  server::ServerConfig c;
  c.listen = {"unix:/tmp/x.sock", "tcp:127.0.0.1:0", "tcp:localhost:1", "tcp:[::1]:2", "tcp::3", "tcp:4"};
  CHECK_FALSE(server::check_access(c));
  c.listen.push_back("tcp:0.0.0.0:7070");
  const auto why = server::check_access(c).message();
  CHECK(why.find("tcp:0.0.0.0:7070 is not a loopback address") == 0);
  CHECK(why.find("--auth-token-file") != std::string::npos);
  c.auth_token = "t";
  CHECK_FALSE(server::check_access(c));
  c.auth_token.clear();
  c.listen = {"tcp:[::]:1"};
  CHECK(server::check_access(c));
  c.listen = {"tcp:10.1.2.3:1"};
  CHECK(server::check_access(c));
}

TEST_CASE("access: tcp:PORT and tcp::PORT mean the loopback address") {
  auto ep = net::parse_endpoint("tcp:7070");
  REQUIRE(ep);
  CHECK(ep->host == "127.0.0.1");
  CHECK(ep->port == 7070);
  CHECK(ep->is_loopback());
  ep = net::parse_endpoint("tcp::7071");
  REQUIRE(ep);
  CHECK(ep->host == "127.0.0.1");
  CHECK(ep->port == 7071);
  ep = net::parse_endpoint("tcp:");
  CHECK_FALSE(ep);
  CHECK(ep.error() == errc::bad_request);
  CHECK(ep.error().message().find("missing port") != std::string::npos);
  CHECK_FALSE(net::parse_endpoint("tcp:70x"));
  ep = net::parse_endpoint("tcp:99999");
  CHECK_FALSE(ep);
  CHECK(ep.error().message().find("not a number from 0 to 65535") != std::string::npos);
}

TEST_CASE("access: the token comes from the config, else the file, else KVLINK_AUTH_TOKEN") {
  char path[] = "/tmp/kvlink-token-XXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  ::close(fd);
  std::ofstream(path) << "  from-file\n";
  CHECK(net::resolve_auth_token("explicit", path).value() == "explicit");
  CHECK(net::resolve_auth_token("", path).value() == "from-file");
  ::setenv("KVLINK_AUTH_TOKEN", "from-env", 1);
  CHECK(net::resolve_auth_token("", "").value() == "from-env");
  ::unsetenv("KVLINK_AUTH_TOKEN");
  CHECK(net::resolve_auth_token("", "").value() == "");
  std::ofstream(path) << "\n";
  CHECK(net::resolve_auth_token("", path).error().message().find("is empty") != std::string::npos);
  ::unlink(path);
  const auto unreadable = net::resolve_auth_token("", path);
  CHECK(unreadable.error().message().find("cannot be read") != std::string::npos);
  CHECK(unreadable.error().code() == std::errc::no_such_file_or_directory);
}
