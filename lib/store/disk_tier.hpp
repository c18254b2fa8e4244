// The local disk tier (--l2-disk DIR --l2-disk-size SIZE): DiskIndex (which
// chunk is in which slot), DiskFiles (the files and their io_uring I/O) and
// TierHealth (whether to use the disk at all) put together behind
// LowerTier. Single-threaded, on the server's io thread; the Asio layer
// waits on event_fd() and calls on_ready().
//
// Space: --l2-disk-size is split evenly between up to `layouts` chunk
// sizes (KV layouts); each gets one preallocated data file when its first
// chunk is written. Chunks of a further layout are not written (counted,
// and said once in the log).
//
// A directory deleted or replaced under a running tier: the tier goes
// degraded within a second; once no I/O is in flight, a probe opens the
// directory afresh (made again if it is gone) with an empty index, and the
// tier recovers by itself (its old chunks are lost with their files).
//
// Warm restart: open() replays the journal (DiskIndex::recover), drops
// what lies past a data file's end, and rewrites the journal compactly
// before the server says ready. Every read is checked against its
// checksum, so whatever the crash left behind is dropped, never served.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvlink/store/disk_index.hpp"
#include "kvlink/store/lower_tier.hpp"
#include "kvlink/store/tier_health.hpp"
#include "kvlink/unique_fd.hpp"
#include "store/disk_files.hpp"

namespace kvlink::store {

struct DiskTierConfig {
  std::string dir;
  std::uint64_t capacity_bytes = 0;
  std::uint32_t layouts = 1;  // chunk sizes the capacity is split between
  std::uint64_t max_write_bytes_in_flight = std::uint64_t{256} << 20;
  std::uint64_t max_read_bytes_in_flight = std::uint64_t{256} << 20;
  bool direct = true;  // O_DIRECT where the filesystem takes it
  TierHealthConfig health;
  // Journal records reach the device (fdatasync, through the ring) at
  // least this often; a kill loses nothing either way (the page cache).
  Duration journal_sync_interval = std::chrono::seconds(1);
};

// What open() found and did.
struct DiskTierStartup {
  RecoveryStats recovery;
  std::uint64_t truncated_dropped = 0;  // entries past a data file's end
  bool journal_unusable = false;        // its classes did not fit the capacity: started empty
  Duration took{};
};

class DiskTier final : public LowerTier {
 public:
  static Result<std::unique_ptr<DiskTier>> open(const DiskTierConfig& config, std::uint64_t seed, TimePoint now);
  ~DiskTier() override;
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  bool accepting() const override { return health_.accepting(); }
  // The index knows at once: `done` runs before find() returns.
  void find(std::span<const ChunkKey> keys, Found done) override;
  bool put(const ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) override;
  Error get(const ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) override;
  Error get(const ChunkKey& key, TimePoint now, ReadDone done) { return get(key, 0, now, std::move(done)); }
  // The size of `key`'s chunk when it is on the tier whole, else nullopt.
  std::optional<std::uint64_t> holds(const ChunkKey& key) const;
  void tick(TimePoint now) override;
  LowerTierStats stats() const override;

  // Readable when I/O completed: call on_ready() then.
  int event_fd() const { return events_.get(); }
  void on_ready(TimePoint now);

  const DiskTierStartup& startup() const { return startup_; }
  const DiskIndex& index() const { return index_; }
  TierState state() const { return health_.state(); }
  bool direct() const { return files_->direct(); }
  // Tests: fault injection, stall release.
  DiskFiles& files() { return *files_; }

 private:
  enum class OpKind : std::uint8_t { write, read, probe, journal_sync };
  // An I/O submitted to the ring, by its tag.
  struct Op {
    OpKind kind = OpKind::write;
    ChunkKey key;
    TierHealth::OpId health_op = 0;
    std::optional<AlignedBuffer> buffer;
    std::optional<DiskIndex::ReadPin> pin;  // reads
    ReadDone done;                          // reads
    std::uint64_t bytes = 0;                // writes: the chunk's bytes
    std::uint64_t probe_id = 0;             // probes
  };

  DiskTier(const DiskTierConfig& config, UniqueFd events, std::unique_ptr<DiskFiles> files, DiskIndex index,
           std::uint64_t seed);
  // The class for chunks of `bytes`, made (and its file opened) if there is
  // room for another layout.
  std::optional<DiskClass> class_for(std::uint64_t bytes, TimePoint now);
  // The directory is gone or another one: starts the tier afresh there, or
  // says why it cannot (yet).
  Error reopen(TimePoint now);
  // Appends what the index journaled; a failure counts against the tier
  // (false).
  bool write_journal(TimePoint now);
  void io_failed(const Error& error, TimePoint now);
  void apply(const TierActions& actions, TimePoint now);
  AlignedBuffer take_buffer(std::uint64_t bytes);
  void give_back(AlignedBuffer buffer);
  void finish_write(Op& op, const Error& result);
  void finish_read(Op& op, const Error& result, TimePoint now);

  DiskTierConfig config_;
  DiskIndex index_;
  TierHealth health_;
  DiskTierStartup startup_;
  LowerTierStats counters_;
  std::unordered_map<std::uint64_t, Op> ops_;  // by tag
  std::vector<AlignedBuffer> spare_;  // buffers kept for reuse
  std::uint64_t spare_bytes_ = 0;
  std::uint64_t next_tag_ = 1;
  std::uint64_t read_bytes_in_flight_ = 0;
  bool journal_dirty_ = false;
  bool journal_syncing_ = false;
  TimePoint next_journal_sync_{};
  TimePoint next_dir_check_{};
  std::uint64_t journal_bytes_ = 0;  // in the journal file since the last compaction
  bool warned_layouts_ = false;
  std::vector<bool> opened_;  // per class: its data file is open
  UniqueFd events_;           // the eventfd completions signal, kept across a reopen
  // Last: destroyed first, waiting for the I/O still using the ops' buffers.
  std::unique_ptr<DiskFiles> files_;
};

}  // namespace kvlink::store
