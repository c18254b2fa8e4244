// Chunks on their way from a lower tier into L1 (a lookup that missed L1
// but hit the tier): one fetch per key however many lookups want it. A
// fetch reserves the chunk's L1 slot (write-locked, so nothing serves it
// half-filled), reads the tier, and fills and commits the slot only if the
// reservation is still its own when the bytes arrive (a reservation that
// expired meanwhile may have been given to another chunk).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/store/kv_store.hpp"
#include "kvlink/store/lower_tier.hpp"

namespace kvlink::server {

struct TierFetchStats {
  std::uint64_t started = 0;  // reads sent to the tier
  std::uint64_t joined = 0;   // lookups that waited on a fetch already running
  std::uint64_t landed = 0;   // chunks now in L1
  std::uint64_t failed = 0;   // the read failed, or the slot was taken back meanwhile
};

class TierFetches {
 public:
  explicit TierFetches(store::KvStore& store) : store_(store) {}
  ~TierFetches() { *alive_ = false; }
  TierFetches(const TierFetches&) = delete;
  TierFetches& operator=(const TierFetches&) = delete;

  // The tier to fetch from (null: none). Set before the first fetch.
  void set_tier(store::LowerTier* tier) { tier_ = tier; }
  bool enabled() const { return tier_ != nullptr; }
  store::LowerTier* tier() const { return tier_; }

  enum class Fetch : std::uint8_t {
    in_l1,        // present in L1 now: nothing to wait for
    pending,      // on its way: `done` runs when it lands or fails
    unavailable,  // the tier is degraded or refused the read, or no L1 room
  };
  // Brings `key`'s chunk of `bytes` (as the tier's find() said) into L1.
  // `done` (only for pending) runs on this thread from the tier's
  // completion, never inside fetch().
  using Done = std::function<void()>;
  Fetch fetch(const store::ChunkKey& key, std::uint64_t bytes, TimePoint now, Done done);
  // Whether `key` is on its way into L1 already.
  bool pending(const store::ChunkKey& key) const { return pending_.count(key) != 0; }

  std::size_t in_flight() const { return pending_.size(); }
  const TierFetchStats& stats() const { return stats_; }

 private:
  struct Pending {
    std::uint64_t generation = 0;
    store::Slot slot = 0;
    std::uint64_t bytes = 0;
    std::vector<Done> waiters;
  };
  void landed(const store::ChunkKey& key, const Error& error, std::span<const std::byte> bytes);

  store::KvStore& store_;
  store::LowerTier* tier_ = nullptr;
  std::unordered_map<store::ChunkKey, Pending, store::ChunkKeyHasher> pending_;
  TierFetchStats stats_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace kvlink::server
