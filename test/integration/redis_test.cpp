// The Redis Cluster tier's connection to one node (lib/store/
// redis_connection.hpp) against a real redis-server on loopback: pipelined
// commands answered in order with binary values, AUTH, a node that hangs
// (SIGSTOP: deadlines, then the late replies dropped and the stream still
// in order), a node that dies, a node that is not there.
#include <doctest/doctest.h>
#include <unistd.h>

#include <random>

#include "child.hpp"
#include "store/redis_connection.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::store;
using namespace std::chrono_literals;
using kvlink::test::Child;
using kvlink::test::run_until;

namespace {

const bool no_redis = ::access("/usr/bin/redis-server", X_OK) != 0;

// A redis-server on 127.0.0.1 at a free port (tried until one binds).
struct RedisNode {
  std::uint16_t port = 0;
  std::unique_ptr<Child> proc;
  explicit RedisNode(std::vector<std::string> extra = {}) {
    std::mt19937 rng(std::random_device{}());
    for (int attempt = 0; attempt < 20 && !proc; ++attempt) {
      port = static_cast<std::uint16_t>(20000 + rng() % 20000);
      std::vector<std::string> argv{"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no"};
      argv.insert(argv.end(), extra.begin(), extra.end());
      auto c = std::make_unique<Child>(argv);
      if (c->wait_for("Ready to accept connections", 10s)) proc = std::move(c);
    }
    REQUIRE(proc);
  }
  ClusterNode node() const { return {"127.0.0.1", port}; }
};

std::shared_ptr<RedisConnection> connect(asio::io_context& io, const ClusterNode& node, std::string password = {}) {
  std::optional<Result<std::shared_ptr<RedisConnection>>> got;
  RedisConnection::connect(io.get_executor(), node, std::move(password), 2s, [&](auto r) { got = std::move(r); });
  REQUIRE(run_until(io, [&] { return got.has_value(); }));
  REQUIRE_MESSAGE(*got, got->error().message());
  return **got;
}

struct Answer {
  bool done = false;
  Error error;
  RedisValue::Type type = RedisValue::Type::none;
  std::string value;
};

RedisConnection::Done into(Answer& a) {
  return [&a](const Error& e, RedisValue v) {
    a.done = true;
    a.error = e;
    a.type = v.type();
    a.value = std::string(v.str());
  };
}

}  // namespace

TEST_CASE("redis connection: pipelined binary SET/GET answered in order" * doctest::skip(no_redis)) {
  RedisNode redis;
  asio::io_context io;
  auto c = connect(io, redis.node());
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  constexpr int n = 64;
  std::vector<Answer> sets(n), gets(n);
  for (int i = 0; i < n; ++i) {
    const std::string key = "k" + std::to_string(i);
    const std::string value = big.substr(static_cast<std::size_t>(i));
    c->send({"SET", key, value}, 5s, into(sets[static_cast<std::size_t>(i)]));
    c->send({"GET", key}, 5s, into(gets[static_cast<std::size_t>(i)]));
  }
  CHECK_FALSE(sets[0].done);  // never inside send()
  REQUIRE(run_until(io, [&] { return gets[n - 1].done; }));
  for (int i = 0; i < n; ++i) {
    CHECK(sets[static_cast<std::size_t>(i)].value == "OK");
    CHECK(gets[static_cast<std::size_t>(i)].value == big.substr(static_cast<std::size_t>(i)));
  }
  Answer missing, wrong;
  c->send({"GET", "nope"}, 5s, into(missing));
  c->send({"LPUSH", "k0", "x"}, 5s, into(wrong));  // an error reply is a reply
  REQUIRE(run_until(io, [&] { return wrong.done; }));
  CHECK(missing.type == RedisValue::Type::nil);
  CHECK(wrong.type == RedisValue::Type::error);
  CHECK(wrong.value.starts_with("WRONGTYPE"));
  CHECK_FALSE(wrong.error);
  CHECK(c->pending() == 0);
}

TEST_CASE("redis connection: chunk-sized commands are not pipelined behind each other; small ones are, by the "
          "hundred" * doctest::skip(no_redis)) {
  RedisNode redis;
  asio::io_context io;
  auto c = connect(io, redis.node());
  const std::string big(3 << 20, 'v');  // each SET alone is past the window
  constexpr int n = 4;
  std::vector<Answer> sets(n);
  for (int i = 0; i < n; ++i) c->send({"SET", "big" + std::to_string(i), big}, 10s, into(sets[static_cast<std::size_t>(i)]));
  std::size_t most = 0;
  REQUIRE(run_until(io, [&] {
    most = std::max(most, c->unanswered_bytes());
    return sets[n - 1].done;
  }));
  for (const auto& a : sets) CHECK(a.value == "OK");
  CHECK(most > big.size());           // one at a time was on the wire...
  CHECK(most < 2 * big.size());       // ...never two
  CHECK(c->unanswered_bytes() == 0);

  constexpr int small = 500;
  std::vector<Answer> pings(small);
  for (auto& p : pings) c->send({"PING"}, 10s, into(p));
  std::size_t most_small = 0;
  REQUIRE(run_until(io, [&] {
    most_small = std::max(most_small, c->unanswered_bytes());
    return pings.back().done;
  }));
  CHECK(most_small > 400 * 14);  // "*1\r\n$4\r\nPING\r\n" is 14 bytes: hundreds at once on the wire
  CHECK(most_small <= RedisConnection::pipeline_window_bytes);
}

TEST_CASE("redis connection: AUTH with the right password, a clear refusal with a wrong one" * doctest::skip(no_redis)) {
  RedisNode redis({"--requirepass", "s3cret"});
  asio::io_context io;
  auto c = connect(io, redis.node(), "s3cret");
  Answer a;
  c->send({"PING"}, 2s, into(a));
  REQUIRE(run_until(io, [&] { return a.done; }));
  CHECK(a.value == "PONG");
  std::optional<Result<std::shared_ptr<RedisConnection>>> got;
  RedisConnection::connect(io.get_executor(), redis.node(), "wrong", 2s, [&](auto r) { got = std::move(r); });
  REQUIRE(run_until(io, [&] { return got.has_value(); }));
  REQUIRE_FALSE(*got);
  CHECK(got->error() == errc::unauthorized);
  CHECK(got->error().message().find("refused the password") != std::string::npos);
}

TEST_CASE("redis connection: a hung node -> each command times out at its deadline; late replies are dropped and "
          "the stream stays in order" * doctest::skip(no_redis)) {
  RedisNode redis;
  asio::io_context io;
  auto c = connect(io, redis.node());
  Answer set;
  c->send({"SET", "a", "1"}, 2s, into(set));
  REQUIRE(run_until(io, [&] { return set.done; }));
  redis.proc->signal(SIGSTOP);
  Answer early, late;
  const auto t0 = std::chrono::steady_clock::now();
  c->send({"GET", "a"}, 100ms, into(early));
  c->send({"GET", "a"}, 300ms, into(late));
  REQUIRE(run_until(io, [&] { return early.done; }));
  const auto t_early = std::chrono::steady_clock::now() - t0;
  REQUIRE(run_until(io, [&] { return late.done; }));
  const auto t_late = std::chrono::steady_clock::now() - t0;
  CHECK(early.error == errc::timed_out);
  CHECK(late.error == errc::timed_out);
  CHECK(t_early >= 100ms);
  CHECK(t_early < 250ms);
  CHECK(t_late >= 300ms);
  CHECK(t_late < 450ms);
  redis.proc->signal(SIGCONT);
  Answer after;
  c->send({"SET", "b", "2"}, 2s, into(after));
  REQUIRE(run_until(io, [&] { return after.done; }));
  CHECK(after.value == "OK");  // not one of the two late "1"s
  CHECK(c->pending() == 0);
}

TEST_CASE("redis connection: a node that dies fails what is pending; one that is not there is refused" *
          doctest::skip(no_redis)) {
  asio::io_context io;
  ClusterNode gone;
  {
    RedisNode redis;
    gone = redis.node();
    auto c = connect(io, redis.node());
    redis.proc->signal(SIGSTOP);
    Answer a;
    c->send({"PING"}, 5s, into(a));
    redis.proc.reset();  // SIGKILL
    REQUIRE(run_until(io, [&] { return a.done; }, 3s));
    CHECK(a.error == errc::not_connected);
    CHECK_FALSE(c->is_open());
    Answer after;
    c->send({"PING"}, 5s, into(after));
    REQUIRE(run_until(io, [&] { return after.done; }));
    CHECK(after.error == errc::not_connected);
  }
  std::optional<Result<std::shared_ptr<RedisConnection>>> got;
  RedisConnection::connect(io.get_executor(), gone, {}, 2s, [&](auto r) { got = std::move(r); });
  REQUIRE(run_until(io, [&] { return got.has_value(); }));
  REQUIRE_FALSE(*got);
  CHECK(got->error() == errc::not_connected);
  CHECK(got->error().message().find("cannot connect") != std::string::npos);
}

// ---- a cluster ----------------------------------------------------------------------

#include "redis_cluster.hpp"
#include "store/cluster_tier.hpp"
#include "store/redis_cluster.hpp"

namespace {
const bool no_cluster = !kvlink::test::have_redis();

std::shared_ptr<ClusterClient> cluster_client(asio::io_context& io, kvlink::test::RedisCluster& cluster) {
  ClusterConfig cfg;
  cfg.health.interval = 100ms;
  cfg.health.ping_timeout = 100ms;
  for (auto& n : cluster.nodes()) cfg.seeds.push_back({"127.0.0.1", n.port});
  auto client = ClusterClient::create(io.get_executor(), cfg);
  std::optional<Error> refreshed;
  client->refresh([&](const Error& e) { refreshed = e; });
  REQUIRE(run_until(io, [&] { return refreshed.has_value(); }));
  REQUIRE_MESSAGE(!*refreshed, refreshed->message());
  return client;
}
}  // namespace

TEST_CASE("redis cluster: the slot map from CLUSTER SLOTS; keys go to their masters; MOVED is followed" *
          doctest::skip(no_cluster)) {
  kvlink::test::RedisCluster cluster(3, 1);
  asio::io_context io;
  auto client = cluster_client(io, cluster);
  CHECK(client->slots().covered() == cluster_slots);
  CHECK(client->slots().masters().size() == 3);
  // 200 keys over every master, written and read back.
  constexpr int n = 200;
  std::vector<Answer> sets(n), gets(n);
  for (int i = 0; i < n; ++i) {
    const std::string k = "key-" + std::to_string(i);
    client->send(k, {"SET", k, "value-" + std::to_string(i)}, 5s, into(sets[static_cast<std::size_t>(i)]));
    client->send(k, {"GET", k}, 5s, into(gets[static_cast<std::size_t>(i)]));
  }
  REQUIRE(run_until(io, [&] { return std::all_of(gets.begin(), gets.end(), [](auto& a) { return a.done; }); }));
  for (int i = 0; i < n; ++i) {
    CAPTURE(i);
    CHECK_MESSAGE(!gets[static_cast<std::size_t>(i)].error, gets[static_cast<std::size_t>(i)].error.message());
    CHECK(gets[static_cast<std::size_t>(i)].value == "value-" + std::to_string(i));
  }
  CHECK(client->connections() >= 3);  // the masters, and the seed asked for the map if it is a replica
  // A stale map (as after a reshard): every slot pointed at one master.
  // The others answer MOVED, which is followed and corrects the map.
  const ClusterNode first = client->slots().masters().front();
  const_cast<SlotMap&>(client->slots()).assign({{0, cluster_slots - 1, first, {}}});
  for (auto& g : gets) g = Answer{};
  for (int i = 0; i < n; ++i) {
    const std::string k = "key-" + std::to_string(i);
    client->send(k, {"GET", k}, 5s, into(gets[static_cast<std::size_t>(i)]));
  }
  REQUIRE(run_until(io, [&] { return std::all_of(gets.begin(), gets.end(), [](auto& a) { return a.done; }); }));
  for (int i = 0; i < n; ++i) CHECK(gets[static_cast<std::size_t>(i)].value == "value-" + std::to_string(i));
  CHECK(run_until(io, [&] { return client->slots().masters().size() == 3; }));  // read again after MOVED
}

TEST_CASE("redis cluster: a master killed -> its keys miss until the cluster promotes its replica, then the client "
          "follows by itself" * doctest::skip(no_cluster)) {
  kvlink::test::RedisCluster cluster(3, 1, 1000);
  asio::io_context io;
  auto client = cluster_client(io, cluster);
  const std::string k = "failover-key";
  Answer set;
  client->send(k, {"SET", k, "v"}, 5s, into(set));
  REQUIRE(run_until(io, [&] { return set.done; }));
  REQUIRE_FALSE(set.error);
  const std::uint16_t slot = cluster_slot(k);
  // Replicas join a moment after the cluster says ok: wait until the map names one.
  REQUIRE(run_until(io, [&] {
    if (!client->slots().replicas(slot).empty()) return true;
    client->refresh();
    return false;
  }));
  const std::uint16_t old_master = client->slots().master(slot)->port;
  const std::uint16_t replica = client->slots().replicas(slot).at(0).port;
  cluster.node(old_master)->proc.reset();  // SIGKILL
  // Until the failover: misses (not_connected), each at once, never a wait.
  int misses = 0;
  Answer got;
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < 20s) {
    got = Answer{};
    const auto sent = std::chrono::steady_clock::now();
    client->send(k, {"GET", k}, 500ms, into(got));
    REQUIRE(run_until(io, [&] { return got.done; }));
    CHECK(std::chrono::steady_clock::now() - sent < 1s);  // the 500 ms deadline at most
    if (!got.error && got.value == "v") break;
    ++misses;
    run_until(io, [] { return false; }, 50ms);
  }
  MESSAGE(misses << " misses, then the promoted replica answered after "
                 << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count()
                 << " ms (cluster-node-timeout " << cluster.node_timeout_ms() << " ms)");
  CHECK(got.value == "v");
  CHECK(client->slots().master(slot)->port == replica);
}

TEST_CASE("cluster tier: what one server stores, another finds and reads back byte-exact; a bad value is a "
          "counted miss; a TTL expires chunks" * doctest::skip(no_cluster)) {
  kvlink::test::RedisCluster cluster(3, 0);
  asio::io_context io;
  ClusterTierConfig cfg;
  for (auto& n : cluster.nodes()) cfg.cluster.seeds.push_back({"127.0.0.1", n.port});
  ClusterTier a(io.get_executor(), cfg), b(io.get_executor(), cfg);
  int started = 0;
  for (ClusterTier* t : {&a, &b})
    t->start([&](const Error& e) {
      REQUIRE_MESSAGE(!e, e.message());
      ++started;
    });
  REQUIRE(run_until(io, [&] { return started == 2; }));
  constexpr std::size_t n = 20, size = 64 << 10;
  auto chunk = [](std::size_t i) {
    std::vector<std::byte> v(size);
    for (std::size_t j = 0; j < size; ++j) v[j] = static_cast<std::byte>((j * 13 + i) & 0xff);
    return v;
  };
  std::vector<ChunkKey> keys;
  for (std::size_t i = 0; i < n; ++i) {
    keys.push_back(ChunkKey{99, ChunkHash{i + 1, 7}, 0});
    CHECK(a.put(keys.back(), chunk(i), Clock::now()));
  }
  REQUIRE(run_until(io, [&] { return a.stats().writes == n; }));
  keys.push_back(ChunkKey{99, ChunkHash{12345, 7}, 0});  // never stored
  std::optional<std::vector<std::optional<std::uint64_t>>> found;
  b.find(keys, [&](auto sizes) { found = std::move(sizes); });
  REQUIRE(run_until(io, [&] { return found.has_value(); }));
  for (std::size_t i = 0; i < n; ++i) CHECK((*found)[i] == size);
  CHECK_FALSE((*found)[n]);
  std::size_t verified = 0;
  for (std::size_t i = 0; i < n; ++i)
    REQUIRE_FALSE(b.get(keys[i], size, Clock::now(), [&, i](const Error& e, std::span<const std::byte> got) {
      REQUIRE_MESSAGE(!e, e.message());
      const auto want = chunk(i);
      CHECK(std::equal(got.begin(), got.end(), want.begin(), want.end()));
      ++verified;
    }));
  REQUIRE(run_until(io, [&] { return verified == n; }));
  CHECK(b.stats().reads == n);

  // Garbage under a chunk's key, and a value of another layout: misses, counted.
  Answer raw;
  b.client().send(cluster_key(keys[0]), {"SET", cluster_key(keys[0]), std::string(size + 48, 'x')}, 2s, into(raw));
  REQUIRE(run_until(io, [&] { return raw.done; }));
  std::optional<Error> bad, other;
  REQUIRE_FALSE(b.get(keys[0], size, Clock::now(), [&](const Error& e, std::span<const std::byte>) { bad = e; }));
  REQUIRE_FALSE(b.get(keys[1], size / 2, Clock::now(), [&](const Error& e, std::span<const std::byte>) { other = e; }));
  std::optional<Error> missing;
  REQUIRE_FALSE(b.get(keys[n], size, Clock::now(), [&](const Error& e, std::span<const std::byte>) { missing = e; }));
  REQUIRE(run_until(io, [&] { return bad && other && missing; }));
  CHECK(*bad == errc::server_error);
  CHECK(*other == errc::server_error);
  CHECK(*missing == errc::not_found);
  CHECK(b.stats().corrupt_dropped == 2);

  cfg.ttl = std::chrono::seconds(1);
  ClusterTier expiring(io.get_executor(), cfg);
  bool up = false;
  expiring.start([&](const Error&) { up = true; });
  REQUIRE(run_until(io, [&] { return up; }));
  const ChunkKey k{99, ChunkHash{777, 7}, 0};
  expiring.put(k, chunk(7), Clock::now());
  REQUIRE(run_until(io, [&] { return expiring.stats().writes == 1; }));
  found.reset();
  expiring.find(std::span(&k, 1), [&](auto sizes) { found = std::move(sizes); });
  REQUIRE(run_until(io, [&] { return found.has_value(); }));
  CHECK((*found)[0] == size);
  run_until(io, [] { return false; }, 2100ms);
  found.reset();
  expiring.find(std::span(&k, 1), [&](auto sizes) { found = std::move(sizes); });
  REQUIRE(run_until(io, [&] { return found.has_value(); }));
  CHECK_FALSE((*found)[0]);
}

TEST_CASE("redis cluster: a hung master (SIGSTOP) -> its heartbeat marks it down within its timeouts and its keys "
          "miss at once; SIGCONT -> they hit again" * doctest::skip(no_cluster)) {
  kvlink::test::RedisCluster cluster(3, 0, 5000);  // no failover within the test: the node must come back itself
  asio::io_context io;
  auto client = cluster_client(io, cluster);
  const std::string k = "hang-key";
  Answer set;
  client->send(k, {"SET", k, "v"}, 5s, into(set));
  REQUIRE(run_until(io, [&] { return set.done && !set.error; }));
  const ClusterNode master = *client->slots().master(cluster_slot(k));
  REQUIRE(run_until(io, [&] { return client->node_state(master) == health::State::healthy; }));
  cluster.node(master.port)->proc->signal(SIGSTOP);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(run_until(io, [&] { return client->node_state(master) == health::State::degraded; }, 3s));
  const auto detected = std::chrono::steady_clock::now() - t0;
  MESSAGE("hung master detected after " << std::chrono::duration_cast<std::chrono::milliseconds>(detected).count()
                                        << " ms (ping interval and timeout 100 ms)");
  CHECK(detected < 1s);  // two failed pings of 100 ms, with room for a loaded machine
  Answer miss;
  const auto sent = std::chrono::steady_clock::now();
  client->send(k, {"GET", k}, 5s, into(miss));
  REQUIRE(run_until(io, [&] { return miss.done; }));
  CHECK(miss.error == errc::not_connected);
  CHECK(std::chrono::steady_clock::now() - sent < 500ms);  // at once, not the 5 s deadline
  cluster.node(master.port)->proc->signal(SIGCONT);
  REQUIRE(run_until(io, [&] { return client->node_state(master) == health::State::healthy; }, 5s));
  Answer hit;
  client->send(k, {"GET", k}, 5s, into(hit));
  REQUIRE(run_until(io, [&] { return hit.done; }));
  CHECK(hit.value == "v");
}
