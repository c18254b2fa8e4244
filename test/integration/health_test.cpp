// The health monitor against the real kvlink-server: kill, stop, restart,
// absent server, long warmup, busy server.
#include <doctest/doctest.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include "kvlink/adapter/worker.hpp"
#include "kvlink/health/monitor.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/server/server.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::health;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::parse;
using kvlink::test::run_for;
using kvlink::test::run_until;

namespace {

struct Fixture {
  TempDir dir;
  std::string endpoint = dir.socket();
  ServerProcess server;
  asio::io_context io;
  std::shared_ptr<Monitor> monitor;
  std::vector<Event> events;

  explicit Fixture(std::vector<std::string> extra = {}) : server(args(endpoint, std::move(extra))) {}
  static std::vector<std::string> args(const std::string& ep, std::vector<std::string> extra) {
    std::vector<std::string> a{"--listen", ep, "--log-level", "warn"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  Config fast() {
    Config c;
    c.interval = 50ms;
    c.ping_timeout = 50ms;
    c.reconnect_initial = 5ms;
    c.reconnect_max = 20ms;
    c.connect_timeout = 200ms;
    return c;
  }
  void make(Config c, const std::string& ep = {}) {
    MonitorOptions o;
    o.health = c;
    o.endpoint = parse(ep.empty() ? endpoint : ep);
    o.hello.role = wire::Role::worker;
    o.hello.client_name = "health_test";
    o.name = "health_test";
    monitor = Monitor::create(io.get_executor(), o);
    monitor->on_event([this](const Event& e) { events.push_back(e); });
    monitor->start();
  }
  int count(Event::Kind kind) const {
    return static_cast<int>(
        std::count_if(events.begin(), events.end(), [kind](const Event& e) { return e.kind == kind; }));
  }
  int transitions() const { return count(Event::Kind::transition); }
  // HELLOs answered: each connection, and each HELLO said again.
  int hellos() const { return count(Event::Kind::connected); }
  const Transition& last() const {
    for (auto it = events.rbegin(); it != events.rend(); ++it)
      if (it->kind == Event::Kind::transition) return it->transition;
    FAIL("no transition");
    throw;
  }
  bool wait(State s, std::chrono::milliseconds limit = 10s) {
    return run_until(io, [&] { return monitor->state() == s; }, limit);
  }
  bool connected() { return run_until(io, [&] { return monitor->connection() != nullptr; }); }
  void healthy() {
    monitor->gate().open("test ready");
    REQUIRE(wait(State::healthy));
  }
  ~Fixture() {
    if (monitor) {
      monitor->stop();
      // Until every handler let go of the monitor (a connect attempt in
      // flight ends by its timeout), so the io_context dies with no work.
      run_until(io, [&] { return monitor->state() == State::stopped && monitor.use_count() == 1; }, 5s);
    }
  }
};

}  // namespace

TEST_CASE("health: SIGKILL marks the link degraded at once through EOF") {
  Fixture f;
  f.server.start();
  Config c = f.fast();
  c.interval = 10s;  // pings cannot be what detects it
  c.ping_timeout = 10s;
  f.make(c);
  f.healthy();
  const auto killed = Clock::now();
  f.server.kill();
  REQUIRE(f.wait(State::degraded, 5s));
  CHECK(Clock::now() - killed < 2s);
  CHECK(f.last().reason.find("connection lost") != std::string::npos);
  CHECK(f.last().from == State::healthy);
}

TEST_CASE("health: SIGSTOP -> degraded by ping timeouts; SIGCONT -> healthy again after hysteresis") {
  Fixture f;
  f.server.start();
  f.make(f.fast());
  f.healthy();
  f.server.stop();
  REQUIRE(f.wait(State::degraded, 5s));
  CHECK(f.last().reason.find("ping timed out") != std::string::npos);
  const auto before = f.monitor->counters();
  CHECK(before.pings_failed >= 2);
  f.server.resume();
  REQUIRE(f.wait(State::healthy, 5s));
  CHECK(f.last().from == State::degraded);
  CHECK(f.last().outage > 0ms);
  CHECK(f.monitor->counters().pings_ok >= before.pings_ok + 2);  // success_threshold
  CHECK(f.hellos() == 1);  // the same connection throughout
}

TEST_CASE("health: server restarted on the same endpoint -> re-registered, then healthy") {
  // Exactly one log line per transition each way: capture the log.
  auto lines = std::make_shared<std::vector<std::string>>();
  log::set_sink([lines](log::Level, std::string_view line) { lines->emplace_back(line); });
  struct Restore {
    ~Restore() { log::set_sink(nullptr); }
  } restore;
  Fixture f;
  f.server.start();
  f.make(f.fast());
  f.healthy();
  const std::uint64_t boot1 = f.monitor->boot_id();
  f.server.kill();
  REQUIRE(f.wait(State::degraded, 5s));
  f.server.start();
  REQUIRE(f.wait(State::healthy, 10s));
  CHECK(f.monitor->boot_id() != boot1);
  CHECK(f.hellos() == 2);
  auto count = [&](std::string_view needle) {
    return std::count_if(lines->begin(), lines->end(),
                         [&](const std::string& l) { return l.find(needle) != std::string::npos; });
  };
  CHECK(count("degraded (healthy -> degraded): connection lost") == 1);
  CHECK(count("healthy again after an outage of") == 1);
  CHECK(count("server restarted") == 1);
}

TEST_CASE("health: server absent at start -> a clear degraded state; recovers when it appears") {
  Fixture f;
  f.make(f.fast());
  f.monitor->gate().open("ready");
  REQUIRE(f.wait(State::degraded, 5s));
  CHECK(f.last().from == State::warming);
  CHECK(f.last().reason.find("cannot connect") != std::string::npos);
  CHECK(f.monitor->connection() == nullptr);
  f.server.start();
  REQUIRE(f.wait(State::healthy, 10s));
  CHECK(f.hellos() == 1);
  CHECK(f.transitions() == 2);
}

TEST_CASE("health: a closed gate means no transition, even with the server stopped or killed") {
  Fixture f;
  f.server.start();
  Config c = f.fast();
  f.make(c);
  REQUIRE(f.connected());
  f.server.stop();
  run_for(f.io, 1s);  // 20 intervals of silence from a hung server
  CHECK(f.monitor->state() == State::warming);
  CHECK(f.transitions() == 0);
  CHECK(f.monitor->counters().pings_sent == 0);
  // A lost connection during warmup is reported, not judged.
  f.server.resume();
  f.server.kill();
  REQUIRE(run_until(f.io, [&] { return f.count(Event::Kind::disconnected) == 1; }, 5s));
  CHECK(std::any_of(f.events.begin(), f.events.end(), [](const Event& e) {
    return e.kind == Event::Kind::notice && e.notice.find("during warmup") != std::string::npos;
  }));
  CHECK(f.monitor->state() == State::warming);
  // The gate opens: now the absence counts.
  f.monitor->gate().open("ready");
  REQUIRE(f.wait(State::degraded, 5s));
  f.server.start();
  REQUIRE(f.wait(State::healthy, 10s));
}

TEST_CASE("health: max_warmup opens the gate by itself") {
  Fixture f;
  f.server.start();
  Config c = f.fast();
  c.max_warmup = 200ms;
  f.make(c);
  REQUIRE(f.wait(State::healthy, 5s));
  CHECK(f.monitor->gate().reason() == "max warmup elapsed");
}

TEST_CASE("health: a reaped instance gets unknown_instance and says HELLO again, with no degraded episode") {
  Fixture f({"--reap-timeout-s", "1", "--registration-grace-s", "1"});
  f.server.start();
  f.make(f.fast());
  REQUIRE(f.connected());
  run_for(f.io, 1300ms);  // gate closed, no pings: the server reaps after 1 s of silence
  f.monitor->gate().open("ready");
  REQUIRE(f.wait(State::healthy, 5s));
  CHECK(f.transitions() == 1);  // warming -> healthy, nothing else
  CHECK(f.hellos() == 2);       // the connection's, and the one said again
  CHECK(std::any_of(f.events.begin(), f.events.end(), [](const Event& e) {
    return e.kind == Event::Kind::notice && e.notice.find("saying HELLO again") != std::string::npos;
  }));
  CHECK(f.monitor->counters().hellos_repeated == 1);
}

TEST_CASE("health: changed() and wait_for() observe transitions; report_deadline_missed counts") {
  Fixture f;
  f.server.start();
  f.make(f.fast());
  f.monitor->gate().open("ready");
  std::optional<Transition> seen;
  asio::co_spawn(f.io, f.monitor->changed(), [&](std::exception_ptr, Transition t) { seen = t; });
  REQUIRE(run_until(f.io, [&] { return seen.has_value(); }));
  CHECK(seen->to == State::healthy);
  std::optional<bool> reached;
  asio::co_spawn(f.io, f.monitor->wait_for(State::degraded, 100ms), [&](std::exception_ptr, bool r) { reached = r; });
  REQUIRE(run_until(f.io, [&] { return reached.has_value(); }));
  CHECK_FALSE(*reached);  // timed out: still healthy
  reached.reset();
  asio::co_spawn(f.io, f.monitor->wait_for(State::degraded, 5s), [&](std::exception_ptr, bool r) { reached = r; });
  f.monitor->report_deadline_missed();
  f.monitor->report_deadline_missed();
  REQUIRE(run_until(f.io, [&] { return reached.has_value(); }));
  CHECK(*reached);
  CHECK(f.last().reason.find("deadline") != std::string::npos);
  REQUIRE(f.wait(State::healthy));
}

namespace {
// Keeps `depth` pings in flight on `c` until *stop; counts completions.
asio::awaitable<void> flood(std::shared_ptr<net::Connection> c, std::shared_ptr<bool> stop,
                            std::shared_ptr<std::uint64_t> done, std::shared_ptr<int> active) {
  ++*active;
  while (!*stop) {
    auto [ec, r] = co_await c->async_call(wire::PingRequest{}, 10s, asio::experimental::as_tuple(asio::use_awaitable));
    if (ec) break;
    ++*done;
  }
  --*active;
}
}  // namespace

TEST_CASE("health: a busy server (thousands of pipelined requests) does not make PING time out") {
  Fixture f;
  f.server.start();
  Config c = f.fast();
  c.ping_timeout = 100ms;
  f.make(c);
  f.healthy();
  // Another connection keeps 256 requests in flight.
  wire::HelloRequest hello;
  hello.instance_id = net::random_instance_id();
  std::optional<net::ConnectResult> r;
  asio::co_spawn(f.io, net::connect(f.io.get_executor(), parse(f.endpoint), hello, 5s),
                 [&](std::exception_ptr, net::ConnectResult x) { r = std::move(x); });
  REQUIRE(run_until(f.io, [&] { return r.has_value(); }));
  REQUIRE(!r->error);
  auto stop = std::make_shared<bool>(false);
  auto done = std::make_shared<std::uint64_t>(0);
  auto active = std::make_shared<int>(0);
  for (int i = 0; i < 256; ++i) asio::co_spawn(f.io, flood(r->connection, stop, done, active), asio::detached);
  const auto pings_before = f.monitor->counters().pings_ok;
  REQUIRE(run_until(f.io, [&] { return f.monitor->counters().pings_ok >= pings_before + 20; }, 30s));
  *stop = true;
  CHECK(*done > 1000);
  CHECK(f.monitor->state() == State::healthy);
  CHECK(f.transitions() == 1);  // warming -> healthy only
  CHECK(f.monitor->counters().pings_failed == 0);
  r->connection->close();
  CHECK(run_until(f.io, [&] { return *active == 0; }));
}

TEST_CASE("kvlink-cli watch prints one JSON line per transition and exits 0 at the end or on SIGINT") {
  TempDir dir;
  const std::string ep = dir.socket();
  ServerProcess server({"--listen", ep, "--log-level", "warn"});
  server.start();
  const std::string cli = ServerProcess::binary("KVLINK_CLI");
  const std::string cmd =
      cli + " watch --server " + ep + " --interval-ms 50 --timeout-ms 50 --duration-s 4 2>/dev/null";
  FILE* f = ::popen(cmd.c_str(), "r");
  REQUIRE(f != nullptr);
  std::vector<std::string> lines;
  auto next_line = [&]() -> std::string {
    char buf[4096];
    if (!std::fgets(buf, sizeof buf, f)) return {};
    lines.emplace_back(buf);
    return lines.back();
  };
  std::string l = next_line();
  CHECK(l.find(R"("event":"state","from":"warming","to":"healthy")") != std::string::npos);
  CHECK(l.rfind(R"({"ts_ms":)", 0) == 0);
  server.kill();
  l = next_line();
  CHECK(l.find(R"("to":"degraded","reason":"connection lost)") != std::string::npos);
  server.start();
  for (l = next_line(); !l.empty() && l.find(R"("to":"healthy")") == std::string::npos;) l = next_line();
  CHECK(l.find(R"("from":"degraded","to":"healthy")") != std::string::npos);
  CHECK(l.find(R"("outage_ms":)") != std::string::npos);
  while (!next_line().empty()) {
  }
  const int status = ::pclose(f);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(lines.back().find(R"("event":"summary")") != std::string::npos);

  // SIGINT ends it with status 0 too.
  const std::string interrupted =
      "timeout --preserve-status -s INT 0.5 " + cli + " watch --server " + ep + " >/dev/null 2>&1";
  const int rc = std::system(interrupted.c_str());
  CHECK(WIFEXITED(rc));
  CHECK(WEXITSTATUS(rc) == 0);
}

// A device fault that loses the server's CUDA context cannot be provoked
// safely on a GPU, so the transfer engine's verdict is injected: an
// in-process server with a fake engine whose data path goes down and back.
TEST_CASE("health: a server alive but unable to move KV data makes the worker's link degraded, saying why") {
  TempDir dir;
  asio::io_context server_io;
  transfer::NullTransferEngine engine;
  server::ServerConfig cfg;
  cfg.listen = {dir.socket()};
  cfg.l1_size = 64u << 20;
  cfg.huge_pages = false;
  server::Server server(server_io, cfg, engine);
  server.start();
  auto guard = asio::make_work_guard(server_io);
  std::thread server_thread([&] { server_io.run(); });
  auto set_fault = [&](Error fault) {
    std::promise<void> done;
    asio::post(server_io, [&] {
      engine.set_fault(fault);
      done.set_value();
    });
    done.get_future().wait();
  };

  runtime::Runtime rt;
  adapter::WorkerConfig w;
  w.endpoint = server.endpoints().front();
  w.model = "data-path-model";
  w.health.interval = 50ms;
  w.health.ping_timeout = 1s;
  auto worker = adapter::WorkerAdapter::create(rt.executor(), w);
  const auto layout = wire::paged_layout(2, 64, 16, 2, 16, 2);
  auto kv = transfer::create_kv_memfd(layout, {.name = "health_test-kv", .map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  REQUIRE(worker->register_kv_caches(layout, kv->fd.release(), 5s));
  auto wait = [&](State s) {
    const auto end = Clock::now() + 5s;
    while (worker->monitor().state() != s && Clock::now() < end) std::this_thread::sleep_for(5ms);
    return worker->monitor().state() == s;
  };
  REQUIRE(wait(State::healthy));

  // The next transition, read on the monitor's executor.
  auto next_transition = [&] {
    return asio::co_spawn(worker->monitor().get_executor(), worker->shared_monitor()->changed(), asio::use_future);
  };
  auto degraded = next_transition();
  set_fault(Error(errc::server_error, "injected: the server's CUDA context on CUDA device 0 is lost"));
  REQUIRE(degraded.wait_for(5s) == std::future_status::ready);
  const Transition t = degraded.get();
  CHECK(t.to == State::degraded);
  CHECK(t.reason.find("the server's data path is down: injected") != std::string::npos);
  // While degraded the adapter sends no transfer: the engine recomputes.
  adapter::TransferSpec spec;
  spec.request_id = "r";
  spec.tokens.assign(cfg.chunk_size, 7);  // one full chunk
  for (std::uint32_t b = 0; b < cfg.chunk_size / 16; ++b) spec.block_ids.push_back(b);
  CHECK(worker->submit_store(spec, 2s).error() == errc::unhealthy);

  auto healthy = next_transition();
  set_fault({});
  REQUIRE(healthy.wait_for(5s) == std::future_status::ready);
  CHECK(healthy.get().to == State::healthy);
  auto stored = worker->submit_store(spec, 2s);
  REQUIRE_MESSAGE(stored, stored.error().message());
  CHECK(stored->stored_chunks == 1);

  (void)worker->shutdown(2s);  // teardown: its answer is not under test
  rt.stop();
  asio::post(server_io, [&] { server.stop(); });
  guard.reset();
  server_thread.join();
}
