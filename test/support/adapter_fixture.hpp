// What the adapter tests share: a real kvlink-server on a temporary unix
// socket, a runtime, and a worker and a scheduler adapter made against it
// with fast heartbeats, plus the layout, prompts and block ids they use.
#pragma once

#include <doctest/doctest.h>

#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/unique_fd.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

namespace kvlink::test {

using namespace kvlink::adapter;
using namespace std::chrono_literals;

constexpr std::uint32_t chunk = 32;  // server --chunk-size
constexpr std::uint32_t block = 16;  // engine block size: 2 blocks per chunk

inline wire::KvLayout layout() { return wire::paged_layout(2, 256, block, 2, 16, 2); }

inline std::vector<store::Token> prompt(std::size_t tokens, std::uint32_t seed = 1) {
  std::vector<store::Token> t(tokens);
  std::iota(t.begin(), t.end(), seed * 100000);
  return t;
}

inline std::vector<std::uint32_t> blocks(std::uint32_t first, std::uint32_t n) {
  std::vector<std::uint32_t> b(n);
  std::iota(b.begin(), b.end(), first);
  return b;
}

// The engine's KV memory for layout(): a sealed memfd of the layout's size.
inline UniqueFd kv_memfd() {
  auto kv = transfer::create_kv_memfd(layout(), {.name = "adapter_test-kv", .map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  return std::move(kv->fd);
}

// An adapter's configuration in these tests (WorkerConfig or
// SchedulerConfig): fast heartbeats, one model.
template <class Config>
Config config_for(const std::string& endpoint, Duration call_timeout) {
  Config c;
  c.endpoint = endpoint;
  c.model = "adapter-model";
  c.health = test::fast_health();
  c.call_timeout = call_timeout;
  return c;
}

// The final matched tokens of lookup `id` (polls two-phase jobs).
inline std::uint32_t final_match(SchedulerAdapter& scheduler, const std::string& id) {
  LookupStatus st;
  REQUIRE(eventually([&] {
    auto r = scheduler.check_lookup(id);
    REQUIRE_MESSAGE(r, r.error().message());
    st = *r;
    return st.ready;
  }));
  return st.matched_tokens;
}

struct AdapterFixture {
  TempDir dir;
  UniqueFd kv = kv_memfd();
  std::string endpoint = dir.socket();
  ServerProcess server;
  runtime::Runtime rt;
  std::shared_ptr<WorkerAdapter> worker;
  std::shared_ptr<SchedulerAdapter> scheduler;

  explicit AdapterFixture(std::vector<std::string> extra = {}) : server(args(endpoint, std::move(extra))) {}
  static std::vector<std::string> args(const std::string& ep, std::vector<std::string> extra) {
    std::vector<std::string> a{"--listen", ep,      "--log-level", "warn", "--chunk-size", std::to_string(chunk),
                               "--l1-size", "64MiB", "--no-huge-pages"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  void make(LookupMode mode = LookupMode::sync, GateTrigger trigger = GateTrigger::register_ack) {
    WorkerConfig w = config_for<WorkerConfig>(endpoint, 1s);
    w.gate_trigger = trigger;
    w.transfer_timeout = 1s;
    w.blocking_deadline = 2s;
    worker = WorkerAdapter::create(rt.executor(), w);
    SchedulerConfig s = config_for<SchedulerConfig>(endpoint, 1s);
    s.lookup_mode = mode;
    s.blocking_deadline = 2s;
    scheduler = SchedulerAdapter::create(rt.executor(), s);
  }
  ~AdapterFixture() {
    if (worker) (void)worker->shutdown(2s);  // teardown: its answer is not under test
    if (scheduler) scheduler->stop();
    rt.stop();
  }

  TransferSpec spec(std::string id, const std::vector<store::Token>& tokens, std::uint32_t first_block = 0) {
    TransferSpec s;
    s.request_id = std::move(id);
    s.tokens = tokens;
    s.block_ids = blocks(first_block, static_cast<std::uint32_t>((tokens.size() + block - 1) / block));
    return s;
  }
  std::uint32_t matched(const std::string& id) { return final_match(*scheduler, id); }
  std::int64_t stat(const std::string& name) { return test::server_stat(endpoint, name); }
  void healthy() {
    worker_healthy();
    REQUIRE(eventually([&] { return scheduler->monitor().state() == health::State::healthy; }));
  }
  // The scheduler's connection is up (its first lookup would fail with
  // not_connected before; slow under sanitizers).
  void scheduler_connected() {
    REQUIRE(eventually([&] { return scheduler->monitor().connection() != nullptr; }));
  }
  void worker_healthy() { REQUIRE(eventually([&] { return worker->monitor().state() == health::State::healthy; })); }
};

}  // namespace kvlink::test
