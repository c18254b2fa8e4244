// bench-transfer-cpu: the CPU KV data path end to end. An in-process
// kvlink::server::Server running the CpuTransferEngine listens on a unix
// socket; a worker client registers a memfd KV cache (passed with
// SCM_RIGHTS) and times STORE and RETRIEVE requests. PERF.md's reference,
// measured in the same run: one contiguous memcpy of the same bytes, timed
// right before each request (paired, so load lands on both sides).
//
// Shape (PERF.md cpu_store / cpu_retrieve): 32 layers, 16-token blocks, K
// and V, 8 kv heads x 128 x 2 bytes = 32 KiB per block per plane, vLLM's
// [2, num_blocks, ...] layout per layer; chunks of 256 tokens (32 MiB each),
// 4 chunks (128 MiB) per request. The summary prints GB/s, the ratio to the
// memcpy (target >= 0.8) and per-request latency.
//
// End-to-end request latency through the adapters (SchedulerAdapter +
// WorkerAdapter on a Runtime, blocking calls as a non-coroutine engine
// makes them): a hit request (lookup, retrieve of N chunks, store that
// finds them present, get_finished, end of session) and a miss request
// (lookup, store of N new chunks, get_finished, end of session), p50/p99,
// against a reference from the same run: one memcpy of the request's bytes
// plus one PING round trip.
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/log.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/net/connection.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/transfer/cpu_engine.hpp"
#include "kvlink/transfer/kv_memfd.hpp"

using kvlink::bench::run_until_done;

namespace {

using namespace std::chrono;
using kvlink::net::Clock;
namespace wire = kvlink::wire;

constexpr std::uint32_t layers = 32, block_size = 16, heads = 8, head_size = 128, dtype = 2;
constexpr std::uint32_t chunk_tokens = 256, blocks_per_chunk = chunk_tokens / block_size;
constexpr std::uint32_t chunks_per_request = 4;
constexpr std::uint32_t num_blocks = blocks_per_chunk * chunks_per_request * 2;  // room to retrieve elsewhere
constexpr std::uint64_t block_bytes = std::uint64_t{block_size} * heads * head_size * dtype;  // 32 KiB
constexpr std::uint64_t chunk_bytes = std::uint64_t{layers} * 2 * blocks_per_chunk * block_bytes;  // 32 MiB
constexpr std::uint64_t request_bytes = chunk_bytes * chunks_per_request;
constexpr auto call_timeout = seconds(30);

wire::KvLayout make_layout() {
  wire::KvLayout l;
  l.num_layers = layers;
  l.num_blocks = num_blocks;
  l.block_size = block_size;
  l.num_kv_heads = heads;
  l.head_size = head_size;
  l.dtype_size = dtype;
  l.block_stride = block_bytes;
  l.plane_stride = block_bytes * num_blocks;
  const std::uint64_t layer_bytes = 2 * l.plane_stride;
  l.region_bytes = layer_bytes * layers;
  l.layers.resize(layers);
  for (std::uint32_t i = 0; i < layers; ++i) l.layers[i].offset = i * layer_bytes;
  return l;
}

struct Figures {
  std::vector<double> seconds;      // per request
  std::vector<double> ref_seconds;  // the memcpy timed just before each request (paired runs)
  double gbps() const {
    if (seconds.empty()) return 0;
    auto s = seconds;
    std::sort(s.begin(), s.end());
    return static_cast<double>(request_bytes) / s[s.size() / 2] / 1e9;  // at the median request
  }
  double p50_ms() const { return pct_ms(0.5); }
  double p99_ms() const { return pct_ms(0.99); }
  double pct_ms(double p) const {
    if (seconds.empty()) return 0;
    auto s = seconds;
    std::sort(s.begin(), s.end());
    return s[std::min(s.size() - 1, static_cast<std::size_t>(p * static_cast<double>(s.size())))] * 1e3;
  }
  // Paired runs: the median of memcpy time / request time, each request
  // against the memcpy timed right before it, so load from other processes
  // lands on both sides instead of on one.
  double paired_ratio() const {
    std::vector<double> r;
    for (std::size_t i = 0; i < seconds.size() && i < ref_seconds.size(); ++i) r.push_back(ref_seconds[i] / seconds[i]);
    if (r.empty()) return 0;
    std::sort(r.begin(), r.end());
    return r[r.size() / 2];
  }
  double ref_gbps() const {
    Figures ref{ref_seconds, {}};
    return ref.gbps();
  }
};
std::map<std::string, Figures> g_figures;

// PERF.md's reference: one contiguous memcpy of `bytes`, warm buffers.
class CopyReference {
 public:
  explicit CopyReference(std::uint64_t bytes) : bytes_(bytes), src_(map(bytes)), dst_(map(bytes)) {
    std::memset(src_, 1, bytes_);
    std::memcpy(dst_, src_, bytes_);  // fault in
  }
  ~CopyReference() {
    ::munmap(src_, bytes_);
    ::munmap(dst_, bytes_);
  }
  CopyReference(const CopyReference&) = delete;
  CopyReference& operator=(const CopyReference&) = delete;
  double seconds() {
    const auto t0 = Clock::now();
    std::memcpy(dst_, src_, bytes_);
    benchmark::ClobberMemory();
    return duration<double>(Clock::now() - t0).count();
  }

 private:
  static std::byte* map(std::uint64_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    return static_cast<std::byte*>(p);
  }
  std::uint64_t bytes_;
  std::byte* src_;
  std::byte* dst_;
};

// The server on its own io thread, copying with the CPU engine.
class ServerThread {
 public:
  explicit ServerThread(unsigned threads) : engine_(io_.get_executor(), threads) {
    char tmpl[] = "/tmp/kvlink-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    cfg_.listen = {"unix:" + dir_ + "/kvlink.sock"};
    cfg_.l1_size = request_bytes * 2;
    cfg_.l1_slab_size = cfg_.l1_size;  // one layout: one slab
    cfg_.chunk_size = chunk_tokens;
    server_ = std::make_unique<kvlink::server::Server>(io_, cfg_, engine_);
    server_->start();
    endpoint_ = kvlink::net::parse_endpoint(server_->endpoints().at(0)).value();
    thread_ = std::thread([this] { io_.run(); });
  }
  ~ServerThread() {
    asio::post(io_, [this] { server_->stop(); });
    guard_.reset();
    thread_.join();
    server_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  const kvlink::net::Endpoint& endpoint() const { return endpoint_; }

 private:
  asio::io_context io_{1};
  asio::executor_work_guard<asio::io_context::executor_type> guard_{io_.get_executor()};
  kvlink::server::ServerConfig cfg_;
  kvlink::transfer::CpuTransferEngine engine_;
  std::string dir_;
  std::unique_ptr<kvlink::server::Server> server_;
  kvlink::net::Endpoint endpoint_;
  std::thread thread_;
};

ServerThread* g_server = nullptr;


template <class M>
asio::awaitable<typename M::reply_type> call(std::shared_ptr<kvlink::net::Connection> c, M m, int fd = -1) {
  using asio::experimental::as_tuple;
  // Two statements, not `fd >= 0 ? co_await a : co_await b`: g++ 12 copies
  // the bytes of a conditional's co_await result, so a reply holding a
  // short string (PING's) pointed into the freed coroutine frame.
  std::tuple<std::error_code, typename M::reply_type> result;
  if (fd >= 0)
    result = co_await c->async_call_with_fd(std::move(m), fd, call_timeout, as_tuple(asio::use_awaitable));
  else
    result = co_await c->async_call(std::move(m), call_timeout, as_tuple(asio::use_awaitable));
  auto& [ec, r] = result;
  if (ec) throw std::runtime_error(fmt::format("{} failed: {}", wire::opcode_name(static_cast<std::uint8_t>(M::opcode)),
                                               c->last_error_message().empty() ? ec.message() : c->last_error_message()));
  co_return std::move(r);
}

// A worker: its memfd KV cache (filled), a registered connection, a prompt.
struct Worker {
  asio::io_context io{1};
  std::shared_ptr<kvlink::net::Connection> conn;
  wire::KvLayout layout = make_layout();
  kvlink::transfer::KvMemfd kv;
  std::uint64_t ns = kvlink::store::namespace_id({"bench-model", 1, ""});
  std::vector<wire::ChunkHash> hashes;

  Worker() {
    auto created = kvlink::transfer::create_kv_memfd(layout, {.name = "bench-kv-cache"});
    if (!created) throw std::runtime_error(created.error().message());
    kv = std::move(*created);
    std::byte* base = kv.memory.get();
    for (std::uint64_t i = 0; i < layout.region_bytes; i += 64) base[i] = static_cast<std::byte>(i / 64);
    wire::HelloRequest hello;
    hello.role = wire::Role::worker;
    hello.instance_id = kvlink::net::random_instance_id();
    hello.client_name = "bench-transfer-cpu";
    auto r = run_until_done(io, kvlink::net::connect(io.get_executor(), g_server->endpoint(), hello, seconds(5)));
    if (r.error) throw std::runtime_error(r.error.message());
    conn = r.connection;
    wire::RegisterKvCacheRequest reg;
    reg.ns = ns;
    reg.model = "bench-model";
    reg.layout = layout;
    run_until_done(io, call(conn, reg, kv.fd.get()));
    std::vector<kvlink::store::Token> tokens(chunk_tokens * chunks_per_request);
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<kvlink::store::Token>(i);
    hashes = kvlink::store::chunk_hashes(tokens, chunk_tokens);
  }
  ~Worker() { kvlink::bench::disconnect(io, conn); }
  std::vector<std::uint32_t> blocks(std::uint32_t first, std::uint32_t chunks) const {
    std::vector<std::uint32_t> v(chunks * blocks_per_chunk);
    for (std::uint32_t i = 0; i < v.size(); ++i) v[i] = first + i;
    return v;
  }
  wire::StoreRequest store_request(std::uint32_t chunks) const {
    wire::StoreRequest s;
    s.ns = ns;
    s.hashes.assign(hashes.begin(), hashes.begin() + chunks);
    s.block_ids = blocks(0, chunks);
    return s;
  }
  wire::RetrieveRequest retrieve_request(std::uint32_t chunks) const {
    wire::RetrieveRequest r;
    r.ns = ns;
    r.hashes.assign(hashes.begin(), hashes.begin() + chunks);
    r.block_ids = blocks(num_blocks / 2, chunks);
    return r;
  }
  // One timed STORE of `chunks` (CLEAR first, untimed, so it copies them all).
  double timed_store(std::uint32_t chunks) {
    run_until_done(io, call(conn, wire::ClearRequest{}));
    const auto t0 = Clock::now();
    auto r = run_until_done(io, call(conn, store_request(chunks)));
    const double s = duration<double>(Clock::now() - t0).count();
    if (r.stored_chunks != chunks) throw std::runtime_error(fmt::format("stored {} of {}", r.stored_chunks, chunks));
    return s;
  }
  double timed_retrieve(std::uint32_t chunks) {
    const auto t0 = Clock::now();
    auto r = run_until_done(io, call(conn, retrieve_request(chunks)));
    const double s = duration<double>(Clock::now() - t0).count();
    if (r.retrieved_chunks != chunks) throw std::runtime_error("retrieve short");
    return s;
  }
};

void BM_cpu_store(benchmark::State& state) {
  Worker w;
  w.timed_store(chunks_per_request);  // warm up: L1 slots faulted in
  CopyReference ref(request_bytes);
  Figures f;
  for (auto _ : state) {
    f.ref_seconds.push_back(ref.seconds());
    const double s = w.timed_store(chunks_per_request);
    state.SetIterationTime(s);
    f.seconds.push_back(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * request_bytes));
  g_figures["cpu_store"] = f;
}

void BM_cpu_retrieve(benchmark::State& state) {
  Worker w;
  w.timed_store(chunks_per_request);
  w.timed_retrieve(chunks_per_request);  // warm up
  CopyReference ref(request_bytes);
  Figures f;
  for (auto _ : state) {
    f.ref_seconds.push_back(ref.seconds());
    const double s = w.timed_retrieve(chunks_per_request);
    state.SetIterationTime(s);
    f.seconds.push_back(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * request_bytes));
  g_figures["cpu_retrieve"] = f;
}

// Request latency of one chunk (32 MiB) each way.
void BM_cpu_one_chunk_latency(benchmark::State& state) {
  Worker w;
  w.timed_store(1);
  Figures st, rt;
  for (auto _ : state) {
    const double s = w.timed_store(1);
    const double r = w.timed_retrieve(1);
    state.SetIterationTime(s + r);
    st.seconds.push_back(s);
    rt.seconds.push_back(r);
  }
  g_figures["one_chunk_store"] = st;
  g_figures["one_chunk_retrieve"] = rt;
}

// ---- end-to-end requests through the adapters ----------------------------------

// An engine: both adapters on a Runtime, its memfd KV cache registered.
struct AdapterEngine {
  kvlink::runtime::Runtime rt;
  wire::KvLayout layout = make_layout();
  kvlink::transfer::KvMemfd kv;
  std::shared_ptr<kvlink::adapter::WorkerAdapter> worker;
  std::shared_ptr<kvlink::adapter::SchedulerAdapter> scheduler;

  AdapterEngine() {
    auto created = kvlink::transfer::create_kv_memfd(layout, {.name = "bench-adapter-kv"});
    if (!created) throw std::runtime_error(created.error().message());
    kv = std::move(*created);
    std::memset(kv.memory.get(), 7, layout.region_bytes);  // faulted in, like a live KV cache
    kvlink::adapter::WorkerConfig w;
    w.endpoint = g_server->endpoint().to_string();
    w.model = "bench-adapter-model";
    w.transfer_timeout = call_timeout;
    w.blocking_deadline = call_timeout;
    worker = kvlink::adapter::WorkerAdapter::create(rt.executor(), w);
    kvlink::adapter::SchedulerConfig s;
    s.endpoint = w.endpoint;
    s.model = w.model;
    s.lookup_mode = kvlink::adapter::LookupMode::sync;
    s.blocking_deadline = call_timeout;
    scheduler = kvlink::adapter::SchedulerAdapter::create(rt.executor(), s);
    check(worker->register_kv_caches(layout, kv.fd.get()).error(), "REGISTER_KV_CACHE");
  }
  ~AdapterEngine() {
    (void)worker->shutdown(seconds(5));  // best effort: the server reaps it anyway
    scheduler->stop();
    rt.stop();
  }
  static void check(const kvlink::Error& err, const char* what) {
    if (err) throw std::runtime_error(fmt::format("{} through the adapter failed: {}", what, err.message()));
  }
  static std::vector<kvlink::store::Token> prompt(std::uint32_t chunks, std::uint32_t seed) {
    std::vector<kvlink::store::Token> t(std::size_t{chunks} * chunk_tokens);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<kvlink::store::Token>(seed * 1000003u + i);
    return t;
  }
  kvlink::adapter::TransferSpec spec(const std::string& id, const std::vector<kvlink::store::Token>& tokens,
                                     std::uint32_t first_block) const {
    kvlink::adapter::TransferSpec sp;
    sp.request_id = id;
    sp.tokens = tokens;
    sp.block_ids.resize(tokens.size() / block_size);
    for (std::uint32_t i = 0; i < sp.block_ids.size(); ++i) sp.block_ids[i] = first_block + i;
    return sp;
  }
  // One request: lookup; retrieve what matched; store; get_finished; end.
  // Returns the matched chunks.
  std::uint32_t request(const std::string& id, const std::vector<kvlink::store::Token>& tokens) {
    check(scheduler->submit_lookup(id, tokens).error(), "lookup");
    auto st = scheduler->check_lookup(id);
    check(st.error(), "check_lookup");
    const std::uint32_t matched = st->matched_tokens / chunk_tokens;
    if (matched > 0) {
      auto hit = std::vector<kvlink::store::Token>(tokens.begin(), tokens.begin() + std::ptrdiff_t{matched} * chunk_tokens);
      auto r = worker->submit_retrieve(spec(id, hit, num_blocks / 2));
      check(r.error(), "RETRIEVE");
    }
    check(worker->submit_store(spec(id, tokens, 0)).error(), "STORE");
    auto fin = worker->get_finished({id});
    check(fin.error(), "get_finished");
    if (fin->stores.size() != 1) throw std::runtime_error("get_finished did not report the store");
    check(scheduler->end_session(id).error(), "end_session");
    return matched;
  }
};

// Reference for one request of `chunks`: a memcpy of its bytes plus a PING.
double reference_ms(std::uint32_t chunks) {
  CopyReference ref(chunk_bytes * chunks);
  Figures copy;
  for (int i = 0; i < 15; ++i) copy.seconds.push_back(ref.seconds());
  Worker w;  // a connection of its own for the PINGs
  Figures ping;
  for (int i = 0; i < 200; ++i) {
    const auto t0 = Clock::now();
    run_until_done(w.io, call(w.conn, wire::PingRequest{}));
    ping.seconds.push_back(duration<double>(Clock::now() - t0).count());
  }
  return copy.p50_ms() + ping.p50_ms();
}

std::map<std::string, double> g_reference_ms;

// A hit: the N chunks are in the server; retrieved, then the store finds
// them present (nothing copied).
void BM_adapter_hit_request(benchmark::State& state) {
  const auto chunks = static_cast<std::uint32_t>(state.range(0));
  AdapterEngine e;
  const auto tokens = AdapterEngine::prompt(chunks, 1);
  e.request("seed", tokens);  // stores them
  Figures f;
  std::uint64_t n = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    const auto matched = e.request(fmt::format("hit-{}", n++), tokens);
    const double s = duration<double>(Clock::now() - t0).count();
    if (matched != chunks) throw std::runtime_error(fmt::format("hit request matched {} of {} chunks", matched, chunks));
    state.SetIterationTime(s);
    f.seconds.push_back(s);
  }
  g_figures[fmt::format("adapter_hit_{}", chunks)] = f;
  g_reference_ms[fmt::format("adapter_hit_{}", chunks)] = reference_ms(chunks);
}

// A miss: nothing matches; the store copies N new chunks.
void BM_adapter_miss_request(benchmark::State& state) {
  const auto chunks = static_cast<std::uint32_t>(state.range(0));
  AdapterEngine e;
  Figures f;
  static std::uint32_t n = 100;  // new prompts across runs of this benchmark
  for (auto _ : state) {
    const auto tokens = AdapterEngine::prompt(chunks, n);
    const auto t0 = Clock::now();
    const auto matched = e.request(fmt::format("miss-{}", n++), tokens);
    const double s = duration<double>(Clock::now() - t0).count();
    if (matched != 0) throw std::runtime_error("miss request matched");
    state.SetIterationTime(s);
    f.seconds.push_back(s);
  }
  g_figures[fmt::format("adapter_miss_{}", chunks)] = f;
  g_reference_ms[fmt::format("adapter_miss_{}", chunks)] = reference_ms(chunks);
}

BENCHMARK(BM_cpu_store)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_cpu_retrieve)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_cpu_one_chunk_latency)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_adapter_hit_request)->Arg(1)->Arg(4)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
BENCHMARK(BM_adapter_miss_request)->Arg(1)->Arg(4)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

void print_summary(unsigned threads) {
  std::printf("\nCPU data path: %u layers, %u-token blocks, %llu KiB per block per plane, %u chunks (%llu MiB) per "
              "request, %u copy threads\n",
              layers, block_size, static_cast<unsigned long long>(block_bytes / 1024), chunks_per_request,
              static_cast<unsigned long long>(request_bytes >> 20), threads);
  std::printf("| figure | GB/s | p50 ms/request | reference memcpy GB/s (paired) | ratio | target | result |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  bool ok = true;
  for (const char* name : {"cpu_store", "cpu_retrieve"}) {
    const auto& f = g_figures[name];
    if (f.seconds.empty()) continue;
    const double ratio = f.paired_ratio();
    ok = ok && ratio >= 0.8;
    std::printf("| %s | %.2f | %.2f | %.2f | %.2fx | >= 0.8x | %s |\n", name, f.gbps(), f.p50_ms(), f.ref_gbps(), ratio,
                ratio >= 0.8 ? "pass" : "FAIL");
  }
  for (const char* name : {"one_chunk_store", "one_chunk_retrieve"}) {
    const auto& f = g_figures[name];
    if (f.seconds.empty()) continue;
    std::printf("| %s (32 MiB) | %.2f | %.2f | | | report | |\n", name,
                static_cast<double>(chunk_bytes) / (f.p50_ms() / 1e3) / 1e9, f.p50_ms());
  }
  std::printf("\nEnd-to-end request through the adapters (blocking calls; sync lookup, retrieve, store, get_finished,\n"
              "end_session) vs one memcpy of the request's bytes + one PING round trip, same run:\n");
  std::printf("| request | chunks (MiB) | p50 ms | p99 ms | reference ms | p50 ratio | iterations |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const char* kind : {"hit", "miss"})
    for (int chunks : {1, 4}) {
      const std::string name = fmt::format("adapter_{}_{}", kind, chunks);
      const auto& f = g_figures[name];
      const double ref = g_reference_ms[name];
      if (f.seconds.empty() || ref <= 0) continue;
      std::printf("| %s | %d (%llu) | %.2f | %.2f | %.2f | %.2fx | %zu |\n", kind, chunks,
                  static_cast<unsigned long long>((chunk_bytes * static_cast<std::uint64_t>(chunks)) >> 20), f.p50_ms(),
                  f.p99_ms(), ref, f.p50_ms() / ref, f.seconds.size());
    }
  std::printf("%s\n", ok ? "all targets met" : "a target was missed");
}

}  // namespace

int main(int argc, char** argv) {
  kvlink::log::set_level(kvlink::log::Level::warn);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  unsigned threads = 2;
  if (const char* t = std::getenv("KVLINK_TRANSFER_THREADS")) threads = static_cast<unsigned>(std::max(1, std::atoi(t)));
  ServerThread server(threads);
  g_server = &server;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_summary(threads);
  g_server = nullptr;
  return 0;
}
