// The store operations of the request handler, no sockets, fake time:
// registration, STORE/RETRIEVE bookkeeping with a fake transfer engine,
// lookups and their locks, prefetch jobs, sessions, TTLs.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>

#include <functional>

#include "collect_sink.hpp"
#include "kvlink/server/request_handler.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/transfer/kv_memfd.hpp"

using namespace kvlink;
using namespace kvlink::wire;
using namespace std::chrono_literals;

namespace {

using Collect = kvlink::test::CollectSink;

// Completes jobs only when told (a real engine is asynchronous).
struct DeferredEngine final : transfer::TransferEngine {
  std::vector<std::pair<transfer::TransferJob, transfer::TransferDone>> jobs;
  void submit(transfer::TransferJob job, transfer::TransferDone done) override {
    jobs.emplace_back(std::move(job), std::move(done));
  }
  void complete_all(std::error_code ec = {}) {
    auto js = std::move(jobs);
    for (auto& [j, d] : js) d(ec);
  }
};

const std::uint64_t ns = store::namespace_id({"test-model", 1, ""});

KvLayout layout(std::uint32_t block_size = 16) { return paged_layout(2, 1000, block_size, 1, 8, 2); }

std::vector<ChunkHash> hashes(std::size_t n, std::uint32_t salt = 0) {
  std::vector<store::Token> t(n * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i * 31 + salt);
  return store::chunk_hashes(t, 256);
}

std::vector<std::uint32_t> blocks(std::size_t chunks) {
  std::vector<std::uint32_t> v(chunks * 16);  // 256 / 16 blocks per chunk
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint32_t>(i);
  return v;
}

struct Fixture {
  server::ServerConfig config = [] {
    server::ServerConfig c;
    c.l1_size = 64u << 20;
    c.huge_pages = false;
    c.reap_timeout_s = 24 * 3600;  // these tests are about TTLs, not reaping
    return c;
  }();
  transfer::NullTransferEngine null_engine;
  DeferredEngine deferred;
  std::unique_ptr<server::RequestHandler> handler;
  server::SessionState worker, scheduler;
  std::shared_ptr<Collect> sink = std::make_shared<Collect>();
  TimePoint now{};
  std::uint64_t next_id = 100;

  explicit Fixture(bool defer = false) {
    handler = std::make_unique<server::RequestHandler>(
        config, 77, defer ? static_cast<transfer::TransferEngine&>(deferred) : null_engine);
    hello(worker, Role::worker, 1);
    hello(scheduler, Role::scheduler, 2);
  }
  template <class M>
  void send(server::SessionState& s, const M& m, std::uint16_t flags = 0) {
    Bytes bytes;
    FrameBuilder(bytes).add(static_cast<std::uint8_t>(M::opcode), flags, next_id++, [&](Writer& w) { encode(w, m); });
    FrameParser p;
    p.append(bytes);
    auto f = p.next();
    REQUIRE(f);
    REQUIRE(handler->handle(s, *f, *sink, now));
  }
  // A new handler for a changed config, with fresh sessions said HELLO.
  void rebuild() {
    handler = std::make_unique<server::RequestHandler>(config, 77, null_engine);
    worker = {};
    scheduler = {};
    hello(worker, Role::worker, 1);
    hello(scheduler, Role::scheduler, 2);
  }
  void hello(server::SessionState& s, Role role, std::uint64_t id) {
    HelloRequest h;
    h.role = role;
    h.instance_id = id;
    send(s, h);
    sink->out.clear();
  }
  // Sends `m` and decodes its one reply; fails the test on an error reply.
  template <class M>
  typename M::reply_type call(server::SessionState& s, const M& m) {
    send(s, m);
    auto f = sink->frames();
    REQUIRE(f.size() == 1);
    if (f[0].first.is_error()) {
      ErrorReply e;
      (void)decode(f[0].second, e, "error");  // best effort: the message, if any, for FAIL
      FAIL("unexpected error: " << e.message);
    }
    typename M::reply_type r;
    REQUIRE_FALSE(decode(f[0].second, r, "reply"));
    return r;
  }
  // Sends `m` and returns its error reply.
  template <class M>
  ErrorReply error(server::SessionState& s, const M& m) {
    send(s, m);
    return sink->only_error();
  }
  void register_worker() {
    RegisterKvCacheRequest r;
    r.ns = ns;
    r.model = "test-model";
    r.layout = layout();
    call(worker, r);
  }
  // A StoreRequest or RetrieveRequest of chunks `h`, from or into the first blocks.
  template <class Request>
  static Request transfer(const std::vector<ChunkHash>& h) {
    Request r;
    r.ns = ns;
    r.hashes = h;
    r.block_ids = blocks(h.size());
    return r;
  }
  StoreResult store(const std::vector<ChunkHash>& h) { return call(worker, transfer<StoreRequest>(h)); }
  // Stores many chunks, 50 per STORE (the blocks one request can name).
  void store_all(const std::vector<ChunkHash>& h) {
    for (std::size_t i = 0; i < h.size(); i += 50) {
      const std::vector<ChunkHash> part(h.begin() + static_cast<std::ptrdiff_t>(i),
                                        h.begin() + static_cast<std::ptrdiff_t>(std::min(i + 50, h.size())));
      REQUIRE(store(part).stored_chunks == part.size());
    }
  }
  // Sends a SYNC_LOOKUP without waiting for its reply (a large one is sliced).
  void send_sync_lookup(const std::vector<ChunkHash>& h, std::uint64_t session) {
    SyncLookupRequest l;
    l.ns = ns;
    l.session_id = session;
    l.hashes = h;
    send(scheduler, l);
  }
  std::uint32_t sync_lookup(const std::vector<ChunkHash>& h, std::uint64_t session = 1) {
    SyncLookupRequest l;
    l.ns = ns;
    l.session_id = session;
    l.hashes = h;
    return call(scheduler, l).matched_chunks;
  }
  std::int64_t stat(const std::string& name) {
    auto r = call(scheduler, StatsRequest{});
    for (auto& e : r.entries)
      if (e.name == name) return e.value;
    FAIL("no stat " << name);
    return -1;
  }
};

std::uint16_t code(errc e) { return static_cast<std::uint16_t>(e); }

}  // namespace

TEST_CASE("STORE, SYNC_LOOKUP, RETRIEVE with the in-process fake engine") {
  Fixture f;
  f.register_worker();
  const std::uint64_t chunk_bytes = 2 * 2 * 16 * (16 * 8 * 2);
  const auto h = hashes(8);
  auto r = f.store({h.begin(), h.begin() + 5});
  CHECK(r.stored_chunks == 5);
  CHECK(r.skipped_chunks == 0);
  CHECK(f.store(h).stored_chunks == 3);  // the first 5 are present
  CHECK(f.stat("store_entries") == 8);
  CHECK(f.stat("l1_bytes_used") == 8 * chunk_bytes);
  CHECK(f.stat("l1_layouts") == 1);
  CHECK(f.sync_lookup(h) == 8);
  CHECK(f.stat("read_locks_held") == 8);
  CHECK(f.stat("l1_pinned_bytes") == 8 * chunk_bytes);
  RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = {h.begin(), h.begin() + 4};
  rt.block_ids = blocks(4);
  rt.skip_first_n_tokens = 16;
  rt.session_id = 1;  // the lookup's session
  CHECK(f.call(f.worker, rt).retrieved_chunks == 4);
  CHECK(f.stat("read_locks_held") == 4);  // retrieve released those chunks' locks
  CHECK(f.stat("l1_pinned_bytes") == 4 * chunk_bytes);
  CHECK(f.null_engine.jobs() == 3);
  CHECK(f.stat("lookup_hits") == 8);
  CHECK(f.stat("op_store_requests") == 2);
}

TEST_CASE("registration is validated with clear errors") {
  Fixture f;
  f.config.l1_slab_size = 64 * 1024;
  f.rebuild();
  RegisterKvCacheRequest r;
  r.ns = ns;
  r.model = "test-model";
  r.layout = layout(24);  // 256 is not a multiple of 24
  auto e = f.error(f.worker, r);
  CHECK(e.code == code(errc::bad_request));
  CHECK(e.message.find("not a multiple of the engine block size 24") != std::string::npos);
  r.layout = layout();
  r.model = "";
  CHECK(f.error(f.worker, r).message.find("model name is empty") != std::string::npos);
  r.model = "m";
  r.ns = 0;
  CHECK(f.error(f.worker, r).message.find("namespace 0") != std::string::npos);
  r.ns = ns;
  f.call(f.worker, r);
  // Another layout is served next to the first, but a chunk bigger than
  // an L1 slab is refused naming the flag.
  r.layout.num_layers = 40;  // 320 KiB chunks
  r.layout.layers.resize(40);
  CHECK(f.error(f.worker, r).message.find("raise --l1-slab-size") != std::string::npos);
  CHECK(f.handler->registrations() == 1);  // the first registration stands
  // Nor a chunk so small that its index entry would cost a fair part of it.
  r.layout = paged_layout(1, 1000, 16, 1, 2, 1);  // 16 blocks of 32 bytes x 2 planes: 1 KiB
  CHECK(f.error(f.worker, r).message.find("below the server's minimum of 4096") != std::string::npos);
  r.layout = layout();
  r.layout.num_layers = 4;
  r.layout.layers.resize(4);
  f.call(f.worker, r);
  // UNREGISTER is idempotent.
  f.call(f.worker, UnregisterKvCacheRequest{});
  f.call(f.worker, UnregisterKvCacheRequest{});
  CHECK(f.handler->registrations() == 0);
}

TEST_CASE("STORE and RETRIEVE refuse bad requests clearly") {
  Fixture f;
  const auto h = hashes(2);
  StoreRequest s;
  s.ns = ns;
  s.hashes = h;
  s.block_ids = blocks(2);
  auto e = f.error(f.worker, s);
  CHECK(e.code == code(errc::not_registered));
  CHECK(e.message.find("REGISTER_KV_CACHE") != std::string::npos);
  f.register_worker();
  s.ns = ns + 1;
  e = f.error(f.worker, s);
  CHECK(e.code == code(errc::bad_request));
  CHECK(e.message.find("does not match the registered") != std::string::npos);
  s.ns = ns;
  s.block_ids.pop_back();
  e = f.error(f.worker, s);
  CHECK(e.code == code(errc::bad_request));
  CHECK(e.message.find("31 block ids given for 2 chunks") != std::string::npos);
  s.block_ids = blocks(2);
  s.block_ids[3] = 5000;
  CHECK(f.error(f.worker, s).message.find("block id 5000 (position 3)") != std::string::npos);
  s.block_ids = blocks(2);
  s.kv_rank = 1;
  CHECK(f.error(f.worker, s).message.find("kv_rank 1") != std::string::npos);
  // RETRIEVE of a chunk that is not there names the chunk.
  f.store({h[0]});
  RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = h;
  rt.block_ids = blocks(2);
  e = f.error(f.worker, rt);
  CHECK(e.code == code(errc::not_found));
  CHECK(e.message.find("chunk 1 ") != std::string::npos);
  CHECK(f.stat("read_locks_held") == 0);  // nothing left locked by the failed retrieve
  rt.hashes = {h[0]};
  rt.block_ids = blocks(1);
  rt.skip_first_n_tokens = 257;
  CHECK(f.error(f.worker, rt).message.find("skip_first_n_tokens 257") != std::string::npos);
}

TEST_CASE("STORE stores as many as fit; short memory is not an error") {
  Fixture f;
  f.config.l1_size = 3 * 16384;  // read at construction: rebuild the handler
  f.config.l1_slab_size = 16384;
  f.handler = std::make_unique<server::RequestHandler>(f.config, 77, f.null_engine);
  f.hello(f.worker, Role::worker, 1);
  f.hello(f.scheduler, Role::scheduler, 2);
  f.register_worker();
  const auto h = hashes(5);
  f.store({h[0], h[1], h[2]});
  CHECK(f.sync_lookup({h[0], h[1], h[2]}) == 3);  // all locked now
  auto r = f.store(h);
  CHECK(r.stored_chunks == 0);
  CHECK(r.skipped_chunks == 5);
}

TEST_CASE("deferred completion: write-locked until done, reply dropped if the session is gone") {
  Fixture f(true);
  f.register_worker();
  const auto h = hashes(2);
  StoreRequest s;
  s.ns = ns;
  s.hashes = h;
  s.block_ids = blocks(2);
  f.send(f.worker, s);
  CHECK(f.sink->frames().empty());  // no reply until the copy completes
  CHECK(f.stat("write_locks_held") == 2);
  CHECK(f.sync_lookup(h) == 0);  // being written: not readable
  f.deferred.complete_all();
  auto fr = f.sink->frames();
  REQUIRE(fr.size() == 1);
  StoreResult r;
  REQUIRE_FALSE(decode(fr[0].second, r, "r"));
  CHECK(r.stored_chunks == 2);
  CHECK(f.sync_lookup(h) == 2);

  // A failed copy frees the slots and answers with an error.
  const auto h2 = hashes(1, 9);
  s.hashes = h2;
  s.block_ids = blocks(1);
  f.send(f.worker, s);
  f.deferred.complete_all(make_error_code(errc::server_error));
  auto e = f.sink->frames();
  REQUIRE(e.size() == 1);
  CHECK(e[0].first.is_error());
  CHECK(f.stat("store_entries") == 2);

  // The session vanished: the completion commits but drops the reply.
  s.hashes = hashes(1, 11);
  f.send(f.worker, s);
  std::weak_ptr<Collect> old = f.sink;
  f.sink = std::make_shared<Collect>();
  CHECK(old.expired());
  f.deferred.complete_all();
  CHECK(f.sink->frames().empty());
  CHECK(f.stat("store_entries") == 3);
}

TEST_CASE("LOOKUP jobs report exactly once, then not_found; unpolled jobs expire") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(4);
  f.store({h[0], h[1]});
  LookupRequest l;
  l.ns = ns;
  l.session_id = 5;
  l.hashes = h;
  const auto job = f.call(f.scheduler, l).job_id;
  auto st = f.call(f.scheduler, QueryPrefetchStatusRequest{job});
  CHECK(st.state == PrefetchState::done);
  CHECK(st.matched_chunks == 2);
  auto e = f.error(f.scheduler, QueryPrefetchStatusRequest{job});
  CHECK(e.code == code(errc::not_found));
  CHECK(e.message.find("already reported") != std::string::npos);
  CHECK(f.error(f.scheduler, QueryPrefetchStatusRequest{12345}).code == code(errc::not_found));
  // Never polled: gone after the job TTL.
  f.call(f.scheduler, l);
  CHECK(f.handler->jobs() == 1);
  f.now += 59s;
  f.handler->tick(f.now);
  CHECK(f.handler->jobs() == 1);
  f.now += 2s;
  f.handler->tick(f.now);
  CHECK(f.handler->jobs() == 0);
}

TEST_CASE("FREE_LOOKUP_LOCKS releases [start, end) for every rank") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(4);
  f.store(h);
  CHECK(f.sync_lookup(h) == 4);
  FreeLookupLocksRequest fr;
  fr.ns = ns;
  fr.hashes = h;
  fr.start = 1;
  fr.end = 3;
  fr.session_id = 2;  // another request's session holds nothing here
  f.send(f.scheduler, fr, flag::one_way);
  CHECK(f.stat("read_locks_held") == 4);
  fr.session_id = 1;
  f.send(f.scheduler, fr, flag::one_way);
  CHECK(f.sink->frames().empty());  // one-way
  CHECK(f.stat("read_locks_held") == 2);
  fr.end = 9;  // bad range: dropped and counted, no reply
  f.send(f.scheduler, fr, flag::one_way);
  CHECK(f.sink->frames().empty());
  CHECK(f.stat("op_free_lookup_locks_errors") == 1);
}

TEST_CASE("lock TTL, session TTL and END_SESSION with fake time") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3);
  f.store(h);
  CHECK(f.sync_lookup(h, 7) == 3);
  CHECK(f.handler->sessions() == 1);
  f.now += 301s;
  f.handler->tick(f.now);
  CHECK(f.stat("read_locks_held") == 0);
  CHECK(f.stat("read_locks_expired") == 3);
  CHECK(f.handler->sessions() == 1);
  f.now += 300s;
  f.handler->tick(f.now);
  CHECK(f.handler->sessions() == 0);  // 10 minutes without activity
  // END_SESSION drops the session's state at once, with the locks it
  // still holds: an aborted request pins nothing.
  f.sync_lookup(h, 8);
  CHECK(f.stat("read_locks_held") == 3);
  EndSessionRequest end;
  end.ns = ns;
  end.session_id = 8;
  end.hashes = h;
  f.send(f.scheduler, end, flag::one_way);
  CHECK(f.handler->sessions() == 0);
  CHECK(f.stat("read_locks_held") == 0);
  CHECK(f.stat("l1_pinned_bytes") == 0);
}

TEST_CASE("lock hygiene: an abort storm leaves no lock held and no byte pinned") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(6);
  f.store(h);
  // 200 requests look the prompt up; each ends one of four ways: aborted
  // (END_SESSION only), retrieved, retrieve refused, or its locks freed.
  for (std::uint64_t id = 1; id <= 200; ++id) {
    REQUIRE(f.sync_lookup(h, id) == 6);
    REQUIRE(f.sync_lookup({h[0], h[1]}, id) == 2);  // a repeated lookup locks again
    switch (id % 4) {
      case 1: {
        RetrieveRequest rt;
        rt.ns = ns;
        rt.hashes = {h.begin(), h.begin() + 3};
        rt.block_ids = blocks(3);
        rt.session_id = id;
        REQUIRE(f.call(f.worker, rt).retrieved_chunks == 3);
        break;
      }
      case 2: {
        RetrieveRequest rt;  // refused: more blocks than the registration has
        rt.ns = ns;
        rt.hashes = h;
        rt.block_ids = blocks(6);
        rt.block_ids.back() = 1u << 30;
        rt.session_id = id;
        CHECK(f.error(f.worker, rt).code == code(errc::bad_request));
        break;
      }
      case 3: {
        FreeLookupLocksRequest fr;
        fr.ns = ns;
        fr.hashes = h;
        fr.start = 0;
        fr.end = 4;
        fr.session_id = id;
        f.send(f.scheduler, fr, flag::one_way);
        break;
      }
      default: break;
    }
    EndSessionRequest end;
    end.ns = ns;
    end.session_id = id;
    end.hashes = h;
    f.send(f.scheduler, end, flag::one_way);
  }
  CHECK(f.handler->sessions() == 0);
  CHECK(f.stat("read_locks_held") == 0);
  CHECK(f.stat("l1_pinned_bytes") == 0);
  CHECK(f.stat("read_locks_expired") == 0);  // nothing was left to the TTL
}

TEST_CASE("lock hygiene: two schedulers never release each other's locks") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3);
  f.store(h);
  server::SessionState other;
  f.hello(other, Role::scheduler, 0x5eed);
  SyncLookupRequest l;
  l.ns = ns;
  l.session_id = 9;  // another engine's request
  l.hashes = h;
  f.call(other, l);
  CHECK(f.sync_lookup(h, 1) == 3);
  CHECK(f.stat("read_locks_held") == 6);
  // The first engine's request ends three ways; the other's locks stay.
  RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = h;
  rt.block_ids = blocks(3);
  rt.session_id = 1;
  CHECK(f.call(f.worker, rt).retrieved_chunks == 3);
  CHECK(f.stat("read_locks_held") == 3);
  CHECK(f.sync_lookup(h, 1) == 3);
  EndSessionRequest end;
  end.ns = ns;
  end.session_id = 1;
  end.hashes = h;
  f.send(f.scheduler, end, flag::one_way);
  CHECK(f.stat("read_locks_held") == 3);
  CHECK(f.sync_lookup(h, 1) == 3);
  f.handler->on_session_end(f.scheduler, f.now);
  CHECK(f.stat("read_locks_held") == 3);
  // A RETRIEVE naming a session id that is not the other's releases nothing of it.
  rt.session_id = 1;
  CHECK(f.call(f.worker, rt).retrieved_chunks == 3);
  CHECK(f.stat("read_locks_held") == 3);
  f.handler->on_session_end(other, f.now);
  CHECK(f.stat("read_locks_held") == 0);
}

TEST_CASE("a scheduler's connection ending releases its locks and jobs") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3);
  f.store(h);
  LookupRequest l;
  l.ns = ns;
  l.hashes = h;
  f.call(f.scheduler, l);
  CHECK(f.stat("read_locks_held") == 3);
  CHECK(f.handler->jobs() == 1);
  // Repeated and growing lookups of one request: every lock is released
  // at the end, however many lookups took them.
  f.sync_lookup({h[0]}, 3);
  f.sync_lookup(h, 3);
  CHECK(f.stat("read_locks_held") == 7);
  f.handler->on_session_end(f.scheduler, f.now);
  CHECK(f.handler->store().read_locks() == 0);
  CHECK(f.handler->jobs() == 0);
  // Issue 12: a worker's registration outlives its connection (until it
  // unregisters or is reaped); before, it went with the last connection.
  f.handler->on_session_end(f.worker, f.now);
  CHECK(f.handler->registrations() == 1);
}

TEST_CASE("CLEAR, REPORT_BLOCK_ALLOCATION and lookups of a tensor-parallel world") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3);
  f.store(h);
  ReportBlockAllocationRequest rb;
  rb.allocated_blocks = 10;
  rb.total_blocks = 100;
  f.send(f.scheduler, rb, flag::one_way);
  CHECK(f.stat("block_allocation_reports") == 1);
  CHECK(f.stat("engine_blocks_total") == 100);
  SyncLookupRequest l;
  l.ns = ns;
  l.world_size = 2;  // rank 1 has nothing
  l.hashes = h;
  CHECK(f.call(f.scheduler, l).matched_chunks == 0);
  l.world_size = 0;
  CHECK(f.error(f.scheduler, l).message.find("world_size 0") != std::string::npos);
  l.world_size = 1024;
  l.hashes.assign(5000, h[0]);  // 5.1M keys: refused before any work
  CHECK(f.error(f.scheduler, l).message.find("split the request") != std::string::npos);
  l.world_size = 1;
  CHECK(f.sync_lookup({h[0]}) == 1);  // locks chunk 0
  CHECK(f.call(f.scheduler, ClearRequest{}).dropped_entries == 2);
  CHECK(f.stat("store_entries") == 1);
}

TEST_CASE("received fds: each REGISTER takes the oldest, even when refused; the rest close with the session") {
  Fixture f;
  auto open_fd = [] {
    auto kv = transfer::create_kv_memfd(layout(), {.name = "kvlink-handler-test", .map = false});
    REQUIRE_MESSAGE(kv, kv.error().message());
    return std::move(kv->fd);
  };
  auto is_open = [](int fd) { return ::fcntl(fd, F_GETFD) != -1; };
  const int a = (f.worker.received_fds.push_back(open_fd()), f.worker.received_fds.back().get());
  const int b = (f.worker.received_fds.push_back(open_fd()), f.worker.received_fds.back().get());
  const int c = (f.worker.received_fds.push_back(open_fd()), f.worker.received_fds.back().get());
  // A refused REGISTER (namespace 0) still consumes and closes its fd.
  RegisterKvCacheRequest bad;
  bad.model = "test-model";
  bad.layout = layout();
  CHECK(f.error(f.worker, bad).code == to_wire(errc::bad_request));
  CHECK(!is_open(a));
  CHECK(is_open(b));
  f.register_worker();  // takes b; the null engine closes it
  CHECK(f.null_engine.fds() == 1);
  CHECK(!is_open(b));
  CHECK(is_open(c));
  // Other operations leave queued fds alone; the session's end closes them.
  f.store(hashes(1));
  CHECK(is_open(c));
  f.handler->on_session_end(f.worker, f.now);
  CHECK(f.worker.received_fds.empty());
  CHECK(!is_open(c));
}

TEST_CASE("STORE and RETRIEVE that arrive after their fence are refused (timed_out) and touch nothing") {
  Fixture f(true);
  f.now = TimePoint{} + std::chrono::seconds(100);
  f.register_worker();
  const auto h = hashes(2);
  StoreRequest s;
  s.ns = ns;
  s.hashes = h;
  s.block_ids = blocks(2);
  s.fence_ns = wire::fence_to_wire(f.now - std::chrono::milliseconds(1));
  auto e = f.error(f.worker, s);
  CHECK(e.code == code(errc::timed_out));
  CHECK(e.message.find("fence") != std::string::npos);
  CHECK(f.stat("write_locks_held") == 0);  // nothing reserved
  CHECK(f.stat("transfers_fenced") == 1);

  // In time: stored (the engine checks the fence again while it copies).
  s.fence_ns = wire::fence_to_wire(f.now + std::chrono::seconds(1));
  f.send(f.worker, s);
  REQUIRE(f.deferred.jobs.size() == 1);
  CHECK(f.deferred.jobs[0].first.fence == f.now + std::chrono::seconds(1));
  f.deferred.complete_all();
  f.sink->out.clear();
  CHECK(f.sync_lookup(h) == 2);

  RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = h;
  rt.block_ids = blocks(2);
  rt.fence_ns = wire::fence_to_wire(f.now);
  CHECK(f.error(f.worker, rt).code == code(errc::timed_out));
  CHECK(f.deferred.jobs.empty());  // no copy was started
  CHECK(f.stat("transfers_fenced") == 2);
  // The engine's own fence failure is reported the same way.
  rt.fence_ns = 0;
  f.send(f.worker, rt);
  f.deferred.complete_all(make_error_code(errc::timed_out));
  auto fr = f.sink->frames();
  REQUIRE(fr.size() == 1);
  ErrorReply late;
  REQUIRE_FALSE(decode(fr[0].second, late, "error"));
  CHECK(late.code == code(errc::timed_out));
  CHECK(f.stat("transfers_fenced") == 3);
}

// ---- issue 12: registrations across reconnects, admin connections, drain ----

namespace {
HelloReply hello_reply(Fixture& f, server::SessionState& s, Role role, std::uint64_t id) {
  HelloRequest h;
  h.role = role;
  h.instance_id = id;
  return f.call(s, h);
}
}  // namespace

TEST_CASE("registration survives a closed connection: re-HELLO says registered, STORE works without REGISTER") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(2);
  f.sync_lookup(h);  // the scheduler holds nothing yet: nothing stored
  CHECK(f.store({h[0]}).stored_chunks == 1);
  // A lookup lock and a job of the worker's own instance go with the connection.
  LookupRequest l;
  l.ns = ns;
  l.hashes = {h[0]};
  f.call(f.worker, l);
  CHECK(f.handler->jobs() == 1);
  CHECK(f.stat("read_locks_held") == 1);
  f.handler->on_session_end(f.worker, f.now);
  CHECK(f.handler->jobs() == 0);
  CHECK(f.stat("read_locks_held") == 0);
  CHECK(f.handler->registrations() == 1);
  CHECK(f.handler->liveness().known(1));  // kept: it holds a registration
  CHECK(f.stat("instances_live") == 2);

  f.now += std::chrono::seconds(30);
  server::SessionState again;
  CHECK(hello_reply(f, again, Role::worker, 1).registered == 1);
  StoreRequest s;
  s.ns = ns;
  s.hashes = {h[1]};
  s.block_ids = blocks(1);
  CHECK(f.call(again, s).stored_chunks == 1);
  // Another instance never registered: its HELLO says so.
  server::SessionState other;
  CHECK(hello_reply(f, other, Role::worker, 9).registered == 0);
}

TEST_CASE("an instance without a registration is forgotten when its last connection closes") {
  Fixture f;
  server::SessionState second;
  hello_reply(f, second, Role::scheduler, 2);  // a second connection of the scheduler
  CHECK(f.stat("instances_live") == 2);
  f.handler->on_session_end(f.scheduler, f.now);
  CHECK(f.handler->liveness().known(2));  // one connection remains
  f.handler->on_session_end(second, f.now);
  CHECK_FALSE(f.handler->liveness().known(2));
  CHECK(f.stat("instances_live") == 1);  // the worker, still connected
  // UNREGISTER while connected drops the registration; closing then forgets.
  f.register_worker();
  f.call(f.worker, UnregisterKvCacheRequest{});
  CHECK(f.handler->registrations() == 0);
  CHECK(f.handler->liveness().known(1));
  server::SessionState probe;
  hello_reply(f, probe, Role::admin, 77);
  f.handler->on_session_end(f.worker, f.now);
  CHECK_FALSE(f.handler->liveness().known(1));
  server::SessionState back;
  CHECK(hello_reply(f, back, Role::worker, 1).registered == 0);
}

TEST_CASE("a disconnected registration ages from its last traffic; the reaper drops it") {
  Fixture f;
  f.config.reap_timeout_s = 10;
  f.config.registration_grace_s = 60;
  f.rebuild();
  f.register_worker();
  f.now += std::chrono::seconds(5);
  f.handler->on_session_end(f.worker, f.now);
  // Never pinged: the registration grace (60 s from the REGISTER) applies.
  f.handler->tick(f.now + std::chrono::seconds(50));
  CHECK(f.handler->registrations() == 1);
  f.handler->tick(f.now + std::chrono::seconds(56));
  CHECK(f.handler->registrations() == 0);
  CHECK_FALSE(f.handler->liveness().known(1));
  CHECK(f.handler->liveness().reaped() == 2);  // and the silent (connected) scheduler
  // Back after the reaper: a fresh start.
  f.now += std::chrono::seconds(60);
  server::SessionState back;
  CHECK(hello_reply(f, back, Role::worker, 1).registered == 0);
  StoreRequest s;
  s.ns = ns;
  s.hashes = hashes(1);
  s.block_ids = blocks(1);
  CHECK(f.error(back, s).code == code(errc::not_registered));
}

TEST_CASE("reap timeout 0: no reaper; a disconnected registration stays") {
  Fixture f;
  f.config.reap_timeout_s = 0;
  f.rebuild();
  f.register_worker();
  f.handler->on_session_end(f.worker, f.now);
  f.handler->tick(f.now + std::chrono::hours(24 * 365));
  CHECK(f.handler->registrations() == 1);
  CHECK(f.handler->liveness().known(1));
  CHECK(f.handler->liveness().known(2));
  CHECK(f.handler->liveness().reaped() == 0);
}

TEST_CASE("admin connections are not instances: PING ok, no transfers, nothing left when they close") {
  Fixture f;
  f.config.max_instances = 2;  // the worker and the scheduler fill it
  f.rebuild();
  f.register_worker();
  f.store(hashes(1));
  std::vector<server::SessionState> admins(20);
  for (std::size_t i = 0; i < admins.size(); ++i) {
    auto r = hello_reply(f, admins[i], Role::admin, 1000 + i);  // beyond --max-instances: not counted
    CHECK(r.registered == 0);
    f.call(admins[i], PingRequest{});  // never unknown_instance
  }
  CHECK(f.stat("instances_live") == 2);
  CHECK(f.stat("instances_refused") == 0);
  // An admin saying HELLO with a worker's id does not see or use its registration.
  server::SessionState spy;
  CHECK(hello_reply(f, spy, Role::admin, 1).registered == 0);
  RegisterKvCacheRequest reg;
  reg.ns = ns;
  reg.model = "test-model";
  reg.layout = layout();
  const auto st = Fixture::transfer<StoreRequest>(hashes(1, 5));
  const auto rt = Fixture::transfer<RetrieveRequest>(hashes(1));
  for (auto e : {f.error(spy, reg), f.error(spy, st), f.error(spy, rt), f.error(spy, UnregisterKvCacheRequest{})}) {
    CHECK(e.code == code(errc::bad_request));
    CHECK(e.message.find("said HELLO as admin") != std::string::npos);
  }
  CHECK(f.stat("store_entries") == 1);
  // An admin's lookup locks go when it closes; no liveness entry is touched.
  SyncLookupRequest l;
  l.ns = ns;
  l.hashes = hashes(1);
  CHECK(f.call(admins[0], l).matched_chunks == 1);
  CHECK(f.stat("read_locks_held") == 1);
  for (auto& a : admins) f.handler->on_session_end(a, f.now);
  f.handler->on_session_end(spy, f.now);
  CHECK(f.stat("read_locks_held") == 0);
  CHECK(f.handler->liveness().known(1));
  CHECK(f.handler->registrations() == 1);
  CHECK(f.stat("instances_live") == 2);
}

TEST_CASE("drain: new transfers refused (shutting_down), in-flight ones finish, notice, then drained") {
  Fixture f(true);
  f.register_worker();
  const auto h = hashes(3);
  StoreRequest s;
  s.ns = ns;
  s.hashes = {h[0]};
  s.block_ids = blocks(1);
  f.send(f.worker, s);  // in flight
  CHECK(f.stat("transfers_in_flight") == 1);
  CHECK(f.stat("draining") == 0);

  CHECK(f.handler->begin_drain(f.now, std::chrono::seconds(10)) == 1);
  CHECK(f.handler->draining());
  CHECK(f.handler->drain_step(f.now, 0) == server::DrainStep::wait);
  f.handler->send_drain_notice(*f.sink);
  auto fr = f.sink->frames();
  REQUIRE(fr.size() == 1);
  CHECK(fr[0].first.opcode == static_cast<std::uint8_t>(Opcode::server_notice));
  CHECK(fr[0].first.is_one_way());
  CHECK(fr[0].first.id == 0);
  CHECK_FALSE(fr[0].first.is_response());
  ServerNotice notice;
  REQUIRE_FALSE(decode(fr[0].second, notice, "notice"));
  CHECK(notice.kind == NoticeKind::draining);
  CHECK(notice.message.find("planned restart") != std::string::npos);

  // New STORE, RETRIEVE and REGISTER: refused, saying why and what to do.
  s.hashes = {h[1]};
  auto e = f.error(f.worker, s);
  CHECK(e.code == code(errc::shutting_down));
  CHECK(e.message.find("STORE refused: the server is draining for a planned restart") == 0);
  CHECK(e.message.find("reconnect to its replacement") != std::string::npos);
  RetrieveRequest rt;
  rt.ns = ns;
  rt.hashes = {h[0]};
  rt.block_ids = blocks(1);
  CHECK(f.error(f.worker, rt).code == code(errc::shutting_down));
  RegisterKvCacheRequest reg;
  reg.ns = ns;
  reg.model = "test-model";
  reg.layout = layout();
  CHECK(f.error(f.worker, reg).code == code(errc::shutting_down));
  CHECK(f.deferred.jobs.size() == 1);  // nothing new started
  // Everything else is still served.
  f.call(f.worker, PingRequest{});
  CHECK(f.sync_lookup({h[2]}) == 0);
  CHECK(f.stat("draining") == 1);

  // The in-flight STORE completes and is answered; its reply must leave first.
  f.deferred.complete_all();
  fr = f.sink->frames();
  REQUIRE(fr.size() == 1);
  CHECK_FALSE(fr[0].first.is_error());
  CHECK(f.handler->transfers_in_flight() == 0);
  CHECK(f.handler->drain_step(f.now, 100) == server::DrainStep::wait);
  CHECK(f.handler->drain_step(f.now, 0) == server::DrainStep::drained);
  CHECK(f.stat("transfers_in_flight") == 0);
}

TEST_CASE("drain: the timeout cuts a drain; timeout 0 does not wait; begin_drain is idempotent") {
  Fixture f(true);
  f.register_worker();
  StoreRequest s;
  s.ns = ns;
  s.hashes = hashes(1);
  s.block_ids = blocks(1);
  f.send(f.worker, s);
  SUBCASE("timeout") {
    f.handler->begin_drain(f.now, std::chrono::seconds(10));
    CHECK(f.handler->drain_step(f.now + std::chrono::seconds(9), 0) == server::DrainStep::wait);
    // A second call (a repeated signal) moves nothing.
    f.handler->begin_drain(f.now + std::chrono::seconds(9), std::chrono::seconds(10));
    CHECK(f.handler->drain_started() == f.now);
    CHECK(f.handler->drain_step(f.now + std::chrono::seconds(10), 0) == server::DrainStep::timed_out);
  }
  SUBCASE("zero") {
    f.handler->begin_drain(f.now, std::chrono::seconds(0));
    CHECK(f.handler->drain_step(f.now, 0) == server::DrainStep::timed_out);
    f.deferred.complete_all();
    CHECK(f.handler->drain_step(f.now, 0) == server::DrainStep::drained);
  }
}

TEST_CASE("a registration made after the reaper forgot the connected instance is not left behind") {
  Fixture f;
  f.config.reap_timeout_s = 10;
  f.config.registration_grace_s = 10;
  f.rebuild();
  f.now += std::chrono::seconds(11);
  f.handler->tick(f.now);  // both silent: reaped, their connections stay open
  CHECK_FALSE(f.handler->liveness().known(1));
  f.register_worker();  // served, though the registry does not know the instance
  CHECK(f.handler->registrations() == 1);
  SUBCASE("it closes without HELLO: the registration goes with it") {
    f.handler->on_session_end(f.worker, f.now);
    CHECK(f.handler->registrations() == 0);
  }
  SUBCASE("it says HELLO again: kept across the close, reaped like any other") {
    CHECK(hello_reply(f, f.worker, Role::worker, 1).registered == 1);
    f.handler->on_session_end(f.worker, f.now);
    CHECK(f.handler->registrations() == 1);
    CHECK(f.handler->liveness().known(1));
    f.handler->tick(f.now + std::chrono::seconds(11));
    CHECK(f.handler->registrations() == 0);
  }
}

TEST_CASE("large requests run in slices: other connections are served in between, the results are the same") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3000);  // 3000 chunks stored: a lookup of all is about 3 slices
  f.store_all(h);
  f.send_sync_lookup(h, 4);
  CHECK(f.sink->frames().empty());  // not answered yet
  REQUIRE(f.scheduler.unfinished);
  int slices = 1;
  server::SessionState other;
  f.hello(other, Role::scheduler, 0x77);
  for (bool done = false; !done; ++slices) {
    // Between two slices another connection's PING is answered at once.
    f.send(other, PingRequest{});
    auto pong = f.sink->frames();
    REQUIRE(pong.size() == 1);
    CHECK_FALSE(pong[0].first.is_error());
    done = f.handler->continue_work(f.scheduler, *f.sink, f.now);
  }
  CHECK(slices == 3);
  LookupResult r;
  auto frames = f.sink->frames();
  REQUIRE(frames.size() == 1);
  REQUIRE_FALSE(decode(frames[0].second, r, "reply"));
  CHECK(r.matched_chunks == 3000);
  CHECK(f.stat("read_locks_held") == 3000);
  // END_SESSION: 3000 locks to release, then 4096 chunks to touch, a
  // slice at a time.
  EndSessionRequest end;
  end.ns = ns;
  end.session_id = 4;
  end.hashes = hashes(4096);
  f.send(f.scheduler, end, flag::one_way);
  CHECK(f.scheduler.unfinished);
  // A frame handed to the handler before the work is done finishes it
  // first: requests of one connection keep their order.
  CHECK(f.stat("read_locks_held") == 0);
  CHECK_FALSE(f.scheduler.unfinished);
  // CLEAR of 3000 chunks: three slices, then one answer with the total.
  f.send(f.scheduler, ClearRequest{});
  CHECK(f.sink->frames().empty());
  slices = 1;
  for (bool done = false; !done; ++slices) done = f.handler->continue_work(f.scheduler, *f.sink, f.now);
  CHECK(slices == 3);  // 1024 + 1024 dropped, then the last 952 and the answer
  frames = f.sink->frames();
  REQUIRE(frames.size() == 1);
  ClearResult cleared;
  REQUIRE_FALSE(decode(frames[0].second, cleared, "reply"));
  CHECK(cleared.dropped_entries == 3000);
  CHECK(f.stat("store_entries") == 0);
}

TEST_CASE("a departed scheduler's many locks are released a slice at a time, none left behind") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(3000);
  f.store_all(h);
  f.send_sync_lookup(h, 4);
  while (!f.handler->continue_work(f.scheduler, *f.sink, f.now)) {
  }
  f.sink->frames();
  CHECK(f.handler->store().read_locks() == 3000);
  f.handler->on_session_end(f.scheduler, f.now);
  CHECK(f.handler->store().read_locks() == 3000 - 1024);  // one slice at once
  CHECK(f.handler->releasing());
  CHECK_FALSE(f.handler->release_ended());
  CHECK(f.handler->release_ended());
  CHECK_FALSE(f.handler->releasing());
  CHECK(f.handler->store().read_locks() == 0);
  CHECK(f.handler->store().pinned_bytes() == 0);
}

TEST_CASE("layouts: each registered layout keeps a slab; one more than L1 has slabs for is refused, the others go on") {
  Fixture f;
  f.config.l1_size = 2 * 65536;
  f.config.l1_slab_size = 65536;  // 2 slabs
  f.rebuild();
  f.register_worker();  // 16 KiB chunks
  server::SessionState second, third;
  f.hello(second, Role::worker, 3);
  f.hello(third, Role::worker, 4);
  RegisterKvCacheRequest r;
  r.ns = ns;
  r.model = "test-model";
  r.layout = layout();
  r.layout.num_layers = 3;  // 24 KiB chunks
  r.layout.layers.resize(3);
  f.call(second, r);
  r.layout.num_layers = 1;  // 8 KiB chunks: a third layout
  r.layout.layers.resize(1);
  auto e = f.error(third, r);
  CHECK(e.code == code(errc::bad_request));
  CHECK(e.message.find("L1 has 2 slabs and 2 other KV layouts are registered") != std::string::npos);
  CHECK(e.message.find("--l1-slab-size") != std::string::npos);
  // The same layout as one registered shares its class.
  r.layout = layout();
  f.call(third, r);
  CHECK(f.handler->registrations() == 3);
  CHECK(f.store(hashes(2)).stored_chunks == 2);
  CHECK(f.stat("l1_layouts") == 1);
}

TEST_CASE("a data path down for good: PING says why, STORE and RETRIEVE are refused at once, STATS counts it") {
  Fixture f;
  f.register_worker();
  const auto h = hashes(4);
  REQUIRE(f.store(h).stored_chunks == 4);
  CHECK(f.call(f.worker, PingRequest{}).data_path_error == "");
  CHECK(f.stat("data_path_down") == 0);

  const std::string why = "the server's CUDA context on CUDA device 0 failed: cudaErrorIllegalAddress";
  f.null_engine.set_fault(Error(errc::server_error, why));
  CHECK(f.call(f.worker, PingRequest{}).data_path_error == why);
  CHECK(f.call(f.scheduler, PingRequest{}).data_path_error == "");  // no registration: nothing to move
  const std::uint64_t jobs = f.null_engine.jobs();
  const auto st = Fixture::transfer<StoreRequest>(hashes(2, 9));
  const auto rt = Fixture::transfer<RetrieveRequest>({h.begin(), h.begin() + 2});
  for (const auto& e : {f.error(f.worker, st), f.error(f.worker, rt)}) {
    CHECK(e.code == code(errc::server_error));
    CHECK(e.message.find(why) != std::string::npos);
    CHECK(e.message.find("recompute") != std::string::npos);
  }
  CHECK(f.null_engine.jobs() == jobs);  // nothing was submitted
  CHECK(f.stat("data_path_down") == 1);
  CHECK(f.stat("transfers_refused_data_path") == 2);
  // Lookups still answer from the index: the scheduler's view is intact.
  CHECK(f.sync_lookup(h) == 4);
  CHECK(f.stat("store_entries") == 4);  // nothing was lost or half-written

  f.null_engine.set_fault({});  // (a restarted server, in effect)
  CHECK(f.call(f.worker, PingRequest{}).data_path_error == "");
  CHECK(f.stat("data_path_down") == 0);
}
