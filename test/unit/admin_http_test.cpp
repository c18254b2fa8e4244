// The admin plane's decisions, without sockets: which answer each request
// gets from a snapshot (admin_answer), and what the snapshot renders to.
#include <doctest/doctest.h>

#include "kvlink/server/admin_http.hpp"
#include "kvlink/server/status.hpp"

using namespace kvlink;
using namespace kvlink::server;
using namespace std::chrono_literals;

namespace {

ServerStatus ready_status(TimePoint taken) {
  ServerStatus s;
  s.ready = true;
  s.taken_steady = taken;
  s.taken_at = WallClock::now();
  s.started_at = s.taken_at - 10s;
  s.boot_id = 0xabc;
  s.stats = {{"l1_bytes_used", 4096}, {"op_ping_requests", 3}};
  return s;
}

HttpAnswer get(std::string_view path, const ServerStatus* s, TimePoint now, const AdminHttpConfig& c,
               std::string_view auth = {}) {
  return admin_answer("GET", path, auth, s, now, c);
}

}  // namespace

TEST_CASE("admin http: probes, pages and unknown paths") {
  const AdminHttpConfig config;
  const auto now = Clock::now();
  const ServerStatus s = ready_status(now);
  CHECK(get("/healthz", &s, now, config).status == 200);
  CHECK(get("/readyz", &s, now, config).status == 200);
  CHECK(get("/status", &s, now, config).content_type == "application/json");
  CHECK(get("/metrics", &s, now, config).body.find("kvlink_requests_total{op=\"ping\"} 3") != std::string::npos);
  const auto page = get("/", &s, now, config);
  CHECK(page.status == 200);
  CHECK(page.body.find("<html") != std::string::npos);
  const auto missing = get("/metricz", &s, now, config);
  CHECK(missing.status == 404);
  CHECK(missing.body.find("/metrics") != std::string::npos);  // says what exists
  CHECK(admin_answer("POST", "/status", {}, &s, now, config).status == 405);
  CHECK(admin_answer("DELETE", "/", {}, &s, now, config).status == 405);
}

TEST_CASE("admin http: /readyz is 503 while starting and draining; /healthz while the io thread is stuck") {
  const AdminHttpConfig config;  // stale after 5 s
  const auto now = Clock::now();
  CHECK(get("/healthz", nullptr, now, config).status == 503);  // nothing published yet
  CHECK(get("/readyz", nullptr, now, config).status == 503);
  ServerStatus s = ready_status(now);
  s.ready = false;
  CHECK(get("/readyz", &s, now, config).status == 503);
  CHECK(get("/readyz", &s, now, config).body == "starting\n");
  s.ready = true;
  s.draining = true;
  CHECK(get("/readyz", &s, now, config).status == 503);
  CHECK(get("/healthz", &s, now, config).status == 200);  // draining is healthy
  // The io thread last published 6 s ago: stuck.
  const auto stuck = get("/healthz", &s, now + 6s, config);
  CHECK(stuck.status == 503);
  CHECK(stuck.body.find("stuck") != std::string::npos);
  CHECK(get("/healthz", &s, now + 4s, config).status == 200);
}

TEST_CASE("admin http: with a token, /status and /metrics need it as a bearer token; probes and the page do not") {
  AdminHttpConfig config;
  config.auth_token = "s3cret";
  const auto now = Clock::now();
  const ServerStatus s = ready_status(now);
  for (const char* path : {"/status", "/metrics"}) {
    CAPTURE(path);
    const auto none = get(path, &s, now, config);
    CHECK(none.status == 401);
    CHECK(none.body.find("missing") != std::string::npos);
    CHECK(get(path, &s, now, config, "Bearer wrong").status == 401);
    CHECK(get(path, &s, now, config, "s3cret").status == 401);  // not a bearer header
    CHECK(get(path, &s, now, config, "Bearer s3cret").status == 200);
  }
  CHECK(get("/healthz", &s, now, config).status == 200);
  CHECK(get("/readyz", &s, now, config).status == 200);
  CHECK(get("/", &s, now, config).status == 200);
}

TEST_CASE("admin http: a non-loopback address needs a token; a malformed one is refused with the form to use") {
  AdminHttpConfig config;
  config.address = "127.0.0.1:9100";
  CHECK(admin_endpoint(config));
  config.address = "0.0.0.0:9100";
  CHECK(admin_endpoint(config).error().message().find("not a loopback") != std::string::npos);
  config.auth_token = "t";
  CHECK(admin_endpoint(config));
  config.address = "no-port-here";
  CHECK(admin_endpoint(config).error().message().find("HOST:PORT") != std::string::npos);
}

TEST_CASE("status: events keep the last ones; history one sample per interval; JSON names every instance") {
  EventLog log(3);
  const TimePoint t0{};
  for (int i = 0; i < 5; ++i) log.record(t0 + std::chrono::seconds(i), ServerEvent::Kind::connect, 1, std::to_string(i));
  REQUIRE(log.events().size() == 3);
  CHECK(log.events().front().text == "2");
  CHECK(log.events().back().text == "4");

  StatusHistory history(5s, 15s);  // three samples at most
  ServerStatus s = ready_status(Clock::now());
  for (int i = 0; i < 20; ++i) {
    s.totals.stored_bytes = static_cast<std::uint64_t>(i);
    history.update(s, t0 + std::chrono::seconds(i));
  }
  // Samples at 0, 5, 10, 15 s; the first dropped.
  REQUIRE(s.history.size() == 3);
  CHECK(s.history.front().stored_bytes == 5);
  CHECK(s.history.back().stored_bytes == 15);

  InstanceStatus worker;
  worker.id = 0x1234;
  worker.role = wire::Role::worker;
  worker.client = "engine \"one\"";
  worker.peer = {true, 77, 1000, 1000, "pid 77 uid 1000"};
  worker.connections = 0;
  worker.registration = InstanceStatus::Registration{"m", 9, 2, 1, 65536, "2 layers", ""};
  s.instances.push_back(worker);
  s.events.assign(log.events().begin(), log.events().end());
  s.taken_steady = t0 + 4s;
  const std::string json = status_json(s);
  CHECK(json.find(R"("id":"0000000000001234","role":"worker","client":"engine \"one\"","pid":77,"uid":1000)") !=
        std::string::npos);
  CHECK(json.find(R"("connected":false)") != std::string::npos);
  CHECK(json.find(R"("kv_rank":1)") != std::string::npos);
  CHECK(json.find(R"("kind":"connect","instance":"0000000000000001","text":"4")") != std::string::npos);
}

TEST_CASE("status: metrics name instances by role and count them connected or not") {
  ServerStatus s = ready_status(Clock::now());
  InstanceStatus a, b;
  a.role = wire::Role::worker;
  a.connections = 1;
  b.role = wire::Role::worker;
  s.instances = {a, b};
  const std::string text = status_metrics(s);
  CHECK(text.find("kvlink_instances{role=\"worker\"} 2") != std::string::npos);
  CHECK(text.find("kvlink_instances_connected{role=\"worker\"} 1") != std::string::npos);
  CHECK(text.find("kvlink_instances{role=\"scheduler\"} 0") != std::string::npos);
  CHECK(text.find("# TYPE kvlink_request_duration_seconds histogram") != std::string::npos);
  CHECK(text.find("kvlink_l1_used_bytes 4096") != std::string::npos);
}

TEST_CASE("status: tiers below L1 show in the JSON and the metrics, a cluster's nodes one by one") {
  ServerStatus s = ready_status(Clock::now());
  CHECK(status_json(s).find(R"("tiers":[])") != std::string::npos);
  CHECK(status_metrics(s).find("kvlink_tier_") == std::string::npos);

  store::LowerTierStats disk;
  disk.chunks = 7;
  disk.capacity_bytes = 1 << 20;
  store::LowerTierStats cluster;
  cluster.healthy = true;
  cluster.writes = 12;
  cluster.nodes = 2;
  cluster.nodes_degraded = 1;
  s.tiers = {{"disk", disk, {}},
             {"cluster", cluster, {{"127.0.0.1:7000", true, 8192}, {"127.0.0.1:7001", false, 8192}}}};
  const std::string json = status_json(s);
  CHECK(json.find(R"({"name":"disk","healthy":true,"chunks":7,"bytes":0,"capacity_bytes":1048576,)") !=
        std::string::npos);
  CHECK(json.find(R"("nodes":[{"address":"127.0.0.1:7000","healthy":true,"slots":8192},)"
                  R"({"address":"127.0.0.1:7001","healthy":false,"slots":8192}]})") != std::string::npos);
  const std::string text = status_metrics(s);
  CHECK(text.find(R"(kvlink_tier_chunks{tier="disk"} 7)") != std::string::npos);
  CHECK(text.find(R"(kvlink_tier_chunks_total{tier="cluster",op="write"} 12)") != std::string::npos);
  CHECK(text.find(R"(kvlink_tier_node_healthy{tier="cluster",node="127.0.0.1:7001"} 0)") != std::string::npos);
  CHECK(text.find(R"(kvlink_tier_node_slots{tier="cluster",node="127.0.0.1:7000"} 8192)") != std::string::npos);
}
