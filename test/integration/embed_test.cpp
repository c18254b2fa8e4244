// Embedding modes against the real kvlink-server (runtime/runtime.hpp):
// (b) a host that only polls when host_fd() is readable, and stalls for
// many heartbeat intervals, keeps its heartbeat and sees socket events;
// (c) adapters on the host's own io_context. Mode (a) is what
// adapter_test.cpp uses throughout.
#include <doctest/doctest.h>
#include <poll.h>
#include <sys/mman.h>

#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>
#include <future>
#include <thread>

#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

wire::KvLayout small_layout() { return wire::paged_layout(2, 64, 16, 2, 16, 2); }

UniqueFd memfd_for(const wire::KvLayout& l) {
  auto kv = transfer::create_kv_memfd(l, {.name = "embed_test-kv", .map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  return std::move(kv->fd);
}

WorkerConfig fast_worker(const std::string& endpoint) {
  WorkerConfig w;
  w.endpoint = endpoint;
  w.model = "embed-model";
  w.health.interval = 50ms;
  w.health.ping_timeout = 1s;  // generous: these tests are about who runs what, not speed
  w.health.reconnect_initial = 5ms;
  w.health.reconnect_max = 50ms;
  w.call_timeout = 2s;
  return w;
}

// The host's loop: blocks on the fd (never spins) and polls when it is
// readable, until `done()` or `limit`. Returns done().
template <class Pred>
bool host_loop(runtime::Runtime& rt, Pred done, std::chrono::milliseconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
    if (left <= 0ms) return false;
    pollfd p{rt.host_fd(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) == 1) rt.poll();
  }
  return true;
}

// The monitor's counters, read on its executor.
health::Counters counters(const std::shared_ptr<WorkerAdapter>& w) {
  std::promise<health::Counters> p;
  asio::post(w->get_executor(), [&] { p.set_value(w->monitor().counters()); });
  return p.get_future().get();
}

asio::awaitable<std::uint32_t> store_and_finish(std::shared_ptr<WorkerAdapter> w, int fd) {
  co_await w->async_register_kv_caches(small_layout(), fd, asio::use_awaitable);
  TransferSpec s;
  s.request_id = "r";
  s.tokens.assign(512, 3);
  for (std::uint32_t b = 0; b < 32; ++b) s.block_ids.push_back(b);
  auto r = co_await w->async_submit_store(std::move(s), asio::use_awaitable);
  co_return r.stored_chunks;
}

}  // namespace

TEST_CASE("embed (b): completions run in poll() on the host thread; heartbeats go on while the host stalls; "
          "a server death wakes the fd") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--no-huge-pages", "--log-level", "warn"});
  server.start();
  runtime::Runtime rt;
  auto worker = WorkerAdapter::create(rt.executor(), fast_worker(dir.socket()));
  const auto layout = small_layout();
  UniqueFd kv = memfd_for(layout);
  const auto host = std::this_thread::get_id();

  bool registered = false;
  worker->async_register_kv_caches(layout, kv.get(), asio::bind_executor(rt.host_executor(), [&](std::error_code ec, Done) {
    CHECK(!ec);
    CHECK(std::this_thread::get_id() == host);
    CHECK(rt.host_queue().running_in_this_thread());
    registered = true;
  }));
  REQUIRE(host_loop(rt, [&] { return registered; }));
  // Awaitables of the monitor run on kvlink's executor; their result comes
  // to the host through the fd.
  std::optional<bool> healthy;
  asio::co_spawn(rt.executor(), worker->monitor().wait_for(health::State::healthy, 5s),
                 asio::bind_executor(rt.host_executor(), [&](std::exception_ptr, bool ok) { healthy = ok; }));
  REQUIRE(host_loop(rt, [&] { return healthy.has_value(); }));
  REQUIRE(*healthy);

  // Any transition from now on is delivered to the host through the fd.
  std::optional<health::Transition> seen;
  worker->monitor().async_changed(asio::bind_executor(rt.host_executor(), [&](std::error_code ec, health::Transition t) {
    CHECK(std::this_thread::get_id() == host);
    if (!ec) seen = t;
  }));

  // The host is busy (a long forward pass) for 12 heartbeat intervals and
  // polls nothing: kvlink's own thread keeps pinging, nothing is judged late.
  bool finished = false;
  worker->async_get_finished({}, asio::bind_executor(rt.host_executor(), [&](std::error_code ec, FinishedSets) {
    CHECK(!ec);
    finished = true;
  }));
  const auto before = counters(worker);
  std::this_thread::sleep_for(600ms);  // the host's stall, the scenario under test
  const auto after = counters(worker);
  CHECK(!finished);  // it waits for the host's poll()
  pollfd p{rt.host_fd(), POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 1);
  CHECK(after.pings_ok >= before.pings_ok + 4);
  CHECK(after.pings_failed == before.pings_failed);
  CHECK(rt.poll() >= 1);
  CHECK(finished);
  CHECK(!seen);
  CHECK(worker->monitor().state() == health::State::healthy);

  // The server dies while the host sleeps on the fd: the socket's EOF on
  // kvlink's thread becomes a transition that wakes the host's loop.
  server.kill();
  REQUIRE(host_loop(rt, [&] { return seen.has_value(); }, 5s));
  CHECK(seen->from == health::State::healthy);
  CHECK(seen->to == health::State::degraded);
  (void)worker->shutdown(1s);  // teardown: its answer is not under test
}

TEST_CASE("embed (c): adapters on the host's own io_context; the heartbeat runs while the host runs it") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "16MiB", "--no-huge-pages", "--log-level", "warn"});
  server.start();
  asio::io_context io;  // the host's, run by this thread only
  auto worker = WorkerAdapter::create(io.get_executor(), fast_worker(dir.socket()));
  const auto layout = small_layout();
  UniqueFd kv = memfd_for(layout);
  CHECK(test::run(io, store_and_finish(worker, kv.get())) == 2);
  REQUIRE(test::run_until(io, [&] { return worker->monitor().state() == health::State::healthy; }));
  const auto before = worker->monitor().counters();  // this thread is the executor's
  REQUIRE(test::run_until(io, [&] { return worker->monitor().counters().pings_ok >= before.pings_ok + 4; }, 5s));
  CHECK(worker->monitor().counters().pings_failed == before.pings_failed);
  bool shut = false;
  worker->async_shutdown([&](std::error_code ec, Done) {
    CHECK(!ec);
    shut = true;
  });
  CHECK(test::run_until(io, [&] { return shut; }));
}
