// A second engine process for gpu-tests, two modes:
//
// gpu-engine-helper ENDPOINT SEED ROUNDS CHUNK_TOKENS
//   Makes its own device KV cache, registers it with the server at ENDPOINT
//   and runs ROUNDS verified STORE -> RETRIEVE round trips. Exit 0 if every
//   byte matched, 1 (with the reason on stderr) if not.
//
// gpu-engine-helper hold ENDPOINT MIB UNREGISTER
//   Allocates a KV cache of MIB MiB on the device, registers it, then
//   unregisters it when UNREGISTER is 1, prints "ready" and holds everything
//   until stdin closes (or it is killed): an engine whose device memory the
//   server maps, for the memory-left-behind test.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gpu_engine.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;
using namespace std::chrono_literals;

namespace {

int fail(const std::string& why) {
  std::fprintf(stderr, "gpu-engine-helper: %s\n", why.c_str());
  return 1;
}

adapter::WorkerConfig worker_config(const std::string& endpoint, const char* model) {
  adapter::WorkerConfig c;
  c.endpoint = endpoint;
  c.model = model;
  c.call_timeout = 10s;
  c.transfer_timeout = 30s;
  c.blocking_deadline = 30s;
  return c;
}

int round_trips(const std::string& endpoint, std::uint32_t seed, std::uint32_t rounds, std::uint32_t chunk_tokens) {
  gpu_test::DeviceKv kv(gpu_test::KvShape{});
  if (kv.error()) return fail(kv.error().message());
  transfer::cuda::EngineEvent event;
  if (auto err = event.create()) return fail(err.message());
  runtime::Runtime rt;
  auto worker = adapter::WorkerAdapter::create(rt.executor(), worker_config(endpoint, "gpu-concurrent-helper"));
  int rc = 0;
  if (auto r = worker->register_kv_caches(kv.layout(), -1, 10s); !r)
    rc = fail("REGISTER_KV_CACHE failed: " + r.error().message());
  // The same block ids as the parent process, in its own cache: the copies
  // of both processes interleave on the server's streams.
  const std::vector<std::uint32_t> from{8, 9, 10, 2, 50, 51, 52, 1}, to{20, 21, 22, 23, 101, 102, 103, 104};
  for (std::uint32_t round = 0; rc == 0 && round < rounds; ++round) {
    if (auto err = gpu_test::round_trip(*worker, kv, event, seed + round, from, to, (round * 5) % 64, chunk_tokens))
      rc = fail("round " + std::to_string(round) + ": " + err.message());
  }
  (void)worker->shutdown(5s);  // teardown: its answer does not matter
  rt.stop();
  return rc;
}

int hold(const std::string& endpoint, std::uint64_t mib, bool unregister) {
  gpu_test::KvShape shape;  // 2 planes x 16 tokens x 2 heads x 64 x 2 bytes = 8 KiB per block and layer
  shape.num_blocks = static_cast<std::uint32_t>((mib << 20) / shape.layers / 8192);
  gpu_test::DeviceKv kv(shape);
  if (kv.error()) return fail(kv.error().message());
  runtime::Runtime rt;
  auto worker = adapter::WorkerAdapter::create(rt.executor(), worker_config(endpoint, "gpu-memory-helper"));
  if (auto r = worker->register_kv_caches(kv.layout(), -1, 10s); !r)
    return fail("REGISTER_KV_CACHE failed: " + r.error().message());
  if (unregister)
    if (auto r = worker->unregister_kv_caches(10s); !r)
      return fail("UNREGISTER_KV_CACHE failed: " + r.error().message());
  std::printf("ready\n");
  std::fflush(stdout);
  char c = 0;
  while (::read(STDIN_FILENO, &c, 1) > 0) {
  }
  (void)worker->shutdown(5s);  // teardown: its answer does not matter
  rt.stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (!gpu_test::gpu_available()) return fail(gpu_test::no_gpu_reason().message());
  if (argc == 5 && std::strcmp(argv[1], "hold") == 0)
    return hold(argv[2], std::strtoull(argv[3], nullptr, 10), std::strcmp(argv[4], "1") == 0);
  if (argc == 5)
    return round_trips(argv[1], static_cast<std::uint32_t>(std::strtoul(argv[2], nullptr, 10)),
                       static_cast<std::uint32_t>(std::strtoul(argv[3], nullptr, 10)),
                       static_cast<std::uint32_t>(std::strtoul(argv[4], nullptr, 10)));
  std::fprintf(stderr,
               "usage: gpu-engine-helper ENDPOINT SEED ROUNDS CHUNK_TOKENS\n"
               "       gpu-engine-helper hold ENDPOINT MIB UNREGISTER\n");
  return 2;
}
