// The tiers below L1, in order (the local disk, then a shared cluster),
// seen as one by lookups: find() asks each tier in turn about the keys the
// ones before it do not hold, and get() reads from the first tier that has
// the chunk. What goes down is each tier's own choice: L1's evictions
// (write-back), every stored chunk (write-through), or both. Pure: the
// tiers do the I/O.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "kvlink/store/lower_tier.hpp"

namespace kvlink::server {

class TierChain final : public store::LowerTier {
 public:
  struct Member {
    store::LowerTier* tier = nullptr;
    std::string name;  // "disk", "cluster": its STATS rows are NAME_*
    bool write_back = true;     // L1's evictions are written to it
    bool write_through = false;  // every chunk a STORE committed is written to it
  };
  void add(Member m) { members_.push_back(std::move(m)); }
  bool empty() const { return members_.empty(); }
  // Whether any tier wants every stored chunk (stored() is worth calling).
  bool writes_through() const {
    for (const auto& m : members_)
      if (m.write_through) return true;
    return false;
  }
  const std::vector<Member>& members() const { return members_; }

  // L1 evicted `key` / a STORE committed it: each tier that wants it gets
  // a copy (put() copies before it returns).
  void evicted(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now);
  void stored(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now);

  // LowerTier, for lookups and fetches.
  bool accepting() const override;
  void find(std::span<const store::ChunkKey> keys, Found done) override;
  bool put(const store::ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) override;
  Error get(const store::ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) override;
  void tick(TimePoint now) override;
  // The first tier's (each tier's own are in members()).
  store::LowerTierStats stats() const override;

 private:
  void find_from(std::size_t member, std::vector<store::ChunkKey> keys,
                 std::vector<std::optional<std::uint64_t>> sizes, Found done);

  std::vector<Member> members_;
};

}  // namespace kvlink::server
