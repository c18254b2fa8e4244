// The disk tier's index: which chunk lives in which slot of the tier's
// preallocated data files, and what may happen to it. Pure logic: no files,
// no clock (nothing here depends on time). The driver does the I/O
// (lib/store/disk_files.hpp) and appends the journal records this index
// produces (take_journal()) to the journal file; recover() rebuilds the
// index from those bytes after a restart (docs/tiers.md).
//
// Layout classes: one per chunk size in bytes, each with a fixed number of
// slots (one data file per class), given when the class is added; together
// they stay within the tier's capacity. A class evicts only its own entries.
//
// Entry lifecycle: begin_write() (writing: never readable, never evicted)
// -> commit_write() (present) or abort_write() (gone, slot free). A present
// entry is evictable (LRU per class) unless a read pins it; remove() of a
// pinned entry hides it at once and frees its slot at the last unpin, so a
// slot being read is never overwritten.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvlink/error.hpp"
#include "kvlink/store/disk_journal.hpp"
#include "kvlink/store/keys.hpp"

namespace kvlink::store {

struct DiskIndexConfig {
  // Bytes all classes' slots may take together (slot strides, 4 KiB-rounded).
  std::uint64_t capacity_bytes = 0;
  // Bound on the slot bytes of writes begun and not yet committed or
  // aborted. One write is always allowed, however large.
  std::uint64_t max_write_bytes_in_flight = std::uint64_t{256} << 20;
};

// Where a chunk's bytes are: `bytes` of data at `offset` of class `cls`'s
// data file (the slot is disk_slot_stride(bytes) long), and their checksum.
struct DiskLocation {
  DiskClass cls = 0;
  std::uint32_t slot = 0;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
  std::uint64_t checksum = 0;
};

struct DiskIndexStats {
  std::uint64_t writes_begun = 0;
  std::uint64_t writes_committed = 0;
  std::uint64_t writes_aborted = 0;
  std::uint64_t evictions = 0;
  std::uint64_t refused_in_flight = 0;  // begin_write over max_write_bytes_in_flight
  std::uint64_t refused_no_room = 0;    // begin_write with every slot writing or pinned
  std::uint64_t corrupt_dropped = 0;    // drop_corrupt(): a read failed its checksum
  std::uint64_t truncated_dropped = 0;  // drop_slots_from(): slots past a data file's end
};

// What recover() found in the journal.
struct RecoveryStats {
  std::uint64_t records = 0;            // valid records replayed
  std::uint64_t corrupt_records = 0;    // failed their checksum (flipped bytes), skipped
  std::uint64_t invalid_records = 0;    // well-formed but naming an unknown class or slot, or a conflicting class
  std::uint64_t torn_bytes = 0;         // a partial record at the end (a crash mid-append)
  std::uint64_t incomplete_writes = 0;  // put without commit: the chunk may be half-written, dropped
  std::uint64_t entries = 0;            // present chunks recovered
};

class DiskIndex {
 public:
  enum class State : std::uint8_t { writing, present };

  explicit DiskIndex(DiskIndexConfig config);
  DiskIndex(DiskIndex&&) = default;
  DiskIndex& operator=(DiskIndex&&) = default;

  // A class of `slots` slots of `slot_bytes` (journaled). Refused
  // (bad_request) when it would exceed the capacity, or a class of that size
  // exists (find_class).
  Result<DiskClass> add_class(std::uint64_t slot_bytes, std::uint32_t slots);
  std::optional<DiskClass> find_class(std::uint64_t slot_bytes) const;
  std::size_t classes() const { return classes_.size(); }
  std::uint64_t slot_bytes(DiskClass cls) const { return classes_[cls].slot_bytes; }
  std::uint32_t slots(DiskClass cls) const { return static_cast<std::uint32_t>(classes_[cls].table.size()); }
  // Capacity not yet given to a class.
  std::uint64_t unassigned_bytes() const { return config_.capacity_bytes - assigned_bytes_; }

  // Writing. The caller computed `checksum` (chunk_checksum) of the bytes
  // it is about to write. Refused: bad_request (unknown class, or the key is
  // already on the tier: check contains() first), limit_exceeded (in-flight
  // bound, or every slot of the class is being written or read). A full
  // class evicts its least recently used present entry: `evicted`.
  struct WriteGrant {
    DiskLocation where;
    std::optional<ChunkKey> evicted;
  };
  Result<WriteGrant> begin_write(const ChunkKey& key, DiskClass cls, std::uint64_t checksum);
  // The write's I/O completed: the entry becomes present and readable.
  Error commit_write(const ChunkKey& key);
  // The write's I/O failed (call only after its completion arrived: the
  // slot is reused at once).
  Error abort_write(const ChunkKey& key);

  // Reading: a present entry, pinned until unpin(): not evicted, its slot
  // not reused. not_found when absent or still being written.
  struct ReadPin {
    ChunkKey key;
    DiskLocation where;
  };
  Result<ReadPin> pin_read(const ChunkKey& key);
  void unpin(const ReadPin& pin);

  bool contains(const ChunkKey& key) const { return map_.count(key) != 0; }
  // Where a present entry is (nullopt when absent or still being written).
  std::optional<DiskLocation> find(const ChunkKey& key) const;
  std::optional<State> state(const ChunkKey& key) const;
  // Marks a present entry most recently used.
  void touch(const ChunkKey& key);
  // Drops a present entry (not_found otherwise). A pinned one disappears
  // now and frees its slot at its last unpin.
  Error remove(const ChunkKey& key);
  // remove(), counted as corrupt: its bytes failed their checksum.
  Error drop_corrupt(const ChunkKey& key);
  // Drops the present entries of `cls` in slots >= first_slot (a data file
  // found shorter than its slots); returns how many.
  std::size_t drop_slots_from(DiskClass cls, std::uint32_t first_slot);

  // The journal records of every change since the last call, in order, to
  // append to the journal file.
  std::vector<std::byte> take_journal();
  // A whole journal describing the index as it is now (classes, then present
  // entries least recently used first), replacing the journal file and
  // anything take_journal() had not returned yet.
  std::vector<std::byte> compact();

  // The index described by a journal: replays its records in order, skips
  // corrupt and invalid ones, drops a torn tail and writes that never
  // committed. The recovered entries are present and unpinned, in the LRU
  // order of their commits. Fails (bad_request) only when the journal's
  // classes need more than config.capacity_bytes.
  struct Recovered;
  static Result<Recovered> recover(DiskIndexConfig config, std::span<const std::byte> journal);

  std::size_t entries() const { return map_.size(); }
  std::size_t present() const { return map_.size() - writing_; }
  std::size_t writing() const { return writing_; }
  std::size_t pinned() const { return pinned_; }
  std::uint64_t write_bytes_in_flight() const { return write_bytes_in_flight_; }
  // Slots (of either state) in use, and free, in `cls`.
  std::uint32_t used_slots(DiskClass cls) const { return slots(cls) - static_cast<std::uint32_t>(classes_[cls].free.size()); }
  const DiskIndexStats& stats() const { return stats_; }
  const DiskIndexConfig& config() const { return config_; }

 private:
  using Lru = std::list<ChunkKey>;
  struct Entry {
    DiskClass cls = 0;
    std::uint32_t slot = 0;
    State state = State::writing;
    std::uint32_t pins = 0;
    std::uint64_t checksum = 0;
    bool in_lru = false;
    Lru::iterator lru;
  };
  struct Class {
    std::uint64_t slot_bytes = 0;
    // Per slot: pins still held on an entry removed while pinned (the slot
    // stays taken until they go).
    std::vector<std::uint32_t> table;
    std::vector<std::uint32_t> free;  // free slots, the next one at the back
    Lru lru;                          // present, unpinned entries, least recent first
  };

  DiskLocation location(const Entry& e) const;
  void journal(JournalRecord::Type type, const ChunkKey& key, const Entry& e);
  void lru_remove(Entry& e);
  void lru_append(const ChunkKey& key, Entry& e);
  void erase(std::unordered_map<ChunkKey, Entry, ChunkKeyHasher>::iterator it);
  DiskClass push_class(std::uint64_t slot_bytes, std::uint32_t slots, std::vector<bool> taken);

  DiskIndexConfig config_;
  std::vector<Class> classes_;
  std::unordered_map<ChunkKey, Entry, ChunkKeyHasher> map_;
  std::uint64_t assigned_bytes_ = 0;
  std::uint64_t write_bytes_in_flight_ = 0;
  std::size_t writing_ = 0;
  std::size_t pinned_ = 0;
  std::vector<std::byte> journal_;
  DiskIndexStats stats_;
};

struct DiskIndex::Recovered {
  DiskIndex index;
  RecoveryStats stats;
};

}  // namespace kvlink::store
