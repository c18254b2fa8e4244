// The Redis Cluster tier end to end: a cluster of 3 masters and 3 replicas
// on loopback, two kvlink-servers as two machines (separate L1s and
// sockets), an engine on each. What engine A stores through server 1
// becomes hits for engine B through server 2, every byte checked. Faults:
// the whole cluster hung (lookups answer within their deadline from L1),
// then back. Runs in the plain build only (test/meson.build).
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
  return {"--l2-redis-cluster", c.seeds(), "--l2-lookup-wait-ms", "300", "--l2-redis-deadline-ms", "200"};
}
}  // namespace

TEST_CASE("cluster tier: what one server stores, another server's engine hits byte-exact; a hung cluster costs "
          "lookups no more than their wait, and they hit again when it is back" * doctest::skip(no_cluster)) {
  kvlink::test::RedisCluster cluster(3, 1);
  Fixture one("64MiB", cluster_args(cluster)), two("64MiB", cluster_args(cluster));
  one.server.start();
  two.server.start();
  one.make();
  two.make();
  REQUIRE(eventually([&] { return one.stat("cluster_healthy") == 1 && two.stat("cluster_healthy") == 1; }));
  const auto prompts = store_prompts(one, 3);
  REQUIRE(eventually([&] { return one.stat("cluster_writes") == 12; }));
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
