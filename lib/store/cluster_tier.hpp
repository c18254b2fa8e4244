// The Redis Cluster tier (--l2-redis-cluster, docs/tiers.md): chunks
// stored under cluster_key() with the self-checked value of
// cluster_keys.hpp, through a ClusterClient on the io_context.
//
// - put(): SET (with EX when a TTL is set), asynchronous, never waited
//   for; over the in-flight bound the chunk is skipped (counted).
// - find(): STRLEN of each key, pipelined per node: which chunks the
//   cluster has, and their sizes, without moving their bytes.
// - get(): GET, then the value is checked (header, layout, checksum); a
//   value that fails is a miss, counted, never handed on.
// Every answer comes on the io thread, never inside the call.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/store/lower_tier.hpp"
#include "store/redis_cluster.hpp"

namespace kvlink::store {

struct ClusterTierConfig {
  ClusterConfig cluster;
  Duration command_deadline = std::chrono::milliseconds(500);
  std::chrono::seconds ttl{0};  // 0: chunks stay until the cluster evicts them
  std::uint64_t max_write_bytes_in_flight = std::uint64_t{256} << 20;
  std::uint64_t max_read_bytes_in_flight = std::uint64_t{256} << 20;
};

class ClusterTier final : public LowerTier {
 public:
  ClusterTier(asio::any_io_executor ex, ClusterTierConfig config);
  ~ClusterTier() override;

  // Reads the slot map; `done` says whether the cluster answered. Until
  // one did, the tier takes nothing (accepting() is false) and tick()
  // asks again every second; while a master is down, every 250 ms (to
  // follow the cluster's failover).
  void start(std::function<void(const Error&)> done = {});

  bool accepting() const override { return !client_->slots().empty(); }
  // Per key: the chunk's size when the cluster holds a value for it (its
  // bytes are checked only by get()), else nullopt (missing, unreachable).
  void find(std::span<const ChunkKey> keys, Found done) override;
  bool put(const ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) override;
  Error get(const ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) override;
  void tick(TimePoint now) override;
  LowerTierStats stats() const override;
  std::vector<TierNode> nodes() const override;
  ClusterClient& client() { return *client_; }

 private:
  ClusterTierConfig config_;
  std::shared_ptr<ClusterClient> client_;
  LowerTierStats stats_;
  TimePoint next_refresh_{};
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kvlink::store
