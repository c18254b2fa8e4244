// The Redis Cluster tier's figures (issue 18), each against a reference
// measured in the same run on the same cluster (redis-server processes on
// loopback, started here):
//
//   cluster_store    ClusterTier writes of 4 MiB chunks to one master, as
//                    the server drives them (value header and checksum,
//                    pipelined on one connection), against redis-benchmark
//                    SET of 4 MiB values on that master (the best of
//                    -c 1 -P 1, -c 1 -P 16 and -c 8 -P 1); the writes are
//                    issued one after another with the io_context running
//                    between them, as the server's io thread does between
//                    two STOREs' completions
//   cluster_load     ClusterTier reads of them (checksum verified) against
//                    redis-benchmark GET of 4 MiB values
//   cross_node_hit   a 4 MiB chunk stored through server 1, looked up and
//                    retrieved through server 2 (lookup until the RETRIEVE
//                    completed in the engine's memory), against the same
//                    chunk's L1 hit on server 2 just after
//   failover_detect  a master hung (SIGSTOP): until the tier's heartbeat
//                    (the server's default, a ping every second) marks it
//                    down, against the cluster's cluster-node-timeout
//                    (5 s); the samples also give when the cluster itself
//                    marked it failed and when the tier's map named the
//                    replica it promoted
//
// Output: one line per figure, NAME FIGURE REFERENCE RATIO (bench/run
// parses them), after the raw samples. Medians of --rounds.
#include <signal.h>

#include <asio/io_context.hpp>
#include <cstdio>
#include <cstring>
#include <fmt/format.h>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "figures.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "redis_cluster.hpp"
#include "server_process.hpp"
#include "store/cluster_tier.hpp"

using namespace kvlink;
using namespace std::chrono_literals;
using kvlink::bench::median;
using kvlink::bench::seconds;
using kvlink::bench::spec;
using kvlink::bench::stat_of;
using kvlink::test::RedisCluster;
using kvlink::test::ServerProcess;

namespace {

constexpr std::uint64_t value_bytes = 4 << 20;

// Runs `io` until `done()` or `limit`.
template <class Pred>
void run_until(asio::io_context& io, Pred done, Duration limit, const char* what) {
  const auto end = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() > end) throw std::runtime_error(std::string("timed out: ") + what);
    io.run_for(1ms);
  }
}

std::unique_ptr<store::ClusterTier> open_tier(asio::io_context& io, RedisCluster& cluster) {
  store::ClusterTierConfig c;
  for (auto& n : cluster.nodes()) c.cluster.seeds.push_back({"127.0.0.1", n.port});
  c.command_deadline = 10s;  // 256 MiB queued on one connection must not time out on a slow machine
  auto tier = std::make_unique<store::ClusterTier>(io.get_executor(), c);
  tier->start();
  run_until(io, [&] { return tier->accepting(); }, 10s, "the cluster's slot map");
  return tier;
}

// redis-benchmark's requests per second for `test` (set, get) on `port`.
double redis_benchmark(std::uint16_t port, const std::string& test, int clients, int pipeline, int n) {
  std::string out;
  const std::string cmd = fmt::format("/usr/bin/redis-benchmark -h 127.0.0.1 -p {} -t {} -d {} -n {} -c {} -P {} --csv",
                                      port, test, value_bytes, n, clients, pipeline);
  if (test::shell(cmd, out) != 0) throw std::runtime_error("redis-benchmark failed: " + out);
  // "SET","12.34",...
  const auto at = out.rfind("\",\"");
  double rps = 0;
  if (at == std::string::npos || std::sscanf(out.c_str() + at + 3, "%lf", &rps) != 1 || rps <= 0)
    throw std::runtime_error("cannot parse redis-benchmark's output: " + out);
  return rps;
}

// Keys whose slots the master on `port` serves (redis-benchmark's own key,
// "key:__rand_int__", lives there too).
std::vector<store::ChunkKey> keys_on(const store::SlotMap& map, std::uint16_t port, std::size_t n) {
  std::vector<store::ChunkKey> keys;
  for (std::uint64_t i = 0; keys.size() < n; ++i) {
    const store::ChunkKey k{77, store::ChunkHash{i * 2654435761u + 1, i}, 0};
    if (const auto* m = map.master(store::cluster_slot(store::cluster_key(k))); m && m->port == port) keys.push_back(k);
  }
  return keys;
}

void throughput(int rounds) {
  RedisCluster cluster(3, 0);
  asio::io_context io;
  auto tier = open_tier(io, cluster);
  const store::ClusterNode* node = tier->client().slots().master(store::cluster_slot("key:__rand_int__"));
  if (!node) throw std::runtime_error("no master for redis-benchmark's key");
  const std::uint16_t port = node->port;
  constexpr int n = 64;  // 256 MiB per round
  const auto keys = keys_on(tier->client().slots(), port, n);
  std::vector<std::byte> data(value_bytes);
  std::mt19937_64 rng(5);
  for (auto& b : data) b = static_cast<std::byte>(rng());

  std::vector<double> tw, tr, rw, rr;
  for (int r = 0; r < rounds; ++r) {
    const auto before = tier->stats();
    const auto t0 = Clock::now();
    for (const auto& k : keys) {
      while (!tier->put(k, data, Clock::now())) {
        if (tier->stats().writes_failed > before.writes_failed) throw std::runtime_error("a write failed");
        io.run_for(1ms);  // at the in-flight bound
      }
      io.poll();  // as the server's io thread runs its other handlers between two stores
    }
    run_until(io, [&] { return tier->stats().writes + tier->stats().writes_failed == before.writes + n; }, 120s,
              "the writes");
    const double write_s = seconds(Clock::now() - t0);
    if (tier->stats().writes != before.writes + n) throw std::runtime_error("not every chunk was written");

    int read = 0;
    const auto t1 = Clock::now();
    for (const auto& k : keys) {
      for (;;) {
        auto err = tier->get(k, value_bytes, Clock::now(), [&](const Error& e, std::span<const std::byte> got) {
          if (e || got.size() != value_bytes || std::memcmp(got.data(), data.data(), 64) != 0)
            throw std::runtime_error("a read failed: " + e.message());
          ++read;
        });
        if (!err) break;
        if (err != errc::limit_exceeded) throw std::runtime_error(err.message());
        io.run_for(1ms);
      }
    }
    run_until(io, [&] { return read == n; }, 120s, "the reads");
    const double read_s = seconds(Clock::now() - t1);
    tw.push_back(n * value_bytes / write_s);
    tr.push_back(n * value_bytes / read_s);

    // The references, on the same master: the best of one client, one
    // pipelined client and a fan-in of eight.
    double set = 0, get = 0;
    for (auto [c, p] : {std::pair{1, 1}, std::pair{1, 16}, std::pair{8, 1}}) {
      set = std::max(set, redis_benchmark(port, "set", c, p, n));
      get = std::max(get, redis_benchmark(port, "get", c, p, n));
    }
    rw.push_back(set * value_bytes);
    rr.push_back(get * value_bytes);
    fmt::print("sample round {}: tier store {:.0f} MB/s, redis-benchmark SET {:.0f} MB/s, tier load {:.0f} MB/s, "
               "redis-benchmark GET {:.0f} MB/s\n",
               r, tw.back() / 1e6, rw.back() / 1e6, tr.back() / 1e6, rr.back() / 1e6);
  }
  fmt::print("cluster_store {:.0f} {:.0f} {:.2f}\n", median(tw) / 1e6, median(rw) / 1e6, median(tw) / median(rw));
  fmt::print("cluster_load {:.0f} {:.0f} {:.2f}\n", median(tr) / 1e6, median(rr) / 1e6, median(tr) / median(rr));
}

// An engine: a registered KV cache (4 layers x K,V x 48 blocks of 16
// tokens x 8 heads x 128 x 2 bytes: 4 MiB per 256-token chunk) and both
// adapters, on `rt`.
struct Engine {
  wire::KvLayout layout = wire::paged_layout(4, 48, 16, 8, 128, 2);
  Result<transfer::KvMemfd> kv = transfer::create_kv_memfd(layout, {.name = "bench-cluster-kv"});
  std::shared_ptr<adapter::WorkerAdapter> worker;
  std::shared_ptr<adapter::SchedulerAdapter> scheduler;

  Engine(runtime::Runtime& rt, const std::string& ep, std::uint8_t fill) {
    if (!kv) throw std::runtime_error(kv.error().message());
    std::memset(kv->memory.get(), fill, layout.region_bytes);
    adapter::WorkerConfig wc;
    wc.endpoint = ep;
    wc.model = "bench-cluster";
    wc.transfer_timeout = 10s;
    wc.blocking_deadline = 20s;
    worker = adapter::WorkerAdapter::create(rt.executor(), wc);
    adapter::SchedulerConfig sc;
    sc.endpoint = ep;
    sc.model = "bench-cluster";
    sc.call_timeout = 10s;
    sc.blocking_deadline = 20s;
    scheduler = adapter::SchedulerAdapter::create(rt.executor(), sc);
    if (auto r = worker->register_kv_caches(layout, kv->fd.get()); !r) throw std::runtime_error(r.error().message());
  }
  ~Engine() {
    (void)worker->shutdown(5s);
    scheduler->stop();
  }
  // Lookup until answered, then RETRIEVE into blocks 16..31: seconds.
  double hit(const std::string& id, const std::vector<store::Token>& tokens) {
    std::vector<std::uint32_t> dst(16);
    for (std::uint32_t i = 0; i < 16; ++i) dst[i] = 16 + i;
    return bench::hit_seconds(*scheduler, *worker, id, tokens, dst);
  }
};

void cross_node_hit(int rounds) {
  RedisCluster cluster(3, 0);
  test::TempDir dir;
  const std::string ep1 = "unix:" + dir.path() + "/one.sock", ep2 = "unix:" + dir.path() + "/two.sock";
  auto server = [&](const std::string& ep) {
    return std::vector<std::string>{"--listen", ep, "--log-level", "warn", "--chunk-size", "256", "--l1-size",
                                    "256MiB", "--no-huge-pages", "--l2-redis-cluster", cluster.seeds(),
                                    "--l2-lookup-wait-ms", "5000", "--l2-redis-deadline-ms", "5000"};
  };
  ServerProcess one(server(ep1)), two(server(ep2));
  one.start();
  two.start();
  runtime::Runtime rt;
  Engine a(rt, ep1, 0x5a), b(rt, ep2, 0);
  const auto healthy = [&] { return stat_of(ep1, "cluster_healthy") == 1 && stat_of(ep2, "cluster_healthy") == 1; };
  for (int i = 0; i < 100 && !healthy(); ++i) std::this_thread::sleep_for(100ms);
  std::vector<double> cross, local;
  std::vector<std::uint32_t> src(16);
  for (std::uint32_t i = 0; i < 16; ++i) src[i] = i;
  constexpr int per_round = 5;
  for (int r = 0; r < rounds * per_round; ++r) {
    std::vector<store::Token> tokens(256);
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<store::Token>(r * 1000 + 7 + i);
    if (auto st = a.worker->submit_store(spec(fmt::format("store-{}", r), tokens, src)); !st || st->stored_chunks != 1)
      throw std::runtime_error("store through server 1 failed");
    for (int i = 0; i < 200 && stat_of(ep1, "cluster_writes") < r + 1; ++i) std::this_thread::sleep_for(10ms);
    cross.push_back(b.hit(fmt::format("cross-{}", r), tokens));
    local.push_back(b.hit(fmt::format("local-{}", r), tokens));
  }
  const std::int64_t from_cluster = stat_of(ep2, "tier_lookup_hits");
  fmt::print("sample cross-node hits: {} lookups on server 2, {} chunks came from the cluster\n", cross.size(),
             from_cluster);
  if (from_cluster != static_cast<std::int64_t>(cross.size()))
    throw std::runtime_error("not every first lookup on server 2 came from the cluster: the figure would be wrong");
  fmt::print("cross_node_hit {:.2f} {:.2f} {:.2f}\n", median(cross) * 1e3, median(local) * 1e3,
             median(cross) / median(local));
}

// Whether node `asked` says the node on `port` is failed ("fail" flag).
bool cluster_says_failed(RedisCluster& cluster, std::uint16_t asked, std::uint16_t port) {
  const std::string out = cluster.cli(asked, "cluster nodes");
  const std::string addr = fmt::format("127.0.0.1:{}@", port);
  const auto at = out.find(addr);
  if (at == std::string::npos) return false;
  const auto line_end = out.find('\n', at);
  const std::string line = out.substr(at, line_end - at);
  return line.find(",fail") != std::string::npos || line.find(" fail") != std::string::npos;
}

void failover_detect(int rounds) {
  constexpr int node_timeout_ms = 5000;
  RedisCluster cluster(3, 1, node_timeout_ms);
  asio::io_context io;
  store::ClusterTierConfig c;
  for (auto& n : cluster.nodes()) c.cluster.seeds.push_back({"127.0.0.1", n.port});
  // The server's default heartbeat (--l2-redis-ping-ms 1000).
  c.cluster.health.interval = 1s;
  c.cluster.health.ping_timeout = 1s;
  store::ClusterTier tier(io.get_executor(), c);
  tier.start();
  run_until(io, [&] { return tier.accepting(); }, 10s, "the cluster's slot map");
  std::vector<double> detect, marked, followed;
  for (int r = 0; r < rounds; ++r) {
    run_until(io, [&] { return tier.stats().nodes == 3 && tier.stats().nodes_degraded == 0; }, 30s,
              "three healthy masters");
    io.run_for(3s);  // a few heartbeats in steady state
    const store::ClusterNode victim = tier.client().slots().masters()[static_cast<std::size_t>(r) % 3];
    std::uint16_t witness = 0;
    for (auto& n : cluster.nodes())
      if (n.port != victim.port && n.proc) witness = n.port;
    auto* node = cluster.node(victim.port);
    node->proc->signal(SIGSTOP);
    const auto t0 = Clock::now();
    double t_detect = -1, t_marked = -1, t_followed = -1;
    auto next_poll = t0, next_tick = t0;
    while ((t_detect < 0 || t_marked < 0 || t_followed < 0) && Clock::now() - t0 < 60s) {
      io.run_for(1ms);
      const auto now = Clock::now();
      if (t_detect < 0 && tier.client().node_state(victim) == health::State::degraded) t_detect = seconds(now - t0);
      if (now >= next_tick) {
        tier.tick(now);  // as the server's 100 ms tick does
        next_tick = now + 100ms;
      }
      const auto masters = tier.client().slots().masters();
      if (t_followed < 0 && std::find(masters.begin(), masters.end(), victim) == masters.end() && masters.size() == 3)
        t_followed = seconds(now - t0);
      if (t_marked < 0 && now >= next_poll) {
        if (cluster_says_failed(cluster, witness, victim.port)) t_marked = seconds(Clock::now() - t0);
        next_poll = Clock::now() + 20ms;
      }
    }
    node->proc->signal(SIGCONT);
    if (t_detect < 0 || t_marked < 0 || t_followed < 0)
      throw std::runtime_error(fmt::format("round {}: detect {} marked {} followed {}", r, t_detect, t_marked,
                                           t_followed));
    detect.push_back(t_detect);
    marked.push_back(t_marked);
    followed.push_back(t_followed);
    fmt::print("sample round {}: master {} hung; tier marked it down after {:.0f} ms, the cluster marked it failed "
               "after {:.0f} ms, the tier's map named the promoted replica after {:.0f} ms\n",
               r, store::to_string(victim), t_detect * 1e3, t_marked * 1e3, t_followed * 1e3);
    if (!cluster.wait_ok(30s)) throw std::runtime_error("the cluster did not recover");
  }
  fmt::print("sample failover: cluster marked failed {:.0f} ms, map followed {:.0f} ms (medians)\n",
             median(marked) * 1e3, median(followed) * 1e3);
  fmt::print("failover_detect {:.0f} {} {:.2f}\n", median(detect) * 1e3, node_timeout_ms,
             median(detect) * 1e3 / node_timeout_ms);
}

}  // namespace

int main(int argc, char** argv) {
#ifdef KVLINK_SERVER_PATH
  ::setenv("KVLINK_SERVER", KVLINK_SERVER_PATH, 0);
  ::setenv("KVLINK_CLI", KVLINK_CLI_PATH, 0);
#endif
  int rounds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") rounds = 1;
    else {
      std::fprintf(stderr, "usage: bench-cluster [--quick]\n");
      return 2;
    }
  }
  if (!test::have_redis()) {
    std::fprintf(stderr, "bench-cluster: redis-server and redis-cli are needed (scripts/deps installs them)\n");
    return 2;
  }
  try {
    throughput(rounds);
    cross_node_hit(rounds);
    failover_detect(rounds);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench-cluster: %s\n", e.what());
    return 1;
  }
  return 0;
}
