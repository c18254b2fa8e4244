// End to end: the real kvlink-server process, both adapters, a memfd KV
// cache whose bytes are checked. Every block that comes back from the
// server is verified against the per-token pattern (tools/sim/workload.hpp),
// so a wrong block, offset, layer or plane fails. Faults (SIGKILL, SIGSTOP)
// hit the server while an engine thread keeps serving requests with
// blocking calls; no call may outlast its deadline. The last tests run
// kvlink-engine-sim itself as a process, in the orders reality produces
// (engine before server, a planned restart).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <asio/use_future.hpp>
#include <atomic>
#include <concepts>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <optional>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/unique_fd.hpp"
#include "adapter_fixture.hpp"
#include "e2e_fixture.hpp"
#include "child.hpp"
#include "server_process.hpp"
#include "sim/workload.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using kvlink::test::Child;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::eventually;
using namespace kvlink::test::e2e;

namespace {

// An engine thread written like a non-coroutine engine: per request, a
// lookup, a blocking retrieve of the hit (verified block by block; blocks
// that failed to load are recomputed), compute, a blocking store, then
// get_finished frees the blocks. It records, never asserts: the test
// thread checks its counters.
class Engine {
 public:
  Engine(Fixture& f, sim::WorkloadConfig w) : f_(f), kv_(f.kv.view()), gen_(w), alloc_(engine_blocks, w.seed) {}
  ~Engine() { stop(); }

  void start() {
    stop_ = false;
    thread_ = std::thread([this] {
      while (!stop_) one_request();
    });
  }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  // Runs `n` requests on the calling thread.
  void run(int n) {
    for (int i = 0; i < n; ++i) one_request();
  }

  std::atomic<std::uint64_t> requests{0}, hit_tokens{0}, load_error_blocks{0}, verify_failures{0};
  std::atomic<std::int64_t> max_call_us{0};
  std::string problems() {
    std::lock_guard lock(m_);
    return problems_;
  }
  double max_call_ms() const { return static_cast<double>(max_call_us.load()) / 1000.0; }

 private:
  // Ended on the client's side: the server may not have run it yet, and
  // its load errors come once it no longer can (the adapter's fence).
  static bool unanswered(std::error_code ec) { return ec == errc::timed_out || ec == errc::connection_lost; }

  template <class F>
  auto timed(F f) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = f();
    const auto us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
    if (us > max_call_us) max_call_us = us;
    return r;
  }
  void problem(const std::string& what) {
    std::lock_guard lock(m_);
    if (problems_.size() < 2000) problems_ += what + "\n";
  }

  void one_request() {
    auto req = gen_.next();
    const auto n = static_cast<std::uint32_t>(req.tokens.size());
    (void)timed([&] { return f_.scheduler->submit_lookup(req.id, req.tokens, deadline); });  // a failure: a miss
    auto st = timed([&] { return f_.scheduler->check_lookup(req.id, deadline); });
    const std::uint32_t matched = st && st->ready ? std::min(st->matched_tokens, n) : 0;
    auto blocks = alloc_.allocate(sim::blocks_for(n, block));
    if (!blocks) return problem("out of blocks");
    std::vector<bool> loaded(blocks->size(), false);
    if (matched > 0) {
      const std::vector<std::uint32_t> hit(blocks->begin(), blocks->begin() + matched / block);
      sim::poison_blocks(kv_, hit);
      std::vector<store::Token> prefix(req.tokens.begin(), req.tokens.begin() + matched);
      auto r = timed([&] { return f_.worker->submit_retrieve(f_.spec(req.id, prefix, hit), deadline); });
      auto fin = timed([&] { return f_.worker->get_finished({}, deadline); });
      auto errors = timed([&] { return f_.worker->take_load_errors(deadline); });
      std::set<std::uint32_t> failed;
      if (errors) failed.insert(errors->begin(), errors->end());
      load_error_blocks += failed.size();
      for (std::uint32_t b = 0; b < hit.size(); ++b) {
        if (failed.contains(hit[b]) || unanswered(r.error().code())) continue;  // not loaded: computed below
        if (!r) {
          problem(req.id + ": retrieve failed (" + r.error().message() + ") but block " + std::to_string(hit[b]) +
                  " is not a load error");
          continue;
        }
        if (mismatches(kv_, req.tokens, *blocks, b * block, (b + 1) * block) != 0) {
          ++verify_failures;
          problem(req.id + ": block " + std::to_string(hit[b]) + " came back wrong");
          continue;
        }
        loaded[b] = true;
        hit_tokens += block;
      }
    }
    for (std::uint32_t b = 0; b < blocks->size(); ++b)
      if (!loaded[b]) sim::fill_tokens(kv_, req.tokens, *blocks, b * block, std::min(n, (b + 1) * block));
    auto stored = timed([&] { return f_.worker->submit_store(f_.spec(req.id, req.tokens, *blocks), deadline); });
    // Like vLLM, reuse a request's blocks once get_finished reports its store.
    held_.emplace(req.id, std::move(*blocks));
    report_.push_back(req.id);
    auto fin = timed([&] { return f_.worker->get_finished(report_, deadline); });
    if (fin) {
      report_.clear();
      const auto& done = fin->stores;
      if (stored && std::find(done.begin(), done.end(), req.id) == done.end())
        problem(req.id + ": store answered but not reported finished");
      for (const auto& id : done)
        if (auto it = held_.find(id); it != held_.end()) {
          alloc_.release(it->second);
          held_.erase(it);
        }
    }
    (void)timed([&] { return f_.scheduler->end_session(req.id, deadline); });  // under chaos it may fail
    ++requests;
  }

  Fixture& f_;
  sim::KvView kv_;
  sim::RequestGenerator gen_;
  sim::BlockAllocator alloc_;
  std::map<std::string, std::vector<std::uint32_t>> held_;  // blocks of stores not yet reported finished
  std::vector<std::string> report_;                         // finished requests for the next get_finished
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex m_;
  std::string problems_;
};

// 4 prefixes of 3 chunks, each prompt 3 chunks + 1 chunk + 8 tokens.
// After a server fault: the engine saw nothing wrong it could not handle,
// no byte it loaded was wrong, and no call outlived its deadline.
void check_survived_fault(Engine& e) {
  INFO(e.problems());
  CHECK(e.problems().empty());
  CHECK(e.verify_failures == 0);
  CHECK(e.max_call_ms() < std::chrono::duration<double, std::milli>(deadline).count() + 100);
  MESSAGE("requests " << e.requests.load() << ", hit tokens " << e.hit_tokens.load() << ", load-error blocks "
                      << e.load_error_blocks.load() << ", longest call " << e.max_call_ms() << " ms");
}

sim::WorkloadConfig shared_prefixes(std::uint64_t seed = 1) {
  sim::WorkloadConfig w;
  w.seed = seed;
  w.prefixes = 4;
  w.prefix_tokens = 3 * chunk;
  w.min_prompt_tokens = w.max_prompt_tokens = 4 * chunk + 8;
  w.share_ratio = 1.0;
  return w;
}


// A number field of one of the simulator's JSON lines (NaN when absent).
double json_number(const std::string& line, const std::string& name) {
  const auto at = line.find("\"" + name + "\":");
  if (at == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  return std::stod(line.substr(at + name.size() + 3));
}

bool is_event(const std::string& line, const std::string& event) {
  return line.find("\"event\":\"" + event + "\"") != std::string::npos;
}

// A progress line reporting loaded-and-verified hit tokens above `above`.
auto hits_above(double above) {
  return [above](const std::string& l) { return is_event(l, "progress") && json_number(l, "hit_tokens") > above; };
}

// Hit tokens of the simulator's latest progress line (0 before the first).
double latest_hits(Child& sim) {
  double hits = 0;
  sim.wait_for(
      [&](const std::string& l) {
        if (is_event(l, "progress")) hits = json_number(l, "hit_tokens");
        return false;
      },
      0ms);
  return hits;
}

// The simulator's summary line ("" when it printed none).
std::string summary_of(Child& sim) {
  auto s = sim.wait_for([](const std::string& l) { return is_event(l, "summary"); }, 0ms);
  return s ? s->text : std::string();
}


}  // namespace

TEST_CASE("e2e: store, lookup, retrieve returns identical bytes (sync and two-phase; skipped tokens untouched)") {
  for (auto mode : {LookupMode::sync, LookupMode::two_phase}) {
    CAPTURE(static_cast<int>(mode));
    Fixture f;
    f.server.start();
    f.make(mode);
    const auto kv = f.kv.view();
    const auto tokens = prompt(4 * chunk + 5, 7);  // 4 full chunks and a tail
    const auto src = test::blocks(10, 9);
    sim::fill_tokens(kv, tokens, src, 0, static_cast<std::uint32_t>(tokens.size()));
    auto st = f.worker->submit_store(f.spec("a", tokens, src));
    REQUIRE_MESSAGE(st, st.error().message());
    CHECK(st->stored_chunks == 4);
    CHECK(f.matched("lookup-a", tokens) == 4 * chunk);

    const std::vector<std::uint32_t> dst{200, 31, 77, 5, 150, 64, 2, 99};  // scattered on purpose
    sim::poison_blocks(kv, dst);
    auto rt = f.worker->submit_retrieve(f.spec("b", std::vector<store::Token>(tokens.begin(), tokens.begin() + 4 * chunk), dst));
    REQUIRE_MESSAGE(rt, rt.error().message());
    CHECK(rt->retrieved_chunks == 4);
    CHECK(mismatches(kv, tokens, dst, 0, 4 * chunk) == 0);
    for (std::uint32_t i = 0; i < 8; ++i)  // byte for byte the same as the source blocks
      for (std::uint32_t layer = 0; layer < 2; ++layer)
        for (std::uint32_t plane = 0; plane < 2; ++plane)
          CHECK(std::memcmp(kv.token(layer, plane, src[i], 0), kv.token(layer, plane, dst[i], 0),
                            f.kv.lay.block_bytes()) == 0);

    // skip_first_n_tokens: the first chunk's blocks are the engine's own.
    sim::poison_blocks(kv, dst);
    auto spec = f.spec("c", std::vector<store::Token>(tokens.begin(), tokens.begin() + 4 * chunk), dst);
    spec.skip_first_n_tokens = chunk + block;  // one chunk and one block
    CHECK(f.matched("lookup-c", tokens) == 4 * chunk);
    REQUIRE(f.worker->submit_retrieve(spec));
    CHECK(mismatches(kv, tokens, dst, 0, chunk + block) == (chunk + block) * 2 * 2);  // still poisoned
    CHECK(mismatches(kv, tokens, dst, chunk + block, 4 * chunk) == 0);
  }
}

TEST_CASE("e2e: requests sharing a prefix hit it, and only it") {
  Fixture f;
  f.server.start();
  f.make();
  const auto kv = f.kv.view();
  const auto prefix = prompt(3 * chunk, 1);
  auto first = prefix, second = prefix;
  for (auto t : prompt(chunk + 3, 500)) first.push_back(t);
  for (auto t : prompt(chunk + 3, 600)) second.push_back(t);
  const auto b1 = test::blocks(0, 9);
  sim::fill_tokens(kv, first, b1, 0, static_cast<std::uint32_t>(first.size()));
  REQUIRE(f.worker->submit_store(f.spec("r1", first, b1)));
  CHECK(f.matched("r1-again", first) == 4 * chunk);
  CHECK(f.matched("r2", second) == 3 * chunk);  // the shared prefix, not the other tail
  const auto b2 = test::blocks(100, 9);
  sim::poison_blocks(kv, b2);
  const std::vector<std::uint32_t> hit(b2.begin(), b2.begin() + 6);
  auto r = f.worker->submit_retrieve(f.spec("r2", prefix, hit));
  REQUIRE_MESSAGE(r, r.error().message());
  CHECK(mismatches(kv, second, b2, 0, 3 * chunk) == 0);
  CHECK(mismatches(kv, second, b2, 3 * chunk, 3 * chunk + block) == block * 2 * 2);  // not retrieved
  // The engine computes its tail and stores: now the second tail hits too.
  sim::fill_tokens(kv, second, b2, 3 * chunk, static_cast<std::uint32_t>(second.size()));
  auto s = f.worker->submit_store(f.spec("r2", second, b2));
  REQUIRE(s);
  CHECK(s->stored_chunks == 1);  // the prefix was there already
  CHECK(s->skipped_chunks == 3);
  CHECK(f.matched("r2-again", second) == 4 * chunk);
}

TEST_CASE("e2e: a small L1 evicts: fewer hits, never a wrong byte") {
  // 12 prefixes in a random order: a large L1 keeps them all, a small one
  // (4 prompts' worth) only the most recent.
  auto workload = [](Fixture& f) {
    sim::WorkloadConfig w = shared_prefixes(3);
    w.prefixes = 12;
    Engine e(f, w);
    e.run(120);
    INFO(e.problems());
    CHECK(e.problems().empty());
    CHECK(e.verify_failures == 0);
    CHECK(e.requests == 120);
    return e.hit_tokens.load();
  };
  std::uint64_t large_hits = 0, small_hits = 0;
  {
    Fixture f("64MiB");
    f.server.start();
    f.make();
    large_hits = workload(f);
    CHECK(f.stat("evictions") == 0);
  }
  {
    Fixture f("131072");  // 16 chunk slots of 8 KiB: 4 prompts
    f.server.start();
    f.make();
    small_hits = workload(f);
    CHECK(f.stat("l1_capacity_bytes") == 16 * 8192);
    CHECK(f.stat("l1_bytes_wasted") == 0);
    CHECK(f.stat("evictions") > 0);
  }
  MESSAGE("hit tokens: large L1 " << large_hits << ", small L1 " << small_hits);
  CHECK(small_hits > 0);
  CHECK(small_hits < large_hits);
}

TEST_CASE("e2e: server SIGKILL mid-workload -> the engine keeps running, retrieves become load errors, "
          "no call outlives its deadline; after a restart hits resume") {
  Fixture f;
  f.server.start();
  f.make();
  const auto kv = f.kv.view();
  // A probe the test retrieves itself once the server is gone.
  const auto probe = prompt(2 * chunk, 900);
  const auto probe_src = test::blocks(engine_blocks, 4);
  sim::fill_tokens(kv, probe, probe_src, 0, 2 * chunk);
  REQUIRE(f.worker->submit_store(f.spec("probe", probe, probe_src)));
  CHECK(f.matched("probe-lookup", probe) == 2 * chunk);

  Engine e(f, shared_prefixes());
  e.start();
  REQUIRE(eventually([&] { return e.hit_tokens > 0; }));
  f.server.kill();
  REQUIRE(eventually([&] { return f.state_is(health::State::degraded); }, 5s));
  const auto before = e.requests.load();
  REQUIRE(eventually([&] { return e.requests >= before + 10; }));  // served while the server is down
  CHECK(f.state_is(health::State::degraded));
  e.stop();

  const auto probe_dst = test::blocks(engine_blocks + 10, 4);
  sim::poison_blocks(kv, probe_dst);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = f.worker->submit_retrieve(f.spec("probe-late", probe, probe_dst));
  CHECK(std::chrono::steady_clock::now() - t0 < deadline);
  CHECK(r.error() == errc::unhealthy);
  auto fin = f.worker->get_finished({});
  REQUIRE(fin);
  CHECK(fin->retrieves == std::vector<std::string>{"probe-late"});
  CHECK(f.worker->take_load_errors().value() == probe_dst);
  CHECK(mismatches(kv, probe, probe_dst, 0, 2 * chunk) == 2 * chunk * 2 * 2);  // untouched

  f.server.start();  // a new process on the same socket
  REQUIRE(eventually([&] { return f.state_is(health::State::healthy); }));
  CHECK(f.stat("registrations") == 1);  // re-registered by itself
  const auto hits = e.hit_tokens.load();
  e.start();
  CHECK(eventually([&] { return e.hit_tokens > hits; }));
  e.stop();
  check_survived_fault(e);
}

TEST_CASE("e2e: server SIGSTOP -> degraded within the configured timeouts, calls bounded; SIGCONT -> recovers") {
  Fixture f;
  f.server.start();
  f.make(LookupMode::two_phase);
  Engine e(f, shared_prefixes(5));
  e.start();
  REQUIRE(eventually([&] { return e.hit_tokens > 0 && f.state_is(health::State::healthy); }));
  f.server.stop();
  REQUIRE(eventually([&] { return test::process_stopped(f.server.pid()); }, 5s));
  const auto t0 = std::chrono::steady_clock::now();
  // interval 50 ms, ping timeout 100 ms, 2 failures: well under a second.
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::degraded; }, 5s));
  CHECK(std::chrono::steady_clock::now() - t0 < 1s);
  const auto before = e.requests.load();
  REQUIRE(eventually([&] { return e.requests >= before + 10; }));  // the engine is not stuck on the server
  f.server.resume();
  REQUIRE(eventually([&] { return f.state_is(health::State::healthy); }));
  const auto hits = e.hit_tokens.load();
  CHECK(eventually([&] { return e.hit_tokens > hits; }));
  e.stop();
  CHECK(f.stat("registrations") == 1);
  check_survived_fault(e);
}

TEST_CASE("e2e: kvlink-engine-sim runs against a server and reports a clean summary") {
  TempDir dir;
  const std::string ep = dir.socket();
  ServerProcess server({"--listen", ep, "--log-level", "warn", "--l1-size", "64MiB", "--no-huge-pages"});
  server.start();
  const std::string sim = ServerProcess::binary("KVLINK_ENGINE_SIM");
  std::string out;
  const int rc = test::run_command(sim + " --server " + ep + " --warmup-ms 200 --duration-s 3 --rate 50 2>/dev/null",
                                   out);
  INFO(out);
  CHECK(rc == 0);
  std::string summary;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);)
    if (line.find("\"event\":\"summary\"") != std::string::npos) summary = line;
  REQUIRE(!summary.empty());
  auto field = [&](const std::string& name) {
    const auto at = summary.find("\"" + name + "\":");
    REQUIRE_MESSAGE(at != std::string::npos, name);
    return std::stod(summary.substr(at + name.size() + 3));
  };
  CHECK(field("verify_failures") == 0);
  CHECK(field("requests") > 0);
  CHECK(field("hit_tokens") > 0);
  CHECK(field("retrieved_chunks") > 0);
  CHECK(field("max_call_ms") < field("deadline_ms"));
  CHECK(out.find("\"pings_during_warmup\":0") != std::string::npos);  // the gate held during warmup
  CHECK(out.find(R"("link":"worker","event":"state","from":"warming","to":"healthy")") != std::string::npos);
}

// A STORE whose deadline passed while the server was stopped is reported
// finished, so the engine reuses its blocks. After SIGCONT the server must
// not copy them any more (its fence passed), or it would store the reused
// blocks' bytes under the first request's keys.
TEST_CASE("e2e: a STORE that timed out during SIGSTOP must not copy the engine's blocks after SIGCONT") {
  Fixture f;
  f.server.start();
  f.make();
  const auto kv = f.kv.view();
  f.scheduler->ready();
  REQUIRE(eventually([&] { return f.state_is(health::State::healthy); }));
  f.server.stop();
  REQUIRE(eventually([&] { return test::process_stopped(f.server.pid()); }, 5s));
  const auto c = prompt(2 * chunk, 300);
  const auto blocks = test::blocks(40, 4);
  sim::fill_tokens(kv, c, blocks, 0, 2 * chunk);
  auto s = f.worker->submit_store(f.spec("c", c, blocks));
  REQUIRE(s.error() == errc::timed_out);  // the engine may reuse its blocks now
  auto fin = f.worker->get_finished({"c"});
  REQUIRE(fin);
  REQUIRE(fin->stores == std::vector<std::string>{"c"});
  const auto d = prompt(2 * chunk, 700);
  sim::fill_tokens(kv, d, blocks, 0, 2 * chunk);  // reused for another request
  f.server.resume();
  REQUIRE(eventually([&] { return f.state_is(health::State::healthy); }));
  const auto m = f.matched("c-lookup", c);
  CHECK(m == 0);  // dropped at its fence
  CHECK(f.stat("transfers_fenced") == 1);
  if (m > 0) {  // if it had been stored, what the server returns for c must still be c's bytes
    const auto dst = test::blocks(100, m / block);
    sim::poison_blocks(kv, dst);
    auto r = f.worker->submit_retrieve(f.spec("c-read", std::vector<store::Token>(c.begin(), c.begin() + m), dst));
    REQUIRE(r);
    CHECK(mismatches(kv, c, dst, 0, m) == 0);
  }
}

// The order reality often produces: the engine starts (and registers its KV
// cache) before the server exists. The simulator registers once, does not
// call ready(), and must get hits soon after the server listens: the
// adapter sends the registration when the server appears and its
// acknowledgement opens the worker's gate.
TEST_CASE("e2e: engine before server -> registered as soon as the server listens, hits without ready()") {
  TempDir dir;
  const std::string ep = dir.socket();
  ServerProcess server({"--listen", ep, "--log-level", "warn", "--l1-size", "64MiB", "--no-huge-pages"});
  Child sim({ServerProcess::binary("KVLINK_ENGINE_SIM"), "--server", ep, "--warmup-ms", "100", "--duration-s", "4",
             "--rate", "100", "--prefixes", "2", "--share-ratio", "1", "--progress-ms", "50",
             "--health-interval-ms", "100", "--health-timeout-ms", "200", "--log-level", "error"});
  // Its register_kv_caches came back (no server: call_timeout, 1 s) and the
  // engine carries on; only then does the server start.
  auto pending = sim.wait_for([](const std::string& l) { return is_event(l, "register_pending"); }, 10s);
  REQUIRE_MESSAGE(pending, sim.output());
  CHECK(pending->text.find("not connected") != std::string::npos);
  CHECK(!sim.wait_for(hits_above(0), 0ms));
  server.start();
  const auto listening = std::chrono::steady_clock::now();
  auto hit = sim.wait_for(hits_above(0), 10s);
  REQUIRE_MESSAGE(hit, sim.output());
  const auto after = std::chrono::duration_cast<std::chrono::milliseconds>(hit->at - listening);
  MESSAGE("first verified hit " << after.count() << " ms after the server listened");
  CHECK(after < 2s);
  CHECK(test::server_stat(ep, "registrations") == 1);  // the one the engine asked for, while it runs

  const int rc = sim.wait_exit(30s);
  const std::string out = sim.output();
  INFO(out);
  CHECK(rc == 0);
  const std::string summary = summary_of(sim);
  REQUIRE(!summary.empty());
  CHECK(json_number(summary, "verify_failures") == 0);
  CHECK(json_number(summary, "hit_tokens") > 0);
  CHECK(json_number(summary, "reregistrations") == 0);  // the first acknowledgement is no re-registration
  // The server did not hold the registration when the worker connected; the
  // adapter sent it, and its acknowledgement (not a ready() call) opened the gate.
  CHECK(out.find(R"("link":"worker","event":"connected")") != std::string::npos);
  CHECK(out.find(R"("registered":false)") != std::string::npos);
  CHECK(out.find(R"("link":"worker","event":"gate","reason":"register acknowledged")") != std::string::npos);
  CHECK(out.find("engine ready") == std::string::npos);
}

// SIGTERM is a planned restart: the server stops listening at once (its
// socket path is free for a replacement), tells its clients it is draining,
// finishes what is in flight and exits 0. The engine moves to the
// replacement without ever calling the link degraded or loading a wrong byte.
TEST_CASE("e2e: SIGTERM planned restart mid-workload -> no degraded state, no wrong byte, hits resume") {
  TempDir dir;
  const std::string ep = dir.socket();
  const std::string path = ep.substr(std::string("unix:").size());
  const std::vector<std::string> args{"--listen", ep, "--log-level", "warn", "--l1-size", "64MiB",
                                      "--no-huge-pages"};
  std::vector<std::string> first{ServerProcess::binary("KVLINK_SERVER")};
  first.insert(first.end(), args.begin(), args.end());
  Child old_server(first);
  REQUIRE_MESSAGE(old_server.wait_for("kvlink-server ready", 10s), old_server.output());
  Child sim({ServerProcess::binary("KVLINK_ENGINE_SIM"), "--server", ep, "--warmup-ms", "100", "--duration-s", "5",
             "--rate", "100", "--prefixes", "2", "--share-ratio", "1", "--progress-ms", "50",
             "--health-interval-ms", "100", "--health-timeout-ms", "200", "--log-level", "error"});
  auto hit = sim.wait_for(hits_above(0), 10s);
  REQUIRE_MESSAGE(hit, sim.output());

  old_server.signal(SIGTERM);
  REQUIRE(eventually([&] { return !std::filesystem::exists(path); }, 5s));  // listening stopped
  ServerProcess replacement(args);
  replacement.start();  // right away, while the old one may still drain
  const std::size_t from = sim.line_count();
  const double hits_then = latest_hits(sim);
  CHECK(old_server.wait_exit(15s) == 0);
  CHECK(sim.wait_for(hits_above(hits_then), 10s, from));  // hits from the replacement

  const int rc = sim.wait_exit(30s);
  const std::string out = sim.output();
  INFO(out);
  INFO(old_server.output());
  CHECK(rc == 0);
  const std::string summary = summary_of(sim);
  REQUIRE(!summary.empty());
  CHECK(json_number(summary, "verify_failures") == 0);
  CHECK(out.find(R"("to":"degraded")") == std::string::npos);
  CHECK(out.find("draining") != std::string::npos);  // the notice reached the engine
  CHECK(json_number(summary, "reregistrations") >= 1);  // the replacement holds the KV cache too
}

// Only a refusal ends a registration: the simulator then stops with the
// server's reason, whether the refusal answered its register call (server
// first) or came later, when the adapter sent it to a server that appeared
// after the engine.
TEST_CASE("e2e: kvlink-engine-sim exits 2 with the server's reason when its KV cache registration is refused") {
  TempDir dir;
  const std::string ep = dir.socket();
  // 4 layers x 2 planes x 2 heads x 64 x 2 bytes x 256 tokens: a 512 KiB slot does not fit a 64 KiB L1.
  ServerProcess server({"--listen", ep, "--log-level", "warn", "--l1-size", "65536", "--no-huge-pages"});
  const std::string sim = ServerProcess::binary("KVLINK_ENGINE_SIM");
  SUBCASE("server first: the register call is refused") {
    server.start();
    std::string out;
    const int rc = test::run_command(sim + " --server " + ep + " --warmup-ms 0 --duration-s 3 --log-level off", out);
    INFO(out);
    CHECK(rc == 2);
    CHECK(out.find("could not register the KV cache") != std::string::npos);
    CHECK(out.find("more than all of L1 (65536 bytes); raise --l1-size") != std::string::npos);  // the server's reason
    CHECK(out.find(R"("event":"summary")") == std::string::npos);       // it did not run
  }
  SUBCASE("engine first: refused when the adapter sends it to the server that came") {
    Child c({sim, "--server", ep, "--warmup-ms", "0", "--duration-s", "30", "--health-interval-ms", "100",
             "--log-level", "off"});
    REQUIRE_MESSAGE(c.wait_for([](const std::string& l) { return is_event(l, "register_pending"); }, 10s),
                    c.output());
    server.start();
    const int rc = c.wait_exit(10s);  // well before --duration-s
    const std::string out = c.output();
    INFO(out);
    CHECK(rc == 2);
    CHECK(out.find("stopping: registration refused by the server") != std::string::npos);
    CHECK(out.find("more than all of L1 (65536 bytes); raise --l1-size") != std::string::npos);
  }
}
