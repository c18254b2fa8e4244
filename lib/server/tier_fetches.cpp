#include "kvlink/server/tier_fetches.hpp"

#include <cstring>

namespace kvlink::server {

TierFetches::Fetch TierFetches::fetch(const store::ChunkKey& key, std::uint64_t bytes, TimePoint now, Done done) {
  if (store_.find(key)) return Fetch::in_l1;
  if (auto it = pending_.find(key); it != pending_.end()) {
    ++stats_.joined;
    it->second.waiters.push_back(std::move(done));
    return Fetch::pending;
  }
  if (!tier_ || !tier_->accepting()) return Fetch::unavailable;
  // Fetched chunks belong to no instance: no quota applies to them.
  store::Slot slot = 0;
  std::uint64_t generation = 0;
  const auto got = store_.reserve(key, store::Writer{bytes, 0, 0}, now, slot, generation);
  if (got == store::KvStore::Reserve::present) return Fetch::in_l1;
  if (got != store::KvStore::Reserve::reserved) return Fetch::unavailable;  // a STORE writing it, no room
  std::weak_ptr<bool> alive = alive_;
  auto err = tier_->get(key, bytes, now, [this, alive, key](const Error& error, std::span<const std::byte> data) {
    if (auto a = alive.lock(); a && *a) landed(key, error, data);
  });
  if (err) {
    store_.abort(key, generation);
    return Fetch::unavailable;
  }
  ++stats_.started;
  pending_.emplace(key, Pending{generation, slot, bytes, {std::move(done)}});
  return Fetch::pending;
}

void TierFetches::landed(const store::ChunkKey& key, const Error& error, std::span<const std::byte> bytes) {
  auto it = pending_.find(key);
  if (it == pending_.end()) return;
  Pending p = std::move(it->second);
  pending_.erase(it);
  const TimePoint now = Clock::now();
  const store::KvStore::Entry* e = nullptr;
  if (!error && bytes.size() == p.bytes && store_.reserved(key, p.generation)) {
    std::memcpy(store_.pool().data(p.slot), bytes.data(), bytes.size());
    store_.commit(key, p.generation, now);
    e = store_.find(key);
  } else {
    store_.abort(key, p.generation);
  }
  ++(e ? stats_.landed : stats_.failed);
  for (auto& w : p.waiters) w();
}

}  // namespace kvlink::server
