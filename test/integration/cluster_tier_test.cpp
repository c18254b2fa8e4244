// The Redis Cluster tier end to end: a cluster of 3 masters and 3 replicas
// on loopback, two kvlink-servers as two machines (separate L1s and
// sockets), an engine on each. What engine A stores through server 1
// becomes hits for engine B through server 2, every byte checked. Faults:
// the whole cluster hung (lookups answer within their wait from L1), then
// back; a master killed (the cluster fails over, the servers follow); a
// master hung (the tier's heartbeat marks it, its chunks miss at once,
// until it answers again). Runs in the plain build only (test/meson.build).
#include <doctest/doctest.h>
#include <signal.h>

#include "e2e_fixture.hpp"
#include "redis_cluster.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using namespace kvlink::test::e2e;
using kvlink::test::eventually;

namespace {
const bool no_cluster = !kvlink::test::have_redis();

std::vector<std::string> cluster_args(kvlink::test::RedisCluster& c) {
  return {"--l2-redis-cluster", c.seeds(), "--l2-lookup-wait-ms", "300", "--l2-redis-deadline-ms", "200",
          "--l2-redis-ping-ms", "100"};
}

// The master holding the most keys (so a fault there is sure to touch
// some of the chunks stored).
kvlink::test::RedisCluster::Node& busiest_master(kvlink::test::RedisCluster& c) {
  kvlink::test::RedisCluster::Node* best = nullptr;
  long most = -1;
  for (auto& n : c.nodes()) {
    if (!n.proc || c.cli(n.port, "role").rfind("master", 0) != 0) continue;
    const long keys = std::strtol(c.cli(n.port, "dbsize").c_str(), nullptr, 10);
    if (keys > most) {
      most = keys;
      best = &n;
    }
  }
  REQUIRE(best);
  MESSAGE("master " << best->address() << " holds " << most << " of the chunks");
  return *best;
}

// Looks each prompt up on `f` (ids from `tag`), every byte retrieved
// checked; each lookup must answer within `limit`. The tokens matched, in
// all.
std::uint32_t hit_all(Fixture& f, const std::string& tag, const std::vector<std::vector<store::Token>>& prompts,
                      std::chrono::milliseconds limit) {
  std::uint32_t matched = 0;
  for (std::size_t p = 0; p < prompts.size(); ++p) {
    const auto t0 = std::chrono::steady_clock::now();
    matched += hit_and_verify(f, tag + "-" + std::to_string(p), prompts[p]);
    const auto took = std::chrono::steady_clock::now() - t0;
    CHECK_MESSAGE(took < limit, "lookup and retrieve of prompt " << p << " took "
                                    << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  }
  return matched;
}
// Two servers as two machines on one cluster of 3 masters and 3 replicas
// (`node_timeout_ms`: its cluster-node-timeout), an engine on each, and 3
// prompts (12 chunks) stored through the first and written to the cluster.
struct Shared {
  kvlink::test::RedisCluster cluster;
  Fixture one, two;
  std::vector<std::vector<store::Token>> prompts;
  explicit Shared(int node_timeout_ms)
      : cluster(3, 1, node_timeout_ms), one("64MiB", cluster_args(cluster)), two("64MiB", cluster_args(cluster)) {
    one.server.start();
    two.server.start();
    one.make();
    two.make();
    REQUIRE(eventually([&] { return one.stat("cluster_nodes") == 3 && two.stat("cluster_nodes") == 3; }));
    REQUIRE(one.stat("cluster_healthy") == 1);
    prompts = store_prompts(one, 3);
    REQUIRE(eventually([&] { return one.stat("cluster_writes") == 12; }));
  }
};
}  // namespace

TEST_CASE("cluster tier: what one server stores, another server's engine hits byte-exact; a hung cluster costs "
          "lookups no more than their wait, and they hit again when it is back" * doctest::skip(no_cluster)) {
  Shared shared(1000);
  auto& cluster = shared.cluster;
  Fixture &one = shared.one, &two = shared.two;
  const auto& prompts = shared.prompts;
  CHECK(two.stat("stores_committed") == 0);  // nothing was stored through server 2
  for (int p = 0; p < 3; ++p) CHECK(hit_and_verify(two, "b-" + std::to_string(p), prompts[p]) == 4 * chunk);
  CHECK(two.stat("tier_lookup_hits") == 12);
  CHECK(two.stat("cluster_reads") == 12);
  CHECK(two.stat("cluster_corrupt_dropped") == 0);

  // The whole cluster hangs: a prompt that is only in the cluster (stored
  // through server 1, not yet read by server 2) misses on server 2, within
  // the lookup's wait, never past the engine's deadline.
  const auto more = store_prompts(one, 1, 24, 10);
  REQUIRE(eventually([&] { return one.stat("cluster_writes") == 16; }));
  for (auto& n : cluster.nodes()) n.proc->signal(SIGSTOP);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(hit_and_verify(two, "hung", more[0]) == 0);
  const auto took = std::chrono::steady_clock::now() - t0;
  MESSAGE("lookup with the cluster hung answered in "
          << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  CHECK(took < 1s);
  CHECK(two.state_is(health::State::healthy));  // the engine never noticed
  for (auto& n : cluster.nodes()) n.proc->signal(SIGCONT);
  REQUIRE(eventually([&] { return hit_and_verify(two, "back-" + std::to_string(two.stat("lookup_misses")), more[0]) ==
                                  4 * chunk; },
                     15s));
}

TEST_CASE("cluster tier: a master killed while two servers share misses at once, nothing wrong is served, the "
          "servers follow the cluster's failover and hits resume" * doctest::skip(no_cluster)) {
  Shared shared(1000);
  auto& cluster = shared.cluster;
  Fixture &one = shared.one, &two = shared.two;
  const auto& prompts = shared.prompts;
  // Replicas copy asynchronously: the kill must not outrun them (each of
  // the 12 chunks on its master and its replica).
  REQUIRE(eventually([&] {
    long keys = 0;
    for (auto& n : cluster.nodes()) keys += std::strtol(cluster.cli(n.port, "dbsize").c_str(), nullptr, 10);
    return keys == 24;
  }));
  auto& victim = busiest_master(cluster);
  victim.proc->signal(SIGKILL);
  // Before the cluster fails over: the dead master's chunks miss at once;
  // the rest hit, every byte right.
  const std::uint32_t during = hit_all(two, "down", prompts, 1s);
  CHECK(during < 12 * chunk);
  CHECK(two.state_is(health::State::healthy));
  // The replica is promoted (cluster-node-timeout 1 s); the server reads
  // the new map and the rest of each prompt comes from it.
  victim.proc.reset();
  REQUIRE(cluster.wait_ok(20s));
  int round = 0;
  REQUIRE(eventually([&] { return hit_all(two, "after-" + std::to_string(round++), prompts, 1s) == 12 * chunk; },
                     15s));
  CHECK(two.stat("cluster_corrupt_dropped") == 0);
  CHECK(two.stat("cluster_nodes") == 3);
  CHECK(two.stat("cluster_nodes_degraded") == 0);
  // New chunks go to the promoted master and are shared as before.
  const auto more = store_prompts(one, 1, 24, 10);
  const bool written = eventually([&] { return one.stat("cluster_writes") == 16; });
  INFO("writes " << one.stat("cluster_writes") << ", failed " << one.stat("cluster_writes_failed") << ", skipped "
                 << one.stat("cluster_writes_skipped") << ", nodes " << one.stat("cluster_nodes") << ", degraded "
                 << one.stat("cluster_nodes_degraded"));
  REQUIRE(written);
  CHECK(hit_and_verify(two, "new", more[0]) == 4 * chunk);
}

TEST_CASE("cluster tier: a master hung is marked by the tier's heartbeat, its chunks miss at once and no engine "
          "call waits; when it answers again it is healthy and hits resume" * doctest::skip(no_cluster)) {
  // cluster-node-timeout 10 s: the cluster does not fail the node over
  // while it is stopped; only kvlink's own heartbeat notices.
  Shared shared(10000);
  auto& cluster = shared.cluster;
  Fixture& two = shared.two;
  const auto& prompts = shared.prompts;
  auto& victim = busiest_master(cluster);
  victim.proc->signal(SIGSTOP);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(eventually([&] { return two.stat("cluster_nodes_degraded") == 1; }, 3s));
  const auto detected = std::chrono::steady_clock::now() - t0;
  MESSAGE("hung master marked degraded after "
          << std::chrono::duration_cast<std::chrono::milliseconds>(detected).count() << " ms (pings every 100 ms)");
  CHECK(detected < 1s);
  const std::uint32_t during = hit_all(two, "hung", prompts, 1s);
  CHECK(during < 12 * chunk);
  CHECK(two.state_is(health::State::healthy));
  CHECK(two.stat("cluster_healthy") == 1);  // the other masters still serve
  victim.proc->signal(SIGCONT);
  REQUIRE(eventually([&] { return two.stat("cluster_nodes_degraded") == 0; }, 5s));
  int round = 0;
  REQUIRE(eventually([&] { return hit_all(two, "back-" + std::to_string(round++), prompts, 1s) == 12 * chunk; },
                     10s));
  CHECK(two.stat("cluster_corrupt_dropped") == 0);
  CHECK(two.stat("cluster_transitions") >= 2);  // down, then up
}
