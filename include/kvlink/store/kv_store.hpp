// The chunk index: key -> entry {slot, state, locks}, an LRU of evictable
// entries, watermark eviction and lock expiry. Pure logic on an injected
// `now`: no sockets, no threads, no clock reads.
//
// L1 holds several KV layouts (chunk sizes) at once (see l1_pool.hpp): each
// layout class has its own LRU, and a class below its share of the slabs
// takes a whole slab from the class holding the most.
//
// Entry lifecycle: reserve() (writing, write-locked, not evictable) ->
// commit() (present) or abort() (dropped, slot freed). A present entry with
// read locks is not evictable either; it rejoins the LRU, as most recent,
// when its last lock goes. Locks expire after a TTL so a crashed client
// cannot pin memory forever.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <utility>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/store/keys.hpp"
#include "kvlink/store/l1_pool.hpp"

namespace kvlink::store {

struct StoreConfig {
  Duration read_lock_ttl = std::chrono::seconds(300);
  Duration write_lock_ttl = std::chrono::seconds(600);
  // tick() evicts down to low_watermark once usage exceeds high_watermark
  // (fractions of the slots). Allocation evicts one entry when L1 is full.
  double high_watermark = 0.95;
  double low_watermark = 0.85;
};

// Who holds a read lock: a scheduler instance (lookup), or 0 for a copy in
// progress (RETRIEVE's own lock).
using Holder = std::uint64_t;
inline constexpr Holder transfer_holder = 0;

// Who stored an entry (an instance id): per-owner slot counts back the
// per-instance L1 quota.
using Owner = std::uint64_t;

struct StoreStats {
  std::uint64_t hits = 0;     // chunks matched by lookups
  std::uint64_t misses = 0;   // chunks asked for but not matched
  std::uint64_t evictions = 0;
  std::uint64_t expired_read_locks = 0;
  std::uint64_t expired_write_locks = 0;
  std::uint64_t stores_committed = 0;
  std::uint64_t stores_aborted = 0;
  std::uint64_t quota_evictions = 0;  // an owner's own entries dropped to stay within its quota
  std::uint64_t quota_refusals = 0;   // reservations refused: quota reached, nothing of the owner evictable
  std::uint64_t slabs_moved = 0;      // slabs emptied for another layout class
};

// Who reserves a slot: the chunk size of its layout, and the owner (an
// instance) whose quota applies (`quota` slots; 0: none).
struct Writer {
  std::uint64_t slot_bytes = 0;
  Owner owner = 0;
  std::uint32_t quota = 0;
};

class KvStore {
 public:
  enum class State : std::uint8_t { writing, present };
  // other_layout: the key is present with another chunk size.
  enum class Reserve : std::uint8_t { reserved, present, locked, no_room, over_quota, other_layout };

  struct Entry;
  using Node = std::pair<const ChunkKey, Entry>;
  using Queue = std::list<Node*>;
  struct Entry {
    Slot slot = 0;
    LayoutClass cls = 0;  // the class of its slot's slab, kept: every LRU move needs it
    State state = State::writing;
    std::uint32_t read_locks = 0;
    bool write_locked = false;
    std::uint64_t generation = 0;  // tells a stale commit from the current entry
    TimePoint read_expiry{};
    TimePoint write_expiry{};
    std::vector<std::pair<Holder, std::uint32_t>> holders;  // read locks by holder
    Owner owner = 0;
    // Membership of the LRU, the lock-expiry queues and the owner's queue (O(1) moves).
    Queue::iterator lru, read, write, owned;
    bool in_lru = false, in_read = false, in_write = false;
  };

  KvStore(L1Pool& pool, StoreConfig config);
  KvStore(const KvStore&) = delete;
  KvStore& operator=(const KvStore&) = delete;

  // Number of leading chunks present for every rank 0..world_size-1. With
  // `holder`, read-locks each matched (ns, hash, rank) once for it.
  std::uint32_t lookup(std::uint64_t ns, std::uint32_t world_size, std::span<const ChunkHash> hashes, TimePoint now,
                       std::optional<Holder> holder);
  // One chunk of a lookup done in slices: true if it is present for every
  // rank, then read-locked for `holder` (or, without one, made most recently
  // used). record_lookup counts the whole lookup's hits and misses.
  bool match_chunk(std::uint64_t ns, std::uint32_t world_size, const ChunkHash& hash, TimePoint now,
                   std::optional<Holder> holder);
  void record_lookup(std::uint64_t hits, std::uint64_t misses) {
    stats_.hits += hits;
    stats_.misses += misses;
  }

  // Read locks. release_one drops one lock of `holder`; returns false if it
  // had none (another holder's locks are never touched).
  void lock(const ChunkKey& key, Holder holder, TimePoint now);
  bool release_one(const ChunkKey& key, Holder holder);
  // Drops every lock `holder` has on `key`.
  void release_all(const ChunkKey& key, Holder holder);

  // Reserves a write-locked slot of `writer.slot_bytes` for `key`. On
  // `reserved`, `slot` and `generation` identify the reservation for
  // commit/abort. With a quota the owner holds at most that many slots: at
  // its quota its oldest evictable entry makes room (the owner's own FIFO),
  // and if none is evictable the answer is over_quota. A full class makes
  // room by taking a slab from a class over its share, else by evicting its
  // own least recently used entry.
  Reserve reserve(const ChunkKey& key, const Writer& writer, TimePoint now, Slot& slot, std::uint64_t& generation);
  void commit(const ChunkKey& key, std::uint64_t generation, TimePoint now);
  void abort(const ChunkKey& key, std::uint64_t generation);

  // The present entry of `key`, or null.
  const Entry* find(const ChunkKey& key) const;
  // Whether the reservation (key, generation) is still being written: its
  // slot is still the writer's to fill (a late fill must check first).
  bool reserved(const ChunkKey& key, std::uint64_t generation) const;

  // Called with each chunk evicted for room (LRU, watermark, slab moves,
  // quota), before its slot is freed: the next tier's write-back copies it.
  // Not called for CLEAR, aborted or expired writes.
  using EvictionHook = std::function<void(const ChunkKey& key, std::span<const std::byte> bytes)>;
  void set_eviction_hook(EvictionHook hook) { on_evict_ = std::move(hook); }
  // Marks a present, unlocked entry most recently used.
  void touch(const ChunkKey& key);

  // Drops every present, unlocked entry (at most `limit` of them); returns
  // how many.
  std::size_t clear(std::size_t limit = SIZE_MAX);
  // Lock expiry and watermark eviction.
  void tick(TimePoint now);
  // Evicts `cls`'s least recently used entries until `target` of its slots
  // are used (or nothing evictable is left). Returns how many were evicted.
  std::size_t evict_to(LayoutClass cls, std::uint64_t target);
  // Chunk bytes of the layout of a present entry.
  std::uint64_t slot_bytes(const Entry& e) const { return pool_.slot_bytes(e.cls); }

  std::size_t entries() const { return map_.size(); }
  // Slots held (present or being written) by entries `owner` stored.
  std::uint32_t owned_slots(Owner owner) const {
    auto it = owners_.find(owner);
    return it == owners_.end() ? 0 : static_cast<std::uint32_t>(it->second.size());
  }
  std::uint64_t read_locks() const { return read_locks_; }
  // Entries held in L1 by at least one read lock: unevictable until released.
  std::uint64_t pinned_entries() const { return pinned_entries_; }
  std::uint64_t pinned_bytes() const { return pinned_bytes_; }
  std::uint64_t write_locks() const { return write_locks_; }
  const StoreStats& stats() const { return stats_; }
  // Present chunks and their bytes per namespace (for the status page).
  struct NamespaceUsage {
    std::uint64_t chunks = 0;
    std::uint64_t bytes = 0;
  };
  const std::unordered_map<std::uint64_t, NamespaceUsage>& namespaces() const { return namespaces_; }
  L1Pool& pool() { return pool_; }
  const L1Pool& pool() const { return pool_; }
  const StoreConfig& config() const { return config_; }

 private:
  using Map = std::unordered_map<ChunkKey, Entry, ChunkKeyHasher>;

  bool evictable(const Entry& e) const { return e.state == State::present && e.read_locks == 0 && !e.write_locked; }
  void update_lru(Node& n);
  void lock_node(Node& n, Holder holder, TimePoint now);
  void after_unlock(Node& n);
  void drop(Node* n);
  void evict(Node* n);  // drop() for room: the eviction hook sees it first
  Queue& lru(LayoutClass cls);
  std::optional<Slot> make_room(LayoutClass cls);
  bool take_slab_for(LayoutClass cls);
  Node*& at_slot(Slot slot);

  L1Pool& pool_;
  StoreConfig config_;
  Map map_;
  std::vector<Queue> lru_;  // per layout class: evictable entries, least recent first
  Queue read_queue_;   // read-locked entries by expiry (the TTL is constant)
  Queue write_queue_;  // write-locked entries by expiry
  // Each owner's entries, oldest reservation first (absent owners have none).
  std::unordered_map<Owner, Queue> owners_;
  std::vector<Node*> scratch_;  // lookup's matched entries
  std::vector<std::vector<Node*>> at_slot_;  // [slab][slot in slab]: the entry there, for slab reclaim
  static constexpr std::uint32_t slabs_tried_per_reserve = 4;
  std::uint32_t next_donor_slab_ = 0;  // where the search for a slab to take goes on
  std::uint64_t next_generation_ = 1;
  std::uint64_t read_locks_ = 0;
  std::uint64_t pinned_entries_ = 0;
  std::uint64_t pinned_bytes_ = 0;
  std::uint64_t write_locks_ = 0;
  StoreStats stats_;
  std::unordered_map<std::uint64_t, NamespaceUsage> namespaces_;
  EvictionHook on_evict_;
};

}  // namespace kvlink::store
