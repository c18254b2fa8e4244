// gpu-engine-helper ENDPOINT SEED ROUNDS CHUNK_TOKENS: a second engine
// process for gpu-tests. Makes its own device KV cache, registers it with
// the server at ENDPOINT and runs ROUNDS verified STORE -> RETRIEVE round
// trips. Exit 0 if every byte matched, 1 (with the reason on stderr) if not.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "gpu_engine.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;
using namespace std::chrono_literals;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: gpu-engine-helper ENDPOINT SEED ROUNDS CHUNK_TOKENS\n");
    return 2;
  }
  const std::string endpoint = argv[1];
  const auto seed = static_cast<std::uint32_t>(std::strtoul(argv[2], nullptr, 10));
  const auto rounds = static_cast<std::uint32_t>(std::strtoul(argv[3], nullptr, 10));
  const auto chunk_tokens = static_cast<std::uint32_t>(std::strtoul(argv[4], nullptr, 10));
  if (!gpu_test::gpu_available()) {
    std::fprintf(stderr, "gpu-engine-helper: %s\n", gpu_test::no_gpu_reason().c_str());
    return 1;
  }
  gpu_test::DeviceKv kv(gpu_test::KvShape{});
  if (!kv.error().empty()) {
    std::fprintf(stderr, "gpu-engine-helper: %s\n", kv.error().c_str());
    return 1;
  }
  transfer::cuda::EngineEvent event;
  if (auto why = event.create(); !why.empty()) {
    std::fprintf(stderr, "gpu-engine-helper: %s\n", why.c_str());
    return 1;
  }
  runtime::Runtime rt;
  adapter::WorkerConfig c;
  c.endpoint = endpoint;
  c.model = "gpu-concurrent-helper";
  c.call_timeout = 10s;
  c.transfer_timeout = 30s;
  c.blocking_deadline = 30s;
  auto worker = adapter::WorkerAdapter::create(rt.executor(), c);
  int rc = 0;
  if (auto r = worker->register_kv_caches(kv.layout(), -1, 10s); r.ec) {
    std::fprintf(stderr, "gpu-engine-helper: REGISTER_KV_CACHE failed: %s\n", r.ec.message().c_str());
    rc = 1;
  }
  // The same block ids as the parent process, in its own cache: the copies
  // of both processes interleave on the server's streams.
  const std::vector<std::uint32_t> from{8, 9, 10, 2, 50, 51, 52, 1}, to{20, 21, 22, 23, 101, 102, 103, 104};
  for (std::uint32_t round = 0; rc == 0 && round < rounds; ++round) {
    if (auto why = gpu_test::round_trip(*worker, kv, event, seed + round, from, to, (round * 5) % 64, chunk_tokens);
        !why.empty()) {
      std::fprintf(stderr, "gpu-engine-helper: round %u: %s\n", round, why.c_str());
      rc = 1;
    }
  }
  worker->shutdown(5s);
  rt.stop();
  return rc;
}
