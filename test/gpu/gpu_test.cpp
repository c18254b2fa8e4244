// The GPU data path end to end: this process is the engine (device KV
// tensors from cudaMalloc, exported with CUDA IPC), the real kvlink-server
// runs the CUDA transfer engine. Every case is registered as skipped when
// no CUDA device is usable (doctest counts it as skipped, never passed).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <numeric>
#include <thread>

#include "server_process.hpp"
#include "client.hpp"
#include "gpu_engine.hpp"
#include "gpu_kernels.hpp"
#include "kvlink/runtime/runtime.hpp"

extern char** environ;

using namespace kvlink;
using namespace kvlink::gpu_test;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

// Evaluated while test cases register (static initialisation).
const bool no_gpu = [] {
  if (!gpu_available())
    std::fprintf(stderr, "gpu-tests: every case is skipped: %s\n", no_gpu_reason().message().c_str());
  return !gpu_available();
}();

constexpr std::uint32_t chunk_tokens = 64;  // server --chunk-size: 4 blocks of 16 per chunk

struct Server {
  TempDir dir;
  ServerProcess process;
  explicit Server(const std::string& method, std::vector<std::string> more_args = {})
      : process(args(dir, method, std::move(more_args))) {
    process.start(30s);
  }
  static std::vector<std::string> args(const TempDir& dir, const std::string& method, std::vector<std::string> more) {
    std::vector<std::string> a{"--listen", dir.socket(), "--transfer-engine", "cuda", "--cuda-copy", method,
                               "--chunk-size", std::to_string(chunk_tokens), "--l1-size", "256MiB", "--log-level", "warn"};
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
};

struct Engine {
  runtime::Runtime rt;
  std::shared_ptr<adapter::WorkerAdapter> worker;
  transfer::cuda::EngineEvent event;

  Engine(const std::string& endpoint, const std::string& model) {
    adapter::WorkerConfig c;
    c.endpoint = endpoint;
    c.model = model;
    c.call_timeout = 10s;
    c.transfer_timeout = 30s;
    c.blocking_deadline = 30s;
    worker = adapter::WorkerAdapter::create(rt.executor(), c);
    REQUIRE_FALSE(event.create());
  }
  ~Engine() {
    (void)worker->shutdown(5s);  // teardown: its answer is not under test
    rt.stop();
  }
  // Success or the server's refusal.
  std::error_code register_kv(const DeviceKv& kv) {
    return worker->register_kv_caches(kv.layout(), -1, 10s).error().code();
  }
};

std::vector<std::uint32_t> ids(std::initializer_list<std::uint32_t> v) { return v; }

// Two chunks gathered from scattered blocks, scattered into others.
const std::vector<std::uint32_t> from_blocks = ids({7, 3, 90, 4, 5, 6, 120, 0});
const std::vector<std::uint32_t> to_blocks = ids({11, 12, 13, 14, 100, 64, 33, 127});

}  // namespace

TEST_CASE("gpu: STORE -> RETRIEVE is byte-exact for both vLLM layouts, per-layer and shared allocations, "
          "batch and kernel copies" * doctest::skip(no_gpu)) {
  for (const char* method : {"batch", "kernel"}) {
    Server server(method);
    std::uint32_t seed = 1;
    for (auto order : {wire::PagedOrder::planes_first, wire::PagedOrder::blocks_first}) {
      for (bool one_allocation : {false, true}) {
        CAPTURE(method);
        CAPTURE(static_cast<int>(order));
        CAPTURE(one_allocation);
        KvShape shape;
        shape.order = order;
        shape.one_allocation = one_allocation;
        DeviceKv kv(shape);
        REQUIRE_MESSAGE(!kv.error(), kv.error().message());
        Engine engine(server.process.endpoint(), fmt::format("gpu-test-{}", seed));
        auto ec = engine.register_kv(kv);
        REQUIRE_MESSAGE(!ec, ec.message());
        const Error err =
            round_trip(*engine.worker, kv, engine.event, seed++, from_blocks, to_blocks, 0, chunk_tokens);
        CHECK_MESSAGE(!err, err.message());
      }
    }
  }
}

TEST_CASE("gpu: RETRIEVE leaves the first skip_first_n_tokens tokens untouched, to the token" *
          doctest::skip(no_gpu)) {
  for (const char* method : {"batch", "kernel"}) {
    Server server(method);
    DeviceKv kv(KvShape{});
    REQUIRE_MESSAGE(!kv.error(), kv.error().message());
    std::uint32_t seed = 100;
    // Inside the first block, at a block edge, mid-chunk, into the second chunk.
    for (std::uint32_t skip : {1u, 16u, 37u, 64u + 21u}) {
      CAPTURE(method);
      CAPTURE(skip);
      Engine engine(server.process.endpoint(), fmt::format("gpu-skip-{}", seed));
      REQUIRE(!engine.register_kv(kv));
      const Error err = round_trip(*engine.worker, kv, engine.event, seed++, from_blocks, to_blocks, skip,
                                   chunk_tokens);
      CHECK_MESSAGE(!err, err.message());
    }
  }
}

TEST_CASE("gpu: STORE waits for the engine's event: a kernel's writes just before STORE are what is stored" *
          doctest::skip(no_gpu)) {
  Server server("batch");
  DeviceKv kv(KvShape{});
  REQUIRE_MESSAGE(!kv.error(), kv.error().message());
  Engine engine(server.process.endpoint(), "gpu-event");
  REQUIRE(!engine.register_kv(kv));
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE_FALSE(kv.fill(1, stream));
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  // The "forward step": 300 ms of work, then the blocks are written. The
  // STORE goes out at once, without waiting: only the event orders the
  // server's copy after the writes.
  REQUIRE(launch_spin(300'000'000, stream) == cudaSuccess);
  REQUIRE_FALSE(kv.fill(2, stream));
  REQUIRE_FALSE(engine.event.record(stream));
  adapter::TransferSpec store;
  store.request_id = "event-store";
  store.tokens = tokens(77, from_blocks.size() / 4, chunk_tokens);
  store.block_ids = from_blocks;
  store.engine_event = engine.event.handle();
  auto stored = engine.worker->submit_store(store, 30s);
  REQUIRE_MESSAGE(stored, stored.error().message());
  REQUIRE(stored->stored_chunks == from_blocks.size() / 4);
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);

  // Read the stored chunks back into other blocks: they hold fill(2).
  std::vector<std::uint8_t> want, got;
  REQUIRE_FALSE(kv.snapshot(want));
  expect_retrieve(kv.layout(), kv.layer_bytes(), want, from_blocks, to_blocks, 0);
  adapter::TransferSpec retrieve = store;
  retrieve.request_id = "event-retrieve";
  retrieve.block_ids = to_blocks;
  REQUIRE_FALSE(engine.event.record(stream));
  auto r = engine.worker->submit_retrieve(retrieve, 30s);
  REQUIRE_MESSAGE(r, r.error().message());
  REQUIRE_FALSE(kv.snapshot(got));
  const Error err = compare(kv.layout(), kv.layer_bytes(), want, got);
  CHECK_MESSAGE(!err, err.message());
  cudaStreamDestroy(stream);
}

TEST_CASE("gpu: two engine processes store and retrieve at the same time, each gets its own bytes back" *
          doctest::skip(no_gpu)) {
  Server server("batch");
  const std::string helper = ServerProcess::binary("KVLINK_GPU_HELPER");
  std::vector<std::string> args{helper, server.process.endpoint(), "5000", "20", std::to_string(chunk_tokens)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(::posix_spawn(&pid, helper.c_str(), nullptr, nullptr, argv.data(), environ) == 0);

  DeviceKv kv(KvShape{});
  REQUIRE_MESSAGE(!kv.error(), kv.error().message());
  Engine engine(server.process.endpoint(), "gpu-concurrent-parent");
  REQUIRE(!engine.register_kv(kv));
  for (std::uint32_t round = 0; round < 20; ++round) {
    CAPTURE(round);
    const Error err =
        round_trip(*engine.worker, kv, engine.event, 6000 + round, from_blocks, to_blocks, round % 7, chunk_tokens);
    REQUIRE_MESSAGE(!err, err.message());
  }
  // The helper's verdict: exit status 0 only if all its round trips matched.
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  pid_t done = 0;
  while ((done = ::waitpid(pid, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  if (done == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL("the second engine process did not finish within 120 s");
  }
  CHECK_MESSAGE((WIFEXITED(status) && WEXITSTATUS(status) == 0), "gpu-engine-helper failed (see its stderr)");
}

TEST_CASE("gpu: registrations that cannot be opened are refused, saying why" * doctest::skip(no_gpu)) {
  Server server("batch");
  DeviceKv kv(KvShape{});
  REQUIRE_MESSAGE(!kv.error(), kv.error().message());
  struct Bad {
    const char* what;
    std::function<void(wire::KvLayout&)> change;
  };
  const std::vector<Bad> bad{
      {"unknown device", [](wire::KvLayout& l) { l.device_uuid[0] = std::byte{static_cast<unsigned char>(~static_cast<unsigned>(l.device_uuid[0]))}; }},
      {"invalid handle", [](wire::KvLayout& l) { l.layers[1].ipc_handle.assign(64, std::byte{0x5a}); }},
      {"layout larger than the tensor",
       [](wire::KvLayout& l) {
         l.num_blocks *= 2;
         l.plane_stride *= 2;
         l.region_bytes *= 4;
       }},
      {"short handle", [](wire::KvLayout& l) { l.layers[0].ipc_handle.resize(10); }},
  };
  for (const auto& b : bad) {
    CAPTURE(b.what);
    wire::KvLayout l = kv.layout();
    b.change(l);
    Engine engine(server.process.endpoint(), "gpu-bad");
    // The adapter logs the server's message; the error code says refused.
    auto r = engine.worker->register_kv_caches(l, -1, 10s);
    CHECK(r.error() == errc::bad_request);
  }
  // And the good layout still registers afterwards.
  Engine engine(server.process.endpoint(), "gpu-good");
  CHECK(!engine.register_kv(kv));
}

namespace {

// Device memory in use on the whole device, in MiB (every process's).
double device_used_mib() {
  std::size_t free = 0, total = 0;
  REQUIRE(cudaMemGetInfo(&free, &total) == cudaSuccess);
  return static_cast<double>(total - free) / (1 << 20);
}

// What nvidia-smi says process `pid` holds on the device, in MiB; -1 when
// nvidia-smi is missing or does not list it (it is a figure for the report,
// never a verdict: whether IPC mappings count there is the driver's choice).
double process_used_mib(pid_t pid) {
  FILE* f = ::popen("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null", "r");
  if (!f) return -1;
  double mib = -1;
  long p = 0;
  double m = 0;
  while (std::fscanf(f, "%ld, %lf", &p, &m) == 2)
    if (p == pid) mib = m;
  ::pclose(f);
  return mib;
}

// gpu-engine-helper in "hold" mode: an engine process that registers a
// device KV cache of `mib` MiB (and unregisters it if asked) and holds it
// until released or killed.
class HeldEngine {
 public:
  HeldEngine(const std::string& endpoint, std::uint64_t mib, bool unregister) {
    const std::string helper = ServerProcess::binary("KVLINK_GPU_HELPER");
    std::vector<std::string> args{helper, "hold", endpoint, std::to_string(mib), unregister ? "1" : "0"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int in[2], out[2];
    REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    const int rc = ::posix_spawn(&pid_, helper.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_ = in[1];
    from_ = out[0];
    REQUIRE(rc == 0);
    // Its "ready" line, within 60 s (CUDA start-up, allocation, REGISTER).
    char buf[16] = {};
    pollfd p{from_, POLLIN, 0};
    const bool ready = ::poll(&p, 1, 60'000) == 1 && ::read(from_, buf, sizeof buf - 1) > 0 &&
                       std::string(buf).rfind("ready", 0) == 0;
    REQUIRE_MESSAGE(ready, "gpu-engine-helper hold did not register (see its stderr)");
  }
  ~HeldEngine() {
    if (pid_ > 0) kill();
    ::close(to_);
    ::close(from_);
  }
  pid_t pid() const { return pid_; }
  void kill() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // Closes its stdin: it shuts its adapter down and exits 0.
  void release() {
    ::close(to_);
    to_ = -1;
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    CHECK_MESSAGE((WIFEXITED(status) && WEXITSTATUS(status) == 0), "gpu-engine-helper hold did not exit cleanly");
  }

 private:
  pid_t pid_ = -1;
  int to_ = -1, from_ = -1;
};

// Waits up to 10 s for device memory in use to come back within `slack`
// MiB of `baseline` (a dead process's memory is freed asynchronously).
double settle_to(double baseline, double slack) {
  const auto end = std::chrono::steady_clock::now() + 10s;
  double used = device_used_mib();
  while (used > baseline + slack && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(50ms);
    used = device_used_mib();
  }
  return used;
}

}  // namespace

// The reference server kept its engines' KV caches mapped after they
// unregistered or died: 112 GB per GPU, growing 5-10 GiB per engine crash.
// Here the device memory in use must come back to the baseline after an
// UNREGISTER, after a SIGKILL once the instance is reaped, and after 20
// such crashes. The baseline is the server with its CUDA context, which it
// creates at the first registration on a device and keeps (one per device,
// not per engine); the figures before that are reported too. Lines starting
// "gpu-memory:" are the figures for the report.
TEST_CASE("gpu: device memory returns to the baseline after unregister, after SIGKILL and reap, and after 20 "
          "crashes" * doctest::skip(no_gpu)) {
  constexpr std::uint64_t kv_mib = 1024;
  constexpr double slack_mib = 64;  // allocator granularity; a leak is a whole KV cache
  Server server("batch", {"--reap-timeout-s", "2", "--registration-grace-s", "2"});
  asio::io_context io;
  kvlink::test::Client stats(io, server.process.endpoint());
  REQUIRE(stats.stat("registrations") == 0);
  const double before = device_used_mib();
  double baseline = before;
  auto report = [&](const char* stage, double used) {
    std::printf("gpu-memory: %-36s device used %6.0f MiB (%+6.0f MiB against the baseline), server process %5.0f MiB\n",
                stage, used, used - baseline, process_used_mib(server.process.pid()));
    std::fflush(stdout);
  };
  report("server up, no engine yet", before);

  {
    HeldEngine engine(server.process.endpoint(), kv_mib, false);
    CHECK(stats.stat("registrations") == 1);
    const double registered = device_used_mib();
    report("first engine registered (1 GiB KV)", registered);
    CHECK(registered > before + kv_mib - slack_mib);  // the figure measures what it claims to
    engine.release();  // shuts down: UNREGISTER, then exit
  }
  CHECK(stats.stat_becomes("registrations", 0));
  // What stays is the server's CUDA context: far less than a KV cache.
  std::this_thread::sleep_for(500ms);  // the helper's own context is freed after it exits
  baseline = device_used_mib();
  report("baseline: after it unregistered", baseline);
  CHECK(baseline - before < kv_mib - slack_mib);

  {
    HeldEngine engine(server.process.endpoint(), kv_mib, false);
    report("registered", device_used_mib());
    engine.release();
  }
  CHECK(stats.stat_becomes("registrations", 0));
  double used = settle_to(baseline, slack_mib);
  report("after UNREGISTER and exit", used);
  CHECK(used <= baseline + slack_mib);

  {
    HeldEngine engine(server.process.endpoint(), kv_mib, true);
    CHECK(stats.stat("registrations") == 0);
    report("unregistered, engine alive", device_used_mib());
  }  // SIGKILL: nothing was registered, so nothing is left to reap
  used = settle_to(baseline, slack_mib);
  report("after UNREGISTER and SIGKILL", used);
  CHECK(used <= baseline + slack_mib);

  constexpr int crashes = 20;
  for (int i = 0; i < crashes; ++i) {
    CAPTURE(i);
    HeldEngine engine(server.process.endpoint(), kv_mib, false);
    REQUIRE(stats.stat("registrations") == 1);
    engine.kill();
    if (i == 0) {
      std::this_thread::sleep_for(200ms);
      const bool held = stats.stat("registrations") == 1;
      report(held ? "SIGKILLed, not yet reaped" : "SIGKILLed (already reaped)", device_used_mib());
    }
    // The reaper (2 s of silence) drops the registration and closes its
    // IPC mappings; only then can the driver free the dead engine's memory.
    REQUIRE(stats.stat_becomes("registrations", 0));
    used = settle_to(baseline, slack_mib);
    if (i == 0) report("SIGKILLed and reaped", used);
    REQUIRE(used <= baseline + slack_mib);
  }
  report("after 20 SIGKILL/reap cycles", used);
  CHECK(stats.stat("instances_reaped") >= crashes);
}
