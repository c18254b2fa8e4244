// The GPU data path end to end: this process is the engine (device KV
// tensors from cudaMalloc, exported with CUDA IPC), the real kvlink-server
// runs the CUDA transfer engine. Every case is registered as skipped when
// no CUDA device is usable (doctest counts it as skipped, never passed).
#include <doctest/doctest.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <numeric>
#include <thread>

#include "../integration/server_process.hpp"
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
  if (!gpu_available()) std::fprintf(stderr, "gpu-tests: every case is skipped: %s\n", no_gpu_reason().c_str());
  return !gpu_available();
}();

constexpr std::uint32_t chunk_tokens = 64;  // server --chunk-size: 4 blocks of 16 per chunk

struct Server {
  TempDir dir;
  ServerProcess process;
  explicit Server(const std::string& method)
      : process({"--listen", dir.socket(), "--transfer-engine", "cuda", "--cuda-copy", method, "--chunk-size",
                 std::to_string(chunk_tokens), "--l1-size", "256MiB", "--log-level", "warn"}) {
    process.start(30s);
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
    REQUIRE(event.create() == "");
  }
  ~Engine() {
    worker->shutdown(5s);
    rt.stop();
  }
  // "" or the server's refusal.
  std::error_code register_kv(const DeviceKv& kv) { return worker->register_kv_caches(kv.layout(), -1, 10s).ec; }
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
        REQUIRE_MESSAGE(kv.error() == "", kv.error());
        Engine engine(server.process.endpoint(), fmt::format("gpu-test-{}", seed));
        auto ec = engine.register_kv(kv);
        REQUIRE_MESSAGE(!ec, ec.message());
        const std::string why =
            round_trip(*engine.worker, kv, engine.event, seed++, from_blocks, to_blocks, 0, chunk_tokens);
        CHECK_MESSAGE(why == "", why);
      }
    }
  }
}

TEST_CASE("gpu: RETRIEVE leaves the first skip_first_n_tokens tokens untouched, to the token" *
          doctest::skip(no_gpu)) {
  for (const char* method : {"batch", "kernel"}) {
    Server server(method);
    DeviceKv kv(KvShape{});
    REQUIRE_MESSAGE(kv.error() == "", kv.error());
    std::uint32_t seed = 100;
    // Inside the first block, at a block edge, mid-chunk, into the second chunk.
    for (std::uint32_t skip : {1u, 16u, 37u, 64u + 21u}) {
      CAPTURE(method);
      CAPTURE(skip);
      Engine engine(server.process.endpoint(), fmt::format("gpu-skip-{}", seed));
      REQUIRE(!engine.register_kv(kv));
      const std::string why = round_trip(*engine.worker, kv, engine.event, seed++, from_blocks, to_blocks, skip,
                                         chunk_tokens);
      CHECK_MESSAGE(why == "", why);
    }
  }
}

TEST_CASE("gpu: STORE waits for the engine's event: a kernel's writes just before STORE are what is stored" *
          doctest::skip(no_gpu)) {
  Server server("batch");
  DeviceKv kv(KvShape{});
  REQUIRE_MESSAGE(kv.error() == "", kv.error());
  Engine engine(server.process.endpoint(), "gpu-event");
  REQUIRE(!engine.register_kv(kv));
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(kv.fill(1, stream) == "");
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  // The "forward step": 300 ms of work, then the blocks are written. The
  // STORE goes out at once, without waiting: only the event orders the
  // server's copy after the writes.
  REQUIRE(launch_spin(300'000'000, stream) == cudaSuccess);
  REQUIRE(kv.fill(2, stream) == "");
  REQUIRE(engine.event.record(stream) == "");
  adapter::TransferSpec store;
  store.request_id = "event-store";
  store.tokens = tokens(77, from_blocks.size() / 4, chunk_tokens);
  store.block_ids = from_blocks;
  store.engine_event = engine.event.handle();
  auto stored = engine.worker->submit_store(store, 30s);
  REQUIRE_MESSAGE(!stored.ec, stored.ec.message());
  REQUIRE(stored.value.stored_chunks == from_blocks.size() / 4);
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);

  // Read the stored chunks back into other blocks: they hold fill(2).
  std::vector<std::uint8_t> want, got;
  REQUIRE(kv.snapshot(want) == "");
  expect_retrieve(kv.layout(), kv.layer_bytes(), want, from_blocks, to_blocks, 0);
  adapter::TransferSpec retrieve = store;
  retrieve.request_id = "event-retrieve";
  retrieve.block_ids = to_blocks;
  REQUIRE(engine.event.record(stream) == "");
  auto r = engine.worker->submit_retrieve(retrieve, 30s);
  REQUIRE_MESSAGE(!r.ec, r.ec.message());
  REQUIRE(kv.snapshot(got) == "");
  const std::string why = compare(kv.layout(), kv.layer_bytes(), want, got);
  CHECK_MESSAGE(why == "", why);
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
  REQUIRE_MESSAGE(kv.error() == "", kv.error());
  Engine engine(server.process.endpoint(), "gpu-concurrent-parent");
  REQUIRE(!engine.register_kv(kv));
  for (std::uint32_t round = 0; round < 20; ++round) {
    CAPTURE(round);
    const std::string why =
        round_trip(*engine.worker, kv, engine.event, 6000 + round, from_blocks, to_blocks, round % 7, chunk_tokens);
    REQUIRE_MESSAGE(why == "", why);
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
  REQUIRE_MESSAGE(kv.error() == "", kv.error());
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
    CHECK(r.ec == errc::bad_request);
  }
  // And the good layout still registers afterwards.
  Engine engine(server.process.endpoint(), "gpu-good");
  CHECK(!engine.register_kv(kv));
}
