// Store benchmarks. Control plane: SYNC_LOOKUP of a 64k-token prompt (256
// chunks) round trip against PING round trip, both over a unix socket to an
// in-process kvlink::server::Server on its own io_context thread, measured
// in the same run (target: lookup p50 <= 2 x ping p50). Index: pure KvStore
// lookups and inserts per second, and insert cost when every insert evicts.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/executor_work_guard.hpp>
#include <cstdio>
#include <filesystem>
#include <map>
#include <thread>
#include <unistd.h>

#include "kvlink/log.hpp"
#include "kvlink/net/connection.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/store/kv_store.hpp"

using namespace kvlink;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t prompt_chunks = 256;  // 64k tokens of 256-token chunks
std::map<std::string, double> p50_us;       // per benchmark, last run

std::vector<wire::ChunkHash> prompt_hashes() {
  std::vector<store::Token> t(prompt_chunks * 256);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(i * 2654435761u);
  return store::chunk_hashes(t, 256);
}

// An in-process server on a unix socket, a worker that stored the prompt,
// and a scheduler connection driven from the benchmark thread.
struct Rig {
  std::string dir;
  server::ServerConfig config;
  asio::io_context server_io{1};
  std::unique_ptr<server::Server> server;
  std::thread server_thread;
  asio::io_context client_io{1};
  std::shared_ptr<net::Connection> scheduler;
  std::shared_ptr<net::Connection> worker;
  std::uint64_t ns = store::namespace_id({"bench-model", 1, ""});
  std::vector<wire::ChunkHash> hashes = prompt_hashes();

  Rig() {
    char tmpl[] = "/tmp/kvlink-bench-XXXXXX";
    dir = ::mkdtemp(tmpl);
    config.listen = {"unix:" + dir + "/s.sock"};
    config.l1_size = 1u << 30;
    server = std::make_unique<server::Server>(server_io, config);
    server->start();
    server_thread = std::thread([this] {
      auto guard = asio::make_work_guard(server_io);
      server_io.run();
    });
    scheduler = connect(wire::Role::scheduler);
    worker = connect(wire::Role::worker);
    wire::RegisterKvCacheRequest reg;
    reg.ns = ns;
    reg.model = "bench-model";
    auto& l = reg.layout;
    l.num_layers = 32;
    l.num_blocks = 8192;
    l.block_size = 16;
    l.num_kv_heads = 1;
    l.head_size = 64;
    l.dtype_size = 2;
    l.block_stride = l.block_bytes();
    l.plane_stride = l.block_bytes() * l.num_blocks;
    l.region_bytes = l.plane_stride * 2;
    l.layers.resize(32);
    // 32 layers x 2 planes x 16 blocks x 2 KiB = 2 MiB per chunk: 1 GiB holds 512
    // (mapped, never touched: the fake transfer engine copies nothing).
    check(call(worker, reg).first, "REGISTER_KV_CACHE");
    wire::StoreRequest st;
    st.ns = ns;
    st.hashes = hashes;
    st.block_ids.resize(hashes.size() * 16);
    for (std::size_t i = 0; i < st.block_ids.size(); ++i) st.block_ids[i] = static_cast<std::uint32_t>(i % 8192);
    auto [ec, r] = call(worker, st);
    check(ec, "STORE");
    if (r.stored_chunks != prompt_chunks) {
      std::fprintf(stderr, "bench: stored %u of %zu chunks\n", r.stored_chunks, prompt_chunks);
      std::exit(1);
    }
  }
  ~Rig() {
    scheduler->close();
    worker->close();
    client_io.run_for(100ms);
    asio::post(server_io, [this] { server->stop(); });
    server_io.stop();
    server_thread.join();
    server.reset();
    std::filesystem::remove_all(dir);
  }
  static void check(std::error_code ec, const char* what) {
    if (ec) {
      std::fprintf(stderr, "bench: %s failed: %s\n", what, ec.message().c_str());
      std::exit(1);
    }
  }
  std::shared_ptr<net::Connection> connect(wire::Role role) {
    net::Endpoint ep = net::parse_endpoint(config.listen[0]).value();  // the server parsed it
    wire::HelloRequest h;
    h.role = role;
    h.instance_id = net::random_instance_id();
    h.client_name = "bench-store";
    std::optional<net::ConnectResult> result;
    asio::co_spawn(client_io, net::connect(client_io.get_executor(), ep, h, 5s),
                   [&](std::exception_ptr, net::ConnectResult r) { result = std::move(r); });
    client_io.restart();
    while (!result) client_io.run_one();
    if (result->error) {
      std::fprintf(stderr, "bench: %s\n", result->error.message().c_str());
      std::exit(1);
    }
    return result->connection;
  }
  // One request, one reply, driven on this thread.
  template <class M>
  std::pair<std::error_code, typename M::reply_type> call(const std::shared_ptr<net::Connection>& c, const M& m) {
    std::optional<std::pair<std::error_code, typename M::reply_type>> out;
    c->async_call(m, 5s, [&](std::error_code ec, typename M::reply_type r) { out.emplace(ec, std::move(r)); });
    client_io.restart();
    while (!out) client_io.run_one();
    return std::move(*out);
  }
};

Rig& rig() {
  static Rig r;
  return r;
}

template <class M>
void rtt(benchmark::State& state, const M& request, const char* name) {
  Rig& r = rig();
  std::vector<double> us;
  us.reserve(1 << 16);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    auto [ec, reply] = r.call(r.scheduler, request);
    const auto t1 = Clock::now();
    if (ec) {
      state.SkipWithError(ec.message().c_str());
      break;
    }
    benchmark::DoNotOptimize(reply);
    if (us.size() < us.capacity()) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  if (us.empty()) return;
  std::sort(us.begin(), us.end());
  const double p50 = us[us.size() / 2];
  state.counters["p50_us"] = p50;
  state.counters["p99_us"] = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  p50_us[name] = p50;
}

void BM_ping_rtt(benchmark::State& state) { rtt(state, wire::PingRequest{}, "ping"); }

void BM_sync_lookup_rtt_256_chunks(benchmark::State& state) {
  Rig& r = rig();
  wire::SyncLookupRequest req;
  req.ns = r.ns;
  req.session_id = 1;
  req.hashes = r.hashes;
  auto [ec, reply] = r.call(r.scheduler, req);
  if (ec || reply.matched_chunks != prompt_chunks) {
    state.SkipWithError("the prompt is not fully stored");
    return;
  }
  rtt(state, req, "lookup");
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(prompt_chunks));
}

// ---- pure index ----------------------------------------------------------------

wire::ChunkHash hash_of(std::uint64_t i) { return wire::ChunkHash{i * 0x9E3779B97F4A7C15ull, ~i}; }

// Chunks of 64 bytes: many slots, and the data is never touched.
constexpr store::Writer small_chunks{64};

bool insert(store::KvStore& kv, const store::ChunkKey& k, const store::Writer& w = small_chunks) {
  store::Slot s = 0;
  std::uint64_t g = 0;
  if (kv.reserve(k, w, {}, s, g) != store::KvStore::Reserve::reserved) return false;
  kv.commit(k, g, {});
  return true;
}

bool full(const store::L1Pool& pool) {
  return pool.free_slabs() == 0 && pool.bytes_used() + 64 > std::uint64_t{pool.num_slabs()} * pool.slab_bytes();
}

void BM_index_lookup_256(benchmark::State& state) {
  store::L1Pool pool(std::uint64_t{1} << 20, false);  // 16k slots
  store::KvStore kv(pool, {});
  std::vector<wire::ChunkHash> hs;
  for (std::uint64_t i = 0; i < 10000; ++i) {
    insert(kv, {1, hash_of(i), 0});
    if (i < prompt_chunks) hs.push_back(hash_of(i));
  }
  const bool locking = state.range(0) != 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(kv.lookup(1, 1, hs, {}, locking ? std::optional<store::Holder>(7) : std::nullopt));
    if (locking)
      for (const auto& h : hs) kv.release_one({1, h, 0}, 7);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(hs.size()));
}

void BM_index_insert(benchmark::State& state) {
  store::L1Pool pool(std::uint64_t{64} << 20, false);  // 1M slots
  store::KvStore kv(pool, {});
  std::uint64_t i = 0;
  for (auto _ : state) {
    insert(kv, {1, hash_of(i++), 0});
    if (full(pool)) {
      state.PauseTiming();
      kv.clear();
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}

// Every insert finds L1 full and evicts the least recently used entry.
void BM_insert_evicting(benchmark::State& state) {
  store::L1Pool pool(std::uint64_t{4096} * 64, false);
  store::KvStore kv(pool, {});
  std::uint64_t i = 0;
  while (!full(pool)) insert(kv, {1, hash_of(i++), 0});
  // A quarter of the entries locked: eviction must pass them by.
  for (std::uint64_t j = 0; j < 1024; ++j) kv.lock({1, hash_of(j), 0}, 7, {});
  const auto before = kv.stats().evictions;
  for (auto _ : state) insert(kv, {1, hash_of(i++), 0});
  state.SetItemsProcessed(state.iterations());
  state.counters["evictions_per_insert"] =
      static_cast<double>(kv.stats().evictions - before) / static_cast<double>(state.iterations());
}

// Watermark eviction in tick(): 90 % -> 50 % of 64k slots, per entry evicted.
void BM_tick_watermark_eviction(benchmark::State& state) {
  store::L1Pool pool(std::uint64_t{65536} * 64, false);
  store::StoreConfig cfg;
  cfg.high_watermark = 0.9;
  cfg.low_watermark = 0.5;
  store::KvStore kv(pool, cfg);
  std::uint64_t i = 0, evicted = 0;
  for (auto _ : state) {
    state.PauseTiming();
    while (pool.bytes_used() < 62000 * 64) insert(kv, {1, hash_of(i++), 0});
    const auto before = kv.stats().evictions;
    state.ResumeTiming();
    kv.tick({});
    evicted += kv.stats().evictions - before;
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(evicted));
}

// A second layout arrives at a full L1 held by the first: each of its
// inserts either takes a whole slab from the first layout (evicting that
// slab's chunks) or, at its share, evicts its own oldest chunk. Against
// BM_insert_evicting (one layout), the cost of sharing L1 between layouts.
void BM_insert_second_layout(benchmark::State& state) {
  store::L1Pool pool(std::uint64_t{4096} * 64, false);  // 8 slabs of 512 chunks of 64 bytes
  store::KvStore kv(pool, {});
  std::uint64_t i = 0;
  const store::Writer other{128};
  for (auto _ : state) {
    state.PauseTiming();
    kv.clear();
    while (!full(pool)) insert(kv, {1, hash_of(i++), 0});
    const auto before = kv.stats().slabs_moved;
    state.ResumeTiming();
    // Enough inserts to take its share (4 slabs of 256) and evict as much again.
    for (int n = 0; n < 2048; ++n) insert(kv, {2, hash_of(i++), 0}, other);
    state.counters["slabs_moved"] = static_cast<double>(kv.stats().slabs_moved - before);
  }
  state.SetItemsProcessed(state.iterations() * 2048);
}

}  // namespace

BENCHMARK(BM_ping_rtt)->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_sync_lookup_rtt_256_chunks)->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_index_lookup_256)->Arg(0)->Arg(1)->ArgName("lock");
BENCHMARK(BM_index_insert)->Iterations(500000);
BENCHMARK(BM_insert_evicting);
BENCHMARK(BM_insert_second_layout)->Iterations(50);
BENCHMARK(BM_tick_watermark_eviction)->Iterations(20);

int main(int argc, char** argv) {
  log::set_level(log::Level::warn);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (p50_us.count("ping") && p50_us.count("lookup")) {
    const double ratio = p50_us["lookup"] / p50_us["ping"];
    std::printf("lookup_rtt (SYNC_LOOKUP, %zu chunks) p50 %.1f us; reference ping_rtt p50 %.1f us; ratio %.2fx "
                "(target <= 2x): %s\n",
                prompt_chunks, p50_us["lookup"], p50_us["ping"], ratio, ratio <= 2.0 ? "PASS" : "FAIL");
  }
  return 0;
}
