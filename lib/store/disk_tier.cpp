#include "store/disk_tier.hpp"

#include <fmt/format.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "kvlink/log.hpp"

namespace kvlink::store {

namespace {
// Spare buffers kept for reuse (a chunk's buffer costs a page-faulting
// allocation otherwise); more than this are freed.
constexpr std::uint64_t max_spare_bytes = std::uint64_t{256} << 20;
// The journal is rewritten compactly once it holds this many times the
// records the index needs (and at least min_compact_bytes).
constexpr std::uint64_t compact_factor = 4;
constexpr std::uint64_t min_compact_bytes = std::uint64_t{16} << 20;
}  // namespace

Result<std::unique_ptr<DiskTier>> DiskTier::open(const DiskTierConfig& config, std::uint64_t seed, TimePoint now) {
  if (config.capacity_bytes < disk_block_bytes)
    return Error(errc::bad_request, fmt::format("--l2-disk-size {} is too small to hold a chunk: give at least a few "
                                                "chunks' worth, e.g. 64GiB",
                                                config.capacity_bytes));
  UniqueFd events(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!events) return disk_error(errno, "eventfd");
  auto files = DiskFiles::open({.dir = config.dir, .direct = config.direct, .event_fd = events.get()});
  if (!files) return files.error();
  auto journal = (*files)->read_journal();
  if (!journal) return journal.error();
  const DiskIndexConfig index_config{config.capacity_bytes, config.max_write_bytes_in_flight};
  DiskTierStartup startup;
  auto recovered = DiskIndex::recover(index_config, *journal);
  DiskIndex index(index_config);
  if (recovered) {
    startup.recovery = recovered->stats;
    index = std::move(recovered->index);
  } else {
    // The journal's layouts need more than --l2-disk-size now (it was
    // lowered): start empty; the rewritten journal forgets the old chunks.
    startup.journal_unusable = true;
    log::warn("kvlink-server: disk tier {}: {}; starting it empty", config.dir, recovered.error().message());
  }
  for (DiskClass cls = 0; cls < index.classes(); ++cls) {
    auto had = (*files)->open_class(cls, index.slot_bytes(cls), index.slots(cls));
    if (!had) return had.error();
    if (*had < index.slots(cls)) startup.truncated_dropped += index.drop_slots_from(cls, *had);
  }
  // Data files no class of the index uses (an unusable journal's) only take space.
  std::error_code ec;
  for (const auto& f : std::filesystem::directory_iterator(config.dir, ec)) {
    const std::string name = f.path().filename().string();
    if (!name.starts_with("class-") || !name.ends_with(".data")) continue;
    bool used = false;
    for (DiskClass cls = 0; cls < index.classes(); ++cls)
      used = used || name == DiskFiles::data_file_name(cls, index.slot_bytes(cls));
    if (!used) std::filesystem::remove(f.path(), ec);
  }
  if (auto err = (*files)->replace_journal(index.compact())) return err;
  std::unique_ptr<DiskTier> tier(new DiskTier(config, std::move(events), std::move(*files), std::move(index), seed));
  tier->opened_.assign(tier->index_.classes(), true);
  tier->startup_ = startup;
  tier->startup_.took = Clock::now() - now;
  tier->counters_.recovered_chunks = tier->index_.present();
  tier->journal_bytes_ = tier->index_.entries() * journal_record_bytes;
  tier->next_journal_sync_ = now + config.journal_sync_interval;
  return tier;
}

DiskTier::DiskTier(const DiskTierConfig& config, UniqueFd events, std::unique_ptr<DiskFiles> files, DiskIndex index,
                   std::uint64_t seed)
    : config_(config),
      index_(std::move(index)),
      health_(config.health, fmt::format("kvlink-server: disk tier {}", config.dir), seed),
      events_(std::move(events)),
      files_(std::move(files)) {
  counters_.capacity_bytes = config.capacity_bytes;
}

DiskTier::~DiskTier() {
  // files_ goes first (declared last): it waits for the I/O still using
  // the ops' buffers. No `done` runs from here.
}

void DiskTier::find(std::span<const ChunkKey> keys, Found done) {
  std::vector<std::optional<std::uint64_t>> sizes;
  sizes.reserve(keys.size());
  for (const auto& k : keys) sizes.push_back(accepting() ? holds(k) : std::nullopt);
  done(std::move(sizes));
}

std::optional<std::uint64_t> DiskTier::holds(const ChunkKey& key) const {
  auto where = index_.find(key);
  if (!where) return std::nullopt;
  return where->bytes;
}

AlignedBuffer DiskTier::take_buffer(std::uint64_t bytes) {
  const std::uint64_t stride = disk_slot_stride(bytes);
  for (auto it = spare_.begin(); it != spare_.end(); ++it) {
    if (it->size() != stride) continue;
    AlignedBuffer b = std::move(*it);
    spare_.erase(it);
    spare_bytes_ -= stride;
    return b;
  }
  return AlignedBuffer(stride);
}

void DiskTier::give_back(AlignedBuffer buffer) {
  if (spare_bytes_ + buffer.size() > max_spare_bytes) return;
  spare_bytes_ += buffer.size();
  spare_.push_back(std::move(buffer));
}

std::optional<DiskClass> DiskTier::class_for(std::uint64_t bytes, TimePoint now) {
  auto cls = index_.find_class(bytes);
  if (!cls) {
    const std::uint64_t share = config_.capacity_bytes / std::max<std::uint32_t>(config_.layouts, 1);
    const std::uint64_t slots = std::min(share, index_.unassigned_bytes()) / disk_slot_stride(bytes);
    if (index_.classes() >= config_.layouts || slots == 0) {
      if (!warned_layouts_) {
        warned_layouts_ = true;
        log::warn("kvlink-server: disk tier {}: chunks of {} bytes are not written to disk: its space is split "
                  "between {} KV layout{} already in use ({} bytes each); raise --l2-disk-layouts (and "
                  "--l2-disk-size)",
                  config_.dir, bytes, index_.classes(), index_.classes() == 1 ? "" : "s", share);
      }
      return std::nullopt;
    }
    auto added = index_.add_class(bytes, static_cast<std::uint32_t>(std::min<std::uint64_t>(slots, UINT32_MAX)));
    if (!added) return std::nullopt;
    cls = *added;
    // Unjournaled (a failing journal), the class still works; after a
    // restart its chunks' records name an unknown class and are dropped.
    (void)write_journal(now);
  }
  if (opened_.size() <= *cls) opened_.resize(*cls + 1, false);
  if (!opened_[*cls]) {
    // Preallocating its file may fail (a full filesystem): tried again on
    // the next write once the tier is healthy.
    if (auto had = files_->open_class(*cls, bytes, index_.slots(*cls)); !had) {
      io_failed(had.error(), now);
      return std::nullopt;
    }
    opened_[*cls] = true;
    log::info("kvlink-server: disk tier {}: {} slots for chunks of {} bytes", config_.dir, index_.slots(*cls), bytes);
  }
  return cls;
}

bool DiskTier::write_journal(TimePoint now) {
  const std::vector<std::byte> records = index_.take_journal();
  if (records.empty()) return true;
  if (auto err = files_->append_journal(records)) {
    io_failed(err, now);
    return false;
  }
  journal_bytes_ += records.size();
  journal_dirty_ = true;
  return true;
}

void DiskTier::io_failed(const Error& error, TimePoint now) {
  // Judged like an I/O that failed at once.
  apply(health_.op_finished(health_.op_started(now, "disk tier"), now, error), now);
}

Error DiskTier::reopen(TimePoint now) {
  // The old files' I/O must be over first: their buffers are the ops'.
  if (!ops_.empty())
    return Error(errc::limit_exceeded, fmt::format("{} I/O of the old directory still in flight", ops_.size()));
  auto files = DiskFiles::open({.dir = config_.dir, .direct = config_.direct, .event_fd = events_.get()});
  if (!files) return files.error();
  DiskIndex fresh(DiskIndexConfig{config_.capacity_bytes, config_.max_write_bytes_in_flight});
  if (auto err = (*files)->replace_journal(fresh.compact())) return err;
  log::warn("kvlink-server: disk tier {}: the directory was gone or replaced; the tier starts afresh there, without "
            "the {} chunks it held",
            config_.dir, index_.present());
  files_ = std::move(*files);
  index_ = std::move(fresh);
  opened_.clear();
  journal_bytes_ = 0;
  journal_dirty_ = false;
  next_dir_check_ = now + std::chrono::seconds(1);
  return {};
}

void DiskTier::apply(const TierActions& actions, TimePoint now) {
  if (actions.transition) {
    ++counters_.transitions;
    if (actions.transition->to == TierState::degraded) log::warn("{}", actions.transition->line);
    else log::info("{}", actions.transition->line);
  }
  if (!actions.probe) return;
  // A data file that could not be preallocated (a full filesystem) needs
  // its room back before the tier is healthy: else it would flap.
  std::uint64_t unallocated = 0;
  for (DiskClass cls = 0; cls < index_.classes(); ++cls)
    if (cls >= opened_.size() || !opened_[cls])
      unallocated += std::uint64_t{index_.slots(cls)} * disk_slot_stride(index_.slot_bytes(cls));
  if (files_->check_dir()) {
    if (auto err = reopen(now)) return apply(health_.probe_finished(now, actions.probe_id, err), now);
    unallocated = 0;
  }
  const std::uint64_t tag = next_tag_++;
  if (auto err = files_->submit_probe(tag, unallocated))
    return apply(health_.probe_finished(now, actions.probe_id, err), now);
  Op op;
  op.kind = OpKind::probe;
  op.probe_id = actions.probe_id;
  ops_.emplace(tag, std::move(op));
}

bool DiskTier::put(const ChunkKey& key, std::span<const std::byte> bytes, TimePoint now) {
  if (index_.contains(key)) return true;  // there, or being written
  auto skip = [&] {
    ++counters_.writes_skipped;
    return false;
  };
  if (!health_.accepting() || bytes.size() > max_disk_io_bytes) return skip();
  auto cls = class_for(bytes.size(), now);
  if (!cls) return skip();
  auto grant = index_.begin_write(key, *cls, chunk_checksum(key, bytes));
  if (!grant) return skip();  // the in-flight bound, or every slot busy
  // The put record reaches the journal before the data: after a crash, a
  // put without its commit says the slot may be half-written.
  if (!write_journal(now)) {
    (void)index_.abort_write(key);
    (void)index_.take_journal();  // neither record reached the journal: it stays as it was
    return skip();
  }
  Op op;
  op.kind = OpKind::write;
  op.key = key;
  op.bytes = bytes.size();
  op.buffer = take_buffer(bytes.size());
  std::memcpy(op.buffer->data(), bytes.data(), bytes.size());
  std::memset(op.buffer->data() + bytes.size(), 0, op.buffer->size() - bytes.size());
  const std::uint64_t tag = next_tag_++;
  if (auto err = files_->submit_write(grant->where, op.buffer->span(), tag)) {
    (void)index_.abort_write(key);
    (void)write_journal(now);
    give_back(std::move(*op.buffer));
    return skip();
  }
  op.health_op = health_.op_started(now, fmt::format("write of chunk {}", to_string(key.hash)));
  ops_.emplace(tag, std::move(op));
  return true;
}

Error DiskTier::get(const ChunkKey& key, std::uint64_t bytes, TimePoint now, ReadDone done) {
  if (!health_.accepting())
    return Error(errc::not_connected, "the disk tier is degraded: serving from L1 only until a probe succeeds");
  auto pin = index_.pin_read(key);
  if (!pin) return pin.error();
  if (bytes != 0 && pin->where.bytes != bytes) {
    index_.unpin(*pin);
    return Error(errc::not_found, fmt::format("chunk {} is on the disk tier with {} bytes, not {}", to_string(key.hash),
                                              pin->where.bytes, bytes));
  }
  const std::uint64_t stride = disk_slot_stride(pin->where.bytes);
  if (read_bytes_in_flight_ > 0 && read_bytes_in_flight_ + stride > config_.max_read_bytes_in_flight) {
    index_.unpin(*pin);
    return Error(errc::limit_exceeded, "the disk tier's reads in flight are at their bound");
  }
  Op op;
  op.kind = OpKind::read;
  op.key = key;
  op.buffer = take_buffer(pin->where.bytes);
  op.done = std::move(done);
  const std::uint64_t tag = next_tag_++;
  if (auto err = files_->submit_read(pin->where, op.buffer->span(), tag)) {
    index_.unpin(*pin);
    give_back(std::move(*op.buffer));
    return err;
  }
  read_bytes_in_flight_ += stride;
  op.health_op = health_.op_started(now, fmt::format("read of chunk {}", to_string(key.hash)));
  op.pin = std::move(*pin);
  ops_.emplace(tag, std::move(op));
  return {};
}

void DiskTier::on_ready(TimePoint now) {
  for (auto& c : files_->reap()) {
    auto it = ops_.find(c.tag);
    if (it == ops_.end()) continue;
    Op op = std::move(it->second);
    ops_.erase(it);
    switch (op.kind) {
      case OpKind::probe:
        apply(health_.probe_finished(now, op.probe_id, c.error), now);
        break;
      case OpKind::journal_sync:
        journal_syncing_ = false;
        apply(health_.op_finished(op.health_op, now, c.error), now);
        break;
      case OpKind::write:
        apply(health_.op_finished(op.health_op, now, c.error), now);
        finish_write(op, c.error);
        write_journal(now);
        break;
      case OpKind::read:
        apply(health_.op_finished(op.health_op, now, c.error), now);
        finish_read(op, c.error, now);
        break;
    }
    if (op.buffer) give_back(std::move(*op.buffer));
  }
}

void DiskTier::finish_write(Op& op, const Error& result) {
  if (result) {
    ++counters_.writes_failed;
    (void)index_.abort_write(op.key);
    return;
  }
  (void)index_.commit_write(op.key);
  ++counters_.writes;
  counters_.write_bytes += op.bytes;
}

void DiskTier::finish_read(Op& op, const Error& result, TimePoint now) {
  const DiskIndex::ReadPin pin = *op.pin;
  read_bytes_in_flight_ -= disk_slot_stride(pin.where.bytes);
  Error error = result;
  if (!error) error = verify_chunk(pin.key, pin.where, op.buffer->span());
  index_.unpin(pin);
  if (error) {
    if (result == errc::not_found || !result) {
      // Past a truncated file's end, or bytes that fail their checksum: the
      // chunk is gone; it is never served.
      (void)index_.drop_corrupt(pin.key);
      write_journal(now);
    }
    ++counters_.reads_failed;
    return op.done(error, {});
  }
  index_.touch(pin.key);
  ++counters_.reads;
  counters_.read_bytes += pin.where.bytes;
  op.done({}, op.buffer->span().first(pin.where.bytes));
}

void DiskTier::tick(TimePoint now) {
  apply(health_.tick(now), now);
  // Writes into a deleted directory's files succeed and vanish: look
  // every second while healthy (while degraded the probes look).
  if (health_.accepting() && now >= next_dir_check_) {
    next_dir_check_ = now + std::chrono::seconds(1);
    if (auto err = files_->check_dir()) io_failed(err, now);
  }
  if (journal_dirty_ && !journal_syncing_ && now >= next_journal_sync_) {
    next_journal_sync_ = now + config_.journal_sync_interval;
    const std::uint64_t tag = next_tag_++;
    if (auto err = files_->submit_journal_sync(tag)) return io_failed(err, now);
    journal_dirty_ = false;
    journal_syncing_ = true;
    Op op;
    op.kind = OpKind::journal_sync;
    op.health_op = health_.op_started(now, "journal sync");
    ops_.emplace(tag, std::move(op));
  }
  // Compaction rewrites the journal synchronously: rare (the journal grew
  // compact_factor times past what the index needs), and only with no write
  // in flight, whose records would otherwise be lost from the new file.
  const std::uint64_t needed = (index_.entries() + index_.classes()) * journal_record_bytes;
  if (journal_bytes_ > std::max(min_compact_bytes, compact_factor * needed) && index_.writing() == 0 &&
      !journal_syncing_) {
    if (auto err = files_->replace_journal(index_.compact())) return io_failed(err, now);
    journal_bytes_ = needed;
  }
}

LowerTierStats DiskTier::stats() const {
  LowerTierStats s = counters_;
  s.healthy = health_.accepting();
  s.chunks = index_.present();
  s.bytes = 0;
  for (DiskClass cls = 0; cls < index_.classes(); ++cls)
    s.bytes += std::uint64_t{index_.used_slots(cls)} * index_.slot_bytes(cls);
  s.evictions = index_.stats().evictions;
  s.write_bytes_in_flight = index_.write_bytes_in_flight();
  s.read_bytes_in_flight = read_bytes_in_flight_;
  s.io_errors = health_.counters().io_errors;
  s.stalls = health_.counters().stalls;
  // Dropped at start (torn or flipped journal records, writes that never
  // committed, slots past a file's end) and since (checksum failures).
  const RecoveryStats& r = startup_.recovery;
  s.corrupt_dropped = r.corrupt_records + r.incomplete_writes + index_.stats().corrupt_dropped +
                      index_.stats().truncated_dropped;
  return s;
}

}  // namespace kvlink::store
