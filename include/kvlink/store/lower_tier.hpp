// A tier below L1 (docs/tiers.md) as the server's request handling sees it:
// somewhere chunks can be written to and read back from, asynchronously,
// on the io thread. The local disk tier implements it (lib/store/
// disk_tier.hpp); request handling, its tests and the fuzzer know only this.
//
// Rules every tier keeps:
// - put() copies the bytes before it returns (L1's slot may be reused at
//   once) and never blocks; what it cannot take now it drops and counts.
// - find()'s `done` may run before find() returns (a tier that knows at
//   once, like the disk's index) or later on the same thread.
// - get()'s `done` runs later on the same thread, never inside get(); an
//   Error returned by get() means `done` never runs.
// - A chunk is readable only once completely written; bytes that fail
//   their checksum are dropped and counted, never handed to `done`.
// - While the tier is unhealthy, accepting() is false: nothing new is sent
//   to it and lookups do not wait for it.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::store {

// What STATS shows of a tier.
struct LowerTierStats {
  bool healthy = true;
  std::uint64_t chunks = 0;              // complete chunks held
  std::uint64_t bytes = 0;               // their bytes
  std::uint64_t capacity_bytes = 0;
  std::uint64_t writes = 0;              // chunks written
  std::uint64_t write_bytes = 0;
  std::uint64_t writes_failed = 0;       // the I/O failed: the chunk is not on the tier
  std::uint64_t writes_skipped = 0;      // not taken: degraded, over the in-flight bound, no room, another layout
  std::uint64_t reads = 0;               // chunks read back whole and verified
  std::uint64_t read_bytes = 0;
  std::uint64_t reads_failed = 0;        // I/O errors and chunks found gone
  std::uint64_t corrupt_dropped = 0;     // failed their checksum (or the index said torn) and dropped
  std::uint64_t evictions = 0;           // dropped for room by the tier's own LRU
  std::uint64_t write_bytes_in_flight = 0;
  std::uint64_t read_bytes_in_flight = 0;
  std::uint64_t io_errors = 0;
  std::uint64_t stalls = 0;
  std::uint64_t transitions = 0;         // healthy <-> degraded
  std::uint64_t recovered_chunks = 0;    // found again at start (warm restart)
  // A tier spread over nodes (the cluster): the nodes serving it, and
  // those of them degraded now (their chunks miss). 0 for a local tier.
  std::uint64_t nodes = 0;
  std::uint64_t nodes_degraded = 0;
};

// One node of a tier spread over nodes, for the status page.
struct TierNode {
  std::string address;  // "host:port"
  bool healthy = true;  // its heartbeat's verdict
  std::uint32_t slots = 0;  // hash slots it serves
};

class LowerTier {
 public:
  virtual ~LowerTier() = default;

  // Whether new work may go to the tier (false while it is degraded).
  virtual bool accepting() const = 0;
  // Which of `keys` the tier holds whole now, with their sizes (nullopt:
  // not there, or the tier could not say).
  using Found = std::function<void(std::vector<std::optional<std::uint64_t>>)>;
  virtual void find(std::span<const ChunkKey> keys, Found done) = 0;
  // Writes a copy of `bytes` for `key`. False when not taken (counted).
  virtual bool put(const ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) = 0;
  // Reads `key`'s chunk of `bytes` bytes (as find() said): `done(success,
  // bytes)` with exactly the chunk's bytes (valid during the call only), or
  // `done(error, {})`.
  using ReadDone = std::function<void(const Error&, std::span<const std::byte>)>;
  virtual Error get(const ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) = 0;
  // Timed housekeeping (health probes, stalls, journal upkeep); the server
  // calls it every tick.
  virtual void tick(TimePoint now) = 0;
  virtual LowerTierStats stats() const = 0;
  // The nodes the tier spreads over (none for a local tier).
  virtual std::vector<TierNode> nodes() const { return {}; }
};

}  // namespace kvlink::store
