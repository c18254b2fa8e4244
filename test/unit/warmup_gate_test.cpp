// The warmup gate: idempotent, thread-safe, exactly one opener.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "kvlink/health/warmup_gate.hpp"

using kvlink::health::WarmupGate;

TEST_CASE("warmup gate: opens once, remembers the first reason") {
  WarmupGate g;
  CHECK_FALSE(g.is_open());
  CHECK(g.reason().empty());
  int runs = 0;
  std::string seen;
  g.subscribe([&](std::string_view r) {
    ++runs;
    seen = r;
  });
  CHECK(runs == 0);
  CHECK(g.open("ready"));
  CHECK_FALSE(g.open("register acknowledged"));
  CHECK(g.is_open());
  CHECK(g.reason() == "ready");
  CHECK(runs == 1);
  CHECK(seen == "ready");
  // A late subscriber runs at once.
  int late = 0;
  g.subscribe([&](std::string_view) { ++late; });
  CHECK(late == 1);
}

TEST_CASE("warmup gate: racing openers start the heartbeat exactly once") {
  for (int round = 0; round < 50; ++round) {
    WarmupGate g;
    std::atomic<int> starts{0};
    std::atomic<int> winners{0};
    g.subscribe([&](std::string_view) { starts.fetch_add(1); });
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        while (!go.load()) {
        }
        if (g.open(t % 2 ? "ready" : "first lookup")) winners.fetch_add(1);
        // Subscribing while others open must not lose or duplicate a run.
        g.subscribe([&](std::string_view) { starts.fetch_add(100); });
      });
    }
    go = true;
    for (auto& th : threads) th.join();
    CHECK(winners.load() == 1);
    CHECK(starts.load() == 1 + 8 * 100);
  }
}

#include <asio/io_context.hpp>

TEST_CASE("warmup gate: async_wait completes on the waiter's executor once opened from another thread") {
  WarmupGate g;
  asio::io_context io;
  int completions = 0;
  std::thread::id ran_on;
  g.async_wait(io.get_executor(), [&](std::error_code ec) {
    CHECK_FALSE(ec);
    ++completions;
    ran_on = std::this_thread::get_id();
  });
  io.poll();
  CHECK(completions == 0);  // still closed
  std::thread opener([&] { g.open("ready"); });
  opener.join();
  io.restart();
  io.run();
  CHECK(completions == 1);
  CHECK(ran_on == std::this_thread::get_id());
  // Waiting on an open gate completes at once (through the executor).
  g.async_wait(io.get_executor(), [&](std::error_code) { ++completions; });
  io.restart();
  io.run();
  CHECK(completions == 2);
}
