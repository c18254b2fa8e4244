#include "kvlink/server/tier_chain.hpp"

namespace kvlink::server {

void TierChain::evicted(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) {
  for (auto& m : members_)
    if (m.write_back) (void)m.tier->put(key, bytes, now);  // not taken: counted by the tier
}

void TierChain::stored(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) {
  for (auto& m : members_)
    if (m.write_through) (void)m.tier->put(key, bytes, now);
}

bool TierChain::accepting() const {
  for (const auto& m : members_)
    if (m.tier->accepting()) return true;
  return false;
}

bool TierChain::put(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) {
  bool taken = false;
  for (auto& m : members_) taken = m.tier->put(key, bytes, now) || taken;
  return taken;
}

void TierChain::find(std::span<const store::ChunkKey> keys, Found done) {
  find_from(0, {keys.begin(), keys.end()}, std::vector<std::optional<std::uint64_t>>(keys.size()), std::move(done));
}

void TierChain::find_from(std::size_t member, std::vector<store::ChunkKey> keys,
                          std::vector<std::optional<std::uint64_t>> sizes, Found done) {
  // The keys no tier before this one holds.
  std::vector<std::size_t> missing;
  for (std::size_t i = 0; i < keys.size(); ++i)
    if (!sizes[i]) missing.push_back(i);
  while (member < members_.size() && !members_[member].tier->accepting()) ++member;
  if (missing.empty() || member >= members_.size()) return done(std::move(sizes));
  std::vector<store::ChunkKey> ask;
  ask.reserve(missing.size());
  for (std::size_t i : missing) ask.push_back(keys[i]);
  members_[member].tier->find(ask, [this, member, keys = std::move(keys), sizes = std::move(sizes), missing,
                                    done = std::move(done)](std::vector<std::optional<std::uint64_t>> got) mutable {
    for (std::size_t j = 0; j < missing.size() && j < got.size(); ++j) sizes[missing[j]] = got[j];
    find_from(member + 1, std::move(keys), std::move(sizes), std::move(done));
  });
}

Error TierChain::get(const store::ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) {
  // The first tier that takes the read: one without the chunk says so at
  // once (the disk's index) or answers not_found later (then it is a miss).
  Error last(errc::not_found, "no tier below L1 holds the chunk");
  for (auto& m : members_) {
    if (!m.tier->accepting()) continue;
    Error err = m.tier->get(key, bytes, now, done);
    if (!err) return {};
    last = err;
  }
  return last;
}

void TierChain::tick(TimePoint now) {
  for (auto& m : members_) m.tier->tick(now);
}

store::LowerTierStats TierChain::stats() const {
  return members_.empty() ? store::LowerTierStats{} : members_.front().tier->stats();
}

}  // namespace kvlink::server
