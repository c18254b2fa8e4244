// kvlink-cli: operator's tool. `ping` measures round trips to a server;
// `stats` prints the server's counters as one JSON object on one line.
// `watch` runs one health monitor and prints its events as JSON lines.
// `health` is the probe: one HELLO and one PING within a deadline, one line.
//
// Exit codes, the same for every subcommand (kExitCodes, printed by --help):
// 0 success; 1 the server did not answer, answered late, refused or is
// unhealthy (draining); 2 bad usage or bad arguments (CLI11's parse errors
// included: it would exit 105, 106, 109, ...).
#include <asio/co_spawn.hpp>
#include <asio/signal_set.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fmt/format.h>

#include "kvlink/health/monitor.hpp"
#include "kvlink/log.hpp"
#include "kvlink/net/auth_token.hpp"
#include "kvlink/net/connection.hpp"
#include "kvlink/version.hpp"
#include "event_json.hpp"

namespace {

using namespace std::chrono;
using kvlink::net::Clock;
using kvlink::tools::json_string;
using kvlink::tools::unix_ms;

// HELLO's shared secret: --auth-token-file, else $KVLINK_AUTH_TOKEN.
std::string g_auth_token;

struct PingOptions {
  std::string server = kvlink::net::default_endpoint();
  int count = 5;
  int timeout_ms = 1000;
  int interval_ms = 200;
};

constexpr int kExitOk = 0;
constexpr int kExitServer = 1;  // no answer, late, refused, unhealthy
constexpr int kExitUsage = 2;   // bad usage or arguments
constexpr const char* kExitCodes =
    "Exit codes (every subcommand): 0 success; 1 the server did not answer in time, refused (e.g. a wrong auth "
    "token) or is unhealthy (draining); 2 bad usage or bad arguments.";

// An admin connection for one subcommand, or the exit code saying why not
// (and `error`, printed unless `quiet`): kExitUsage for a bad endpoint,
// kExitServer when the server is absent, silent or refuses.
struct AdminConnection {
  int exit_code = kExitOk;
  std::string error;
  kvlink::net::Endpoint endpoint;
  kvlink::net::ConnectResult connected;
};

asio::awaitable<AdminConnection> connect_admin(std::string server, Clock::duration timeout, std::string client_name,
                                               bool quiet = false) {
  AdminConnection a;
  auto endpoint = kvlink::net::parse_endpoint(server);
  if (!endpoint) {
    a.error = endpoint.error().message();
    fmt::print(stderr, "kvlink-cli: {}\n", a.error);
    a.exit_code = kExitUsage;
    co_return a;
  }
  a.endpoint = *endpoint;
  kvlink::wire::HelloRequest hello;
  hello.role = kvlink::wire::Role::admin;
  hello.instance_id = kvlink::net::random_instance_id();
  hello.client_name = std::move(client_name);
  hello.auth_token = g_auth_token;
  a.connected = co_await kvlink::net::connect(co_await asio::this_coro::executor, a.endpoint, hello, timeout);
  if (a.connected.error) {
    a.error = a.connected.error.message();
    if (!quiet) fmt::print(stderr, "kvlink-cli: {}\n", a.error);
    a.exit_code = kExitServer;
  }
  co_return a;
}

asio::awaitable<int> run_ping(PingOptions opt) {
  auto ex = co_await asio::this_coro::executor;
  auto admin = co_await connect_admin(opt.server, milliseconds(opt.timeout_ms), "kvlink-cli ping");
  if (admin.exit_code != 0) co_return admin.exit_code;
  const auto& ep = admin.endpoint;
  const auto& connected = admin.connected;
  auto conn = connected.connection;
  fmt::print("connected to {} (boot id {:016x}, server {}, chunk size {})\n", ep.to_string(), connected.hello.boot_id,
             connected.hello.server_version, connected.hello.chunk_size);
  std::vector<double> rtts;
  int failures = 0;
  asio::steady_timer pause(ex);
  for (int i = 0; i < opt.count; ++i) {
    const auto t0 = Clock::now();
    auto [ec, reply] = co_await conn->async_call(kvlink::wire::PingRequest{}, milliseconds(opt.timeout_ms),
                                                 asio::experimental::as_tuple(asio::use_awaitable));
    const double us = duration<double, std::micro>(Clock::now() - t0).count();
    if (ec) {
      ++failures;
      fmt::print("ping {}: failed: {}\n", i + 1, ec.message());
      if (ec == kvlink::errc::connection_lost) break;
    } else {
      rtts.push_back(us);
      fmt::print("ping {}: rtt {:.1f} us\n", i + 1, us);
    }
    std::fflush(stdout);
    if (i + 1 < opt.count && opt.interval_ms > 0) {
      pause.expires_after(milliseconds(opt.interval_ms));
      co_await pause.async_wait(asio::use_awaitable);
    }
  }
  conn->close();
  if (!rtts.empty()) {
    std::sort(rtts.begin(), rtts.end());
    auto pct = [&](double p) { return rtts[std::min(rtts.size() - 1, static_cast<std::size_t>(p * rtts.size()))]; };
    fmt::print("{} sent, {} ok, {} failed; rtt min {:.1f} us, p50 {:.1f} us, p99 {:.1f} us\n", opt.count, rtts.size(),
               failures, rtts.front(), pct(0.50), pct(0.99));
  } else {
    fmt::print("{} sent, 0 ok, {} failed\n", opt.count, failures);
  }
  if (failures > 0) {
    fmt::print(stderr, "kvlink-cli: {} of {} pings to {} failed\n", failures, opt.count, ep.to_string());
    co_return kExitServer;
  }
  co_return kExitOk;
}

struct StatsOptions {
  std::string server = kvlink::net::default_endpoint();
  int timeout_ms = 2000;
};

asio::awaitable<int> run_stats(StatsOptions opt) {
  auto admin = co_await connect_admin(opt.server, milliseconds(opt.timeout_ms), "kvlink-cli stats");
  if (admin.exit_code != 0) co_return admin.exit_code;
  const auto& ep = admin.endpoint;
  const auto& connected = admin.connected;
  auto conn = connected.connection;
  auto [ec, reply] = co_await conn->async_call(kvlink::wire::StatsRequest{}, milliseconds(opt.timeout_ms),
                                               asio::experimental::as_tuple(asio::use_awaitable));
  const std::string server_message = ec ? conn->last_error_message() : std::string();
  conn->close();
  if (ec) {
    fmt::print(stderr, "kvlink-cli: STATS to {} failed: {}{}\n", ep.to_string(), ec.message(),
               server_message.empty() ? "" : ": " + server_message);
    co_return kExitServer;
  }
  std::string line = "{";
  line += fmt::format("\"server\":{},\"boot_id\":\"{:016x}\",\"server_version\":{}", json_string(ep.to_string()),
                      connected.hello.boot_id, json_string(connected.hello.server_version));
  for (const auto& e : reply.entries) line += fmt::format(",{}:{}", json_string(e.name), e.value);
  line += "}";
  fmt::print("{}\n", line);
  co_return kExitOk;
}

struct HealthOptions {
  std::string server = kvlink::net::default_endpoint();
  double timeout_s = 2;
};

// The probe: connect, HELLO as an admin, one PING, all within timeout_s;
// one line on stdout ("healthy: ..." or "unhealthy: ..."). A server that
// accepts but never answers fails by the deadline like an absent one.
asio::awaitable<int> run_health(HealthOptions opt) {
  const auto timeout = duration_cast<Clock::duration>(duration<double>(opt.timeout_s));
  const auto t0 = Clock::now();
  const auto deadline = t0 + timeout;
  auto admin = co_await connect_admin(opt.server, timeout, "kvlink-cli health", true);
  if (admin.exit_code == kExitUsage) co_return admin.exit_code;
  if (admin.exit_code != kExitOk) {
    fmt::print("unhealthy: {}\n", admin.error);
    co_return admin.exit_code;
  }
  const std::string ep = admin.endpoint.to_string();
  const auto hello = admin.connected.hello;
  auto conn = admin.connected.connection;
  const auto left = std::max(deadline - Clock::now(), Clock::duration(milliseconds(1)));
  auto [ec, reply] = co_await conn->async_call(kvlink::wire::PingRequest{}, left,
                                               asio::experimental::as_tuple(asio::use_awaitable));
  const double ms = duration<double, std::milli>(Clock::now() - t0).count();
  conn->close();
  if (ec) {
    fmt::print("unhealthy: {}: PING failed after {:.1f} ms: {}\n", ep, ms, ec.message());
    co_return kExitServer;
  }
  if (hello.draining != 0) {
    fmt::print("unhealthy: {}: draining for a planned restart (boot id {:016x}, server {})\n", ep, hello.boot_id,
               hello.server_version);
    co_return kExitServer;
  }
  fmt::print("healthy: {} answered in {:.1f} ms (boot id {:016x}, server {})\n", ep, ms, hello.boot_id,
             hello.server_version);
  co_return kExitOk;
}

// Runs a coroutine returning an exit code on a fresh io_context; with a
// `limit`, gives up after it (kExitServer): a hang guard behind the
// coroutine's own deadlines.
int run(asio::awaitable<int> task, Clock::duration limit = Clock::duration::zero()) {
  asio::io_context io(1);
  int rc = kExitServer;
  bool done = false;
  asio::co_spawn(io, std::move(task), [&](std::exception_ptr e, int r) {
    done = true;
    rc = r;
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        fmt::print(stderr, "kvlink-cli: {}\n", ex.what());
        rc = kExitServer;
      }
    }
  });
  if (limit > Clock::duration::zero()) {
    io.run_for(limit);
    if (!done) {
      fmt::print("unhealthy: no answer within {:.1f} s\n", duration<double>(limit).count());
      std::fflush(stdout);
      // Abandons the coroutine where it hangs rather than unwinding it.
      std::_Exit(kExitServer);
    }
  } else {
    io.run();
  }
  return rc;
}

struct WatchOptions {
  std::string server = kvlink::net::default_endpoint();
  int interval_ms = 1000;
  int timeout_ms = 1000;
  int failure_threshold = 2;
  int success_threshold = 2;
  double duration_s = 0;  // 0: until SIGINT
};

// Transitions and notices; connections coming and going show in them.
void print_event(const kvlink::health::Event& e) {
  using Kind = kvlink::health::Event::Kind;
  if (e.kind == Kind::connected || e.kind == Kind::disconnected) return;
  fmt::print("{}\n", kvlink::tools::event_json(e));
  std::fflush(stdout);
}

int run_watch(const WatchOptions& opt) {
  namespace health = kvlink::health;
  auto parsed = kvlink::net::parse_endpoint(opt.server);
  if (!parsed) {
    fmt::print(stderr, "kvlink-cli: {}\n", parsed.error().message());
    return kExitUsage;
  }
  const kvlink::net::Endpoint& ep = *parsed;
  asio::io_context io(1);
  health::MonitorOptions o;
  o.endpoint = ep;
  o.health.interval = milliseconds(opt.interval_ms);
  o.health.ping_timeout = milliseconds(opt.timeout_ms);
  o.health.connect_timeout = milliseconds(opt.timeout_ms);
  o.health.failure_threshold = opt.failure_threshold;
  o.health.success_threshold = opt.success_threshold;
  o.hello.role = kvlink::wire::Role::admin;
  o.hello.client_name = "kvlink-cli watch";
  o.hello.auth_token = g_auth_token;
  o.name = "kvlink-cli watch";
  auto monitor = health::Monitor::create(io.get_executor(), o);
  monitor->on_event(print_event);
  monitor->gate().open("kvlink-cli watch started");
  monitor->start();

  asio::signal_set signals(io, SIGINT, SIGTERM);
  asio::steady_timer end(io);
  auto finish = [&] {
    monitor->stop();
    signals.cancel();
    end.cancel();
  };
  signals.async_wait([&](std::error_code ec, int) {
    if (!ec) finish();
  });
  if (opt.duration_s > 0) {
    end.expires_after(duration_cast<Clock::duration>(duration<double>(opt.duration_s)));
    end.async_wait([&](std::error_code ec) {
      if (!ec) finish();
    });
  }
  io.run();
  const auto c = monitor->counters();
  fmt::print(R"({{"ts_ms":{},"event":"summary","pings_sent":{},"pings_ok":{},"pings_failed":{},"last_rtt_us":{:.1f},)"
             R"("transitions":{},"connects_ok":{},"hellos_repeated":{}}})"
             "\n",
             unix_ms(), c.pings_sent, c.pings_ok, c.pings_failed, duration<double, std::micro>(c.last_rtt).count(),
             c.transitions, c.connects_ok, c.hellos_repeated);
  std::fflush(stdout);
  // A probe's answer: 1 when the server never answered a ping.
  return c.pings_ok > 0 ? kExitOk : kExitServer;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvlink-cli: talk to a kvlink-server"};
  app.set_version_flag("--version", std::string("kvlink-cli ") + kvlink::version_string);
  app.require_subcommand(1);
  app.fallthrough();  // --auth-token-file may follow the subcommand too
  app.footer(kExitCodes);
  kvlink::log::set_level(kvlink::log::Level::warn);

  PingOptions ping;
  auto* ping_cmd = app.add_subcommand("ping", "Measure PING round trips to a server");
  ping_cmd->add_option("--server,-s", ping.server, "Server endpoint (unix:/path or tcp:HOST:PORT)")->capture_default_str();
  ping_cmd->add_option("--count,-c", ping.count, "Number of pings")->capture_default_str()->check(CLI::Range(1, 10000000));
  ping_cmd->add_option("--timeout-ms", ping.timeout_ms, "Deadline for the connection and for each ping")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  ping_cmd->add_option("--interval-ms", ping.interval_ms, "Pause between pings")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600000));
  ping_cmd->footer(kExitCodes);

  HealthOptions health;
  auto* health_cmd = app.add_subcommand(
      "health", "Probe a server: HELLO and one PING within --timeout-s; print one line; exit 0 if it answered");
  health_cmd->add_option("--server,-s", health.server, "Server endpoint (unix:/path or tcp:HOST:PORT)")
      ->capture_default_str();
  health_cmd->add_option("--timeout-s", health.timeout_s, "Deadline for the whole probe (connect, HELLO, PING), seconds")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 3600.0));
  health_cmd->footer(kExitCodes);

  StatsOptions stats;
  auto* stats_cmd = app.add_subcommand("stats", "Print the server's counters and gauges as one JSON line");
  stats_cmd->add_option("--server,-s", stats.server, "Server endpoint (unix:/path or tcp:HOST:PORT)")
      ->capture_default_str();
  stats_cmd->add_option("--timeout-ms", stats.timeout_ms, "Deadline for the connection and the request")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  stats_cmd->footer(kExitCodes);

  WatchOptions watch;
  auto* watch_cmd = app.add_subcommand("watch", "Run a health monitor; print one JSON object per event and line");
  watch_cmd->add_option("--server,-s", watch.server, "Server endpoint (unix:/path or tcp:HOST:PORT)")
      ->capture_default_str();
  watch_cmd->add_option("--interval-ms", watch.interval_ms, "Time between pings")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  watch_cmd->add_option("--timeout-ms", watch.timeout_ms, "Deadline of each ping and connect")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  watch_cmd->add_option("--failure-threshold", watch.failure_threshold, "Consecutive failures that mean degraded")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  watch_cmd->add_option("--success-threshold", watch.success_threshold, "Consecutive successes that mean healthy again")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  watch_cmd->add_option("--duration-s", watch.duration_s, "Stop after this long (0: until SIGINT)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e9));
  watch_cmd->footer(std::string("watch exits 0 if the server answered at least one ping, 1 if it never did. ") +
                    kExitCodes);

  std::string token_file;
  app.add_option("--auth-token-file", token_file,
                 "File holding the server's shared secret (default: $KVLINK_AUTH_TOKEN, if set)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every parse error is bad usage (CLI11's
    // own codes, 105 and up, would differ from error to error).
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  if (auto token = kvlink::net::resolve_auth_token({}, token_file); token) {
    g_auth_token = std::move(*token);
  } else {
    fmt::print(stderr, "kvlink-cli: --auth-token-file: {}\n", token.error().message());
    return kExitUsage;
  }
  if (*ping_cmd) return run(run_ping(ping));
  if (*health_cmd) {
    // The hang guard: the probe's own deadlines end it first.
    const auto limit = duration_cast<Clock::duration>(duration<double>(health.timeout_s)) + milliseconds(500);
    return run(run_health(health), limit);
  }
  if (*stats_cmd) return run(run_stats(stats));
  if (*watch_cmd) return run_watch(watch);
  return kExitUsage;
}
