// kvlink-server's HTTP admin plane (--http), against the real binary with a
// real HTTP client (cpp-httplib's): every endpoint, /metrics parsed by the
// reference Prometheus parser (python3-prometheus-client) against known
// traffic, an engine simulator's instance shown connected then
// disconnected, the bearer token, and bad HTTP input that must affect
// nothing else.
#include <doctest/doctest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include "child.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::test::Child;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;

namespace {

// host and port of "http://HOST:PORT".
std::pair<std::string, int> host_port(const std::string& url) {
  const auto rest = url.substr(url.find("//") + 2);
  const auto colon = rest.rfind(':');
  return {rest.substr(0, colon), std::stoi(rest.substr(colon + 1))};
}

httplib::Client client(const std::string& url) {
  auto [host, port] = host_port(url);
  httplib::Client c(host, port);
  c.set_connection_timeout(2, 0);
  c.set_read_timeout(5, 0);
  return c;
}

// Runs /usr/bin/python3 on `script` with `args`, `input` on stdin; its stdout.
std::string python(const std::string& dir, const std::string& script, const std::string& input,
                   const std::string& args = {}) {
  const std::string in = dir + "/in.txt", py = dir + "/script.py";
  std::ofstream(in) << input;
  std::ofstream(py) << script;
  std::string out;
  const int rc = test::run_command("/usr/bin/python3 " + py + " " + args + " < " + in, out);
  INFO(out);
  REQUIRE(rc == 0);
  return out;
}

// The value of one sample of /metrics text, read by prometheus_client's
// parser (which also rejects anything malformed); -1 if absent.
std::int64_t metric(const std::string& dir, const std::string& text, const std::string& sample) {
  constexpr const char* script = R"(
import sys
from prometheus_client.parser import text_string_to_metric_families
name, labels = sys.argv[1], dict(a.split('=') for a in sys.argv[2:])
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            print(int(s.value)); sys.exit(0)
print(-1)
)";
  return std::stoll(python(dir, script, text, sample));
}

std::string get_body(const std::string& url, const std::string& path) {
  auto c = client(url);
  auto r = c.Get(path.c_str());
  REQUIRE(r);
  REQUIRE(r->status == 200);
  return r->body;
}

}  // namespace

TEST_CASE("admin http: every endpoint of a real server answers, and /status is valid JSON naming it") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0"});
  server.start();
  REQUIRE(!server.admin_url().empty());
  auto c = client(server.admin_url());
  auto health = c.Get("/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
  CHECK(health->body == "ok\n");
  auto ready = c.Get("/readyz");
  REQUIRE(ready);
  CHECK(ready->status == 200);
  auto page = c.Get("/");
  REQUIRE(page);
  CHECK(page->status == 200);
  CHECK(page->get_header_value("Content-Type").starts_with("text/html"));
  CHECK(page->body.find("<html") != std::string::npos);
  auto missing = c.Get("/admin");
  REQUIRE(missing);
  CHECK(missing->status == 404);
  auto post = c.Post("/status", "x", "text/plain");
  REQUIRE(post);
  CHECK(post->status == 405);

  const std::string status = get_body(server.admin_url(), "/status");
  const std::string summary = python(dir.path(), R"(
import json, sys
s = json.load(sys.stdin)
print(s["boot_id"], s["ready"], s["draining"], s["listeners"][0], s["l1"]["capacity_bytes"], len(s["instances"]))
)", status);
  const std::string ready_line = server.ready_line();
  const std::string boot = ready_line.substr(ready_line.find("boot_id=") + 8, 16);
  CHECK(summary == boot + " True False " + server.endpoint() + " 67108864 0\n");
}

TEST_CASE("admin http: /metrics counts known traffic, read by the Prometheus text parser") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0"});
  server.start();
  std::string out;
  REQUIRE(test::run_command(ServerProcess::binary("KVLINK_CLI") + " ping --server " + server.endpoint() +
                                " --count 7 --interval-ms 0",
                            out) == 0);
  // Snapshots are published every 250 ms.
  std::int64_t pings = -1, observed = -1;
  for (int i = 0; i < 40 && pings != 7; ++i) {
    std::this_thread::sleep_for(100ms);
    const std::string text = get_body(server.admin_url(), "/metrics");
    pings = metric(dir.path(), text, "kvlink_requests_total op=ping");
    observed = metric(dir.path(), text, "kvlink_request_duration_seconds_count op=ping");
  }
  CHECK(pings == 7);
  CHECK(observed == 7);
  const std::string text = get_body(server.admin_url(), "/metrics");
  CHECK(metric(dir.path(), text, "kvlink_l1_capacity_bytes") == 64 << 20);
  CHECK(metric(dir.path(), text, "kvlink_server_ready") == 1);
  CHECK(metric(dir.path(), text, "kvlink_refusals_total limit=auth_token") == 0);
}

TEST_CASE("admin http: an engine's instances show connected with their registration, then disconnected") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0", "--chunk-size",
                        "16"});
  server.start();
  Child sim({ServerProcess::binary("KVLINK_ENGINE_SIM"), "--server", server.endpoint(), "--warmup-ms", "50",
             "--duration-s", "60", "--rate", "50", "--block-size", "16"});
  constexpr const char* workers_py = R"(
import json, sys
s = json.load(sys.stdin)
w = [i for i in s["instances"] if i["role"] == "worker" and i["registration"]]
kinds = sorted(set(e["kind"] for e in s["events"]))
print(len(w), sum(i["connected"] for i in w), s["l1"]["used_bytes"] > 0, s["totals"]["stored_bytes"] > 0,
      w[0]["pid"] if w else 0, w[0]["registration"]["model"] if w else "", ",".join(kinds))
)";
  std::string seen;
  const std::string pid = std::to_string(sim.pid());
  for (int i = 0; i < 100; ++i) {
    seen = python(dir.path(), workers_py, get_body(server.admin_url(), "/status"));
    if (seen.starts_with("1 1 True True")) break;
    std::this_thread::sleep_for(100ms);
  }
  INFO(sim.output());
  CHECK(seen == "1 1 True True " + pid + " sim-model connect,register\n");
  sim.signal(SIGKILL);
  for (int i = 0; i < 50; ++i) {
    seen = python(dir.path(), workers_py, get_body(server.admin_url(), "/status"));
    if (seen.starts_with("1 0")) break;
    std::this_thread::sleep_for(100ms);
  }
  // Kept (its registration waits for it to come back or be reaped), shown disconnected.
  CHECK(seen == "1 0 True True " + pid + " sim-model connect,disconnect,register\n");
}

TEST_CASE("admin http: with an auth token, /status and /metrics need it; the probes answer without") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0"});
  server.set_env("KVLINK_AUTH_TOKEN", "admin-secret");
  server.start();
  auto c = client(server.admin_url());
  auto none = c.Get("/status");
  REQUIRE(none);
  CHECK(none->status == 401);
  CHECK(none->get_header_value("WWW-Authenticate") == "Bearer");
  auto wrong = c.Get("/metrics", {{"Authorization", "Bearer nope"}});
  REQUIRE(wrong);
  CHECK(wrong->status == 401);
  auto right = c.Get("/metrics", {{"Authorization", "Bearer admin-secret"}});
  REQUIRE(right);
  CHECK(right->status == 200);
  auto health = c.Get("/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
}

TEST_CASE("admin http: a non-loopback --http without a token, or a malformed one, stops the server with the reason") {
  TempDir dir;
  std::string out;
  const std::string server = ServerProcess::binary("KVLINK_SERVER");
  CHECK(test::run_command(server + " --listen " + dir.socket() + " --l1-size 64MiB --http 0.0.0.0:0", out) != 0);
  CHECK(out.find("not a loopback address") != std::string::npos);
  CHECK(test::run_command(server + " --listen " + dir.socket() + " --l1-size 64MiB --http localhost", out) != 0);
  CHECK(out.find("HOST:PORT") != std::string::npos);
}

TEST_CASE("admin http: oversized and slow requests are bounded and affect nothing else") {
  TempDir dir;
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0"});
  server.start();
  auto c = client(server.admin_url());
  auto long_uri = c.Get(("/" + std::string(20000, 'a')).c_str());
  REQUIRE(long_uri);
  CHECK(long_uri->status == 414);
  auto big_header = c.Get("/status", {{"X-Big", std::string(20000, 'b')}});
  CHECK((!big_header || big_header->status >= 400));
  auto big_body = c.Post("/status", std::string(1 << 20, 'c'), "text/plain");
  CHECK((!big_body || big_body->status == 413));

  // Slow clients: more connections than the listener has threads, each
  // sending half a request line and then nothing.
  auto [host, port] = host_port(server.admin_url());
  std::vector<int> slow;
  for (int i = 0; i < 6; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    const char partial[] = "GET /status HTTP/1.1\r\nHost: x";
    REQUIRE(::send(fd, partial, sizeof partial - 1, 0) > 0);
    slow.push_back(fd);
  }
  // The engine-facing listener does not notice.
  std::string out;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(test::run_command(ServerProcess::binary("KVLINK_CLI") + " ping --server " + server.endpoint() +
                              " --count 3 --interval-ms 0 --timeout-ms 500",
                          out) == 0);
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  // Each slow one holds an HTTP thread for two read timeouts (2 x 2 s) at
  // most, so a probe queued behind them is answered within a bound.
  c.set_read_timeout(15, 0);
  auto probe = c.Get("/healthz");
  REQUIRE(probe);
  CHECK(probe->status == 200);
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  for (int fd : slow) {
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    // An error reply (400: the request never ended), then the close.
    std::string reply;
    char buf[512];
    errno = 0;
    for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) reply.append(buf, static_cast<std::size_t>(n));
    CHECK((reply.empty() || reply.starts_with("HTTP/1.1 4")));
    CHECK(errno != EAGAIN);  // closed, not the 5 s receive timeout
    ::close(fd);
  }
}

TEST_CASE("admin http: /metrics shows the disk tier when there is one, and nothing of it when not") {
  TempDir dir;
  {
    ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0", "--l2-disk",
                          dir.path() + "/tier", "--l2-disk-size", "8MiB"});
    server.start();
    std::string text;
    for (int i = 0; i < 40 && text.find("kvlink_tier_healthy") == std::string::npos; ++i) {
      std::this_thread::sleep_for(100ms);
      text = get_body(server.admin_url(), "/metrics");
    }
    CHECK(metric(dir.path(), text, "kvlink_tier_healthy tier=disk") == 1);
    CHECK(metric(dir.path(), text, "kvlink_tier_capacity_bytes tier=disk") == 8 << 20);
    CHECK(metric(dir.path(), text, "kvlink_tier_chunks tier=disk") == 0);
    CHECK(metric(dir.path(), text, "kvlink_tier_chunks_total tier=disk op=write") == 0);
    CHECK(metric(dir.path(), text, "kvlink_tier_healthy tier=cluster") == -1);
  }
  ServerProcess server({"--listen", dir.socket(), "--l1-size", "64MiB", "--http", "127.0.0.1:0"});
  server.start();
  std::this_thread::sleep_for(300ms);
  CHECK(metric(dir.path(), get_body(server.admin_url(), "/metrics"), "kvlink_tier_healthy") == -1);
}
