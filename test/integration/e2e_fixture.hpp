// What the end-to-end tests share (e2e_test.cpp, disk_tier_test.cpp): the
// real kvlink-server process, both adapters, and a memfd KV cache whose
// bytes are checked against the per-token pattern (tools/sim/workload.hpp).
#pragma once

#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "adapter_fixture.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "server_process.hpp"
#include "sim/workload.hpp"
#include "test_support.hpp"

namespace kvlink::test::e2e {

using namespace std::chrono_literals;
using namespace kvlink::adapter;


using test::block;
using test::chunk;
constexpr std::uint32_t num_blocks = 256;  // test::layout()'s
// Engine threads use blocks below this; tests' own probes use the rest.
constexpr std::uint32_t engine_blocks = 192;
// Deadlines: transfers give up (1 s) before the engine's blocking calls (2 s).
constexpr auto transfer_timeout = 1s;
constexpr auto deadline = 2s;

// 2 layers, 2 heads x 16 x 2 bytes: 64 bytes per token, 1 KiB per block.
using test::layout;

// The engine's KV memory: a sealed memfd of the layout's size, mapped here.
struct KvMemory {
  wire::KvLayout lay = layout();
  Result<transfer::KvMemfd> memfd = transfer::create_kv_memfd(lay, {.name = "e2e_test-kv"});
  KvMemory() { REQUIRE_MESSAGE(memfd, memfd.error().message()); }
  sim::KvView view() const { return sim::KvView(memfd->memory.get(), lay); }
};

inline std::uint64_t mismatches(const sim::KvView& kv, const std::vector<store::Token>& tokens,
                         const std::vector<std::uint32_t>& blocks, std::uint32_t first, std::uint32_t last) {
  std::uint64_t n = 0;
  sim::verify_tokens(kv, tokens, blocks, first, last, 0, &n);
  return n;
}

struct Fixture {
  TempDir dir;
  KvMemory kv;
  std::string endpoint = dir.socket();
  ServerProcess server;
  runtime::Runtime rt;
  std::shared_ptr<WorkerAdapter> worker;
  std::shared_ptr<SchedulerAdapter> scheduler;

  explicit Fixture(std::string l1 = "64MiB", std::vector<std::string> extra = {}) : server(args(l1, std::move(extra))) {}
  std::vector<std::string> args(const std::string& l1, std::vector<std::string> extra) const {
    std::vector<std::string> a{"--listen", endpoint, "--log-level", "warn", "--chunk-size", std::to_string(chunk),
                               "--l1-size", l1, "--no-huge-pages"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  ~Fixture() {
    if (worker) (void)worker->shutdown(2s);  // teardown: its answer is not under test
    if (scheduler) scheduler->stop();
    rt.stop();
  }
  void make(LookupMode mode = LookupMode::sync) {
    WorkerConfig w = test::config_for<WorkerConfig>(endpoint, 1s);
    w.transfer_timeout = transfer_timeout;
    w.blocking_deadline = deadline;
    worker = WorkerAdapter::create(rt.executor(), w);
    SchedulerConfig s = test::config_for<SchedulerConfig>(endpoint, 1s);
    s.lookup_mode = mode;
    s.blocking_deadline = deadline;
    scheduler = SchedulerAdapter::create(rt.executor(), s);
    auto r = worker->register_kv_caches(kv.lay, kv.memfd->fd.get());
    REQUIRE_MESSAGE(r, r.error().message());
  }
  bool state_is(health::State s) {
    return worker->monitor().state() == s && scheduler->monitor().state() == s;
  }
  std::uint32_t matched(const std::string& id, const std::vector<store::Token>& tokens) {
    REQUIRE(scheduler->submit_lookup(id, tokens));
    return test::final_match(*scheduler, id);
  }
  TransferSpec spec(std::string id, const std::vector<store::Token>& tokens, const std::vector<std::uint32_t>& blocks) {
    TransferSpec s;
    s.request_id = std::move(id);
    s.tokens = tokens;
    s.block_ids = blocks;
    return s;
  }
  std::int64_t stat(const std::string& name) { return test::server_stat(endpoint, name); }
};

inline std::vector<store::Token> prompt(std::size_t n, store::Token first) {
  std::vector<store::Token> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = first + static_cast<store::Token>(i * 13 % 1000);
  return t;
}


// Prompts of 4 chunks stored from their own blocks (8 per prompt from
// `first_block`), their bytes in the engine's KV memory for checking.
inline std::vector<std::vector<store::Token>> store_prompts(Fixture& f, int n, std::uint32_t first_block = 0,
                                                          int first_prompt = 0) {
  const auto kv = f.kv.view();
  std::vector<std::vector<store::Token>> prompts;
  for (int p = 0; p < n; ++p) {
    auto tokens = prompt(4 * chunk, static_cast<store::Token>(100 * (first_prompt + p) + 1));
    const auto src = test::blocks(first_block + 8 * static_cast<std::uint32_t>(p), 8);
    sim::fill_tokens(kv, tokens, src, 0, 4 * chunk);
    auto st = f.worker->submit_store(f.spec("store-" + std::to_string(p), tokens, src));
    REQUIRE_MESSAGE(st, st.error().message());
    prompts.push_back(std::move(tokens));
  }
  return prompts;
}

// Looks `tokens` up and retrieves what matched into fresh blocks: the
// matched tokens, after checking every retrieved byte (0 mismatches).
inline std::uint32_t hit_and_verify(Fixture& f, const std::string& id, const std::vector<store::Token>& tokens) {
  const std::uint32_t matched = f.matched(id, tokens);
  if (matched == 0) return 0;
  const auto kv = f.kv.view();
  const auto dst = test::blocks(engine_blocks, matched / block);
  sim::poison_blocks(kv, dst);
  std::vector<store::Token> hit(tokens.begin(), tokens.begin() + matched);
  auto r = f.worker->submit_retrieve(f.spec(id, hit, dst));
  REQUIRE_MESSAGE(r, r.error().message());
  CHECK(mismatches(kv, tokens, dst, 0, matched) == 0);
  return matched;
}

// After a restart: the worker registered again by itself, the scheduler's
// link is up (it stays warming until its first lookup).
inline void reconnected(Fixture& f) {
  REQUIRE(eventually([&] {
    return f.worker->monitor().state() == health::State::healthy && f.stat("registrations") == 1 &&
           f.scheduler->monitor().connection() != nullptr;
  }));
}

}  // namespace kvlink::test::e2e
