#include "kvlink/store/disk_index.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

namespace kvlink::store {

DiskIndex::DiskIndex(DiskIndexConfig config) : config_(config) {}

DiskClass DiskIndex::push_class(std::uint64_t slot_bytes, std::uint32_t slots, std::vector<bool> taken) {
  Class c;
  c.slot_bytes = slot_bytes;
  c.table.assign(slots, 0);
  // The lowest free slot is handed out first (at the back).
  for (std::uint32_t s = slots; s-- > 0;)
    if (!taken[s]) c.free.push_back(s);
  classes_.push_back(std::move(c));
  assigned_bytes_ += disk_slot_stride(slot_bytes) * slots;
  return static_cast<DiskClass>(classes_.size() - 1);
}

Result<DiskClass> DiskIndex::add_class(std::uint64_t slot_bytes, std::uint32_t slots) {
  if (slot_bytes == 0 || slots == 0) return Error(errc::bad_request, "a disk tier class needs a chunk size and slots");
  if (slot_bytes > max_disk_slot_bytes)
    return Error(errc::bad_request, fmt::format("chunks of {} bytes are too large for the disk tier", slot_bytes));
  if (find_class(slot_bytes))
    return Error(errc::bad_request, fmt::format("the disk tier already has a class of {}-byte chunks", slot_bytes));
  const std::uint64_t stride = disk_slot_stride(slot_bytes);
  if (stride > unassigned_bytes() / slots)
    return Error(errc::bad_request,
                 fmt::format("{} slots of {} bytes do not fit in the disk tier's {} unassigned bytes (of {}); "
                             "raise --l2-disk-size or give the class fewer slots",
                             slots, stride, unassigned_bytes(), config_.capacity_bytes));
  const DiskClass cls = push_class(slot_bytes, slots, std::vector<bool>(slots, false));
  JournalRecord r;
  r.type = JournalRecord::Type::layout_class;
  r.cls = cls;
  r.slot_bytes = slot_bytes;
  r.slots = slots;
  append(journal_, r);
  return cls;
}

std::optional<DiskClass> DiskIndex::find_class(std::uint64_t slot_bytes) const {
  for (std::size_t c = 0; c < classes_.size(); ++c)
    if (classes_[c].slot_bytes == slot_bytes) return static_cast<DiskClass>(c);
  return std::nullopt;
}

DiskLocation DiskIndex::location(const Entry& e) const {
  const std::uint64_t bytes = classes_[e.cls].slot_bytes;
  return DiskLocation{e.cls, e.slot, std::uint64_t{e.slot} * disk_slot_stride(bytes), bytes, e.checksum};
}

void DiskIndex::journal(JournalRecord::Type type, const ChunkKey& key, const Entry& e) {
  JournalRecord r;
  r.type = type;
  r.cls = e.cls;
  r.slot = e.slot;
  r.key = key;
  r.checksum = e.checksum;
  append(journal_, r);
}

void DiskIndex::lru_remove(Entry& e) {
  if (!e.in_lru) return;
  classes_[e.cls].lru.erase(e.lru);
  e.in_lru = false;
}

void DiskIndex::lru_append(const ChunkKey& key, Entry& e) {
  Lru& q = classes_[e.cls].lru;
  if (e.in_lru) {
    q.splice(q.end(), q, e.lru);
  } else {
    e.lru = q.insert(q.end(), key);
    e.in_lru = true;
  }
}

void DiskIndex::erase(std::unordered_map<ChunkKey, Entry, ChunkKeyHasher>::iterator it) {
  lru_remove(it->second);
  map_.erase(it);
}

Result<DiskIndex::WriteGrant> DiskIndex::begin_write(const ChunkKey& key, DiskClass cls, std::uint64_t checksum) {
  if (cls >= classes_.size()) return Error(errc::bad_request, fmt::format("the disk tier has no class {}", cls));
  if (map_.count(key)) return Error(errc::bad_request, "the chunk is already on the disk tier (present or being written)");
  Class& c = classes_[cls];
  const std::uint64_t stride = disk_slot_stride(c.slot_bytes);
  if (write_bytes_in_flight_ > 0 && write_bytes_in_flight_ + stride > config_.max_write_bytes_in_flight) {
    ++stats_.refused_in_flight;
    return Error(errc::limit_exceeded,
                 fmt::format("the disk tier has {} bytes of writes in flight (at most {}); the chunk is not written",
                             write_bytes_in_flight_, config_.max_write_bytes_in_flight));
  }
  WriteGrant grant;
  std::uint32_t slot = 0;
  if (!c.free.empty()) {
    slot = c.free.back();
    c.free.pop_back();
  } else if (!c.lru.empty()) {
    const ChunkKey victim = c.lru.front();
    auto it = map_.find(victim);
    slot = it->second.slot;  // its put record below tells the journal the victim is gone
    erase(it);
    grant.evicted = victim;
    ++stats_.evictions;
  } else {
    ++stats_.refused_no_room;
    return Error(errc::limit_exceeded,
                 fmt::format("every slot of disk tier class {} is being written or read; the chunk is not written", cls));
  }
  Entry& e = map_[key];
  e.cls = cls;
  e.slot = slot;
  e.state = State::writing;
  e.checksum = checksum;
  ++writing_;
  write_bytes_in_flight_ += stride;
  ++stats_.writes_begun;
  journal(JournalRecord::Type::put, key, e);
  grant.where = location(e);
  return grant;
}

Error DiskIndex::commit_write(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::writing)
    return Error(errc::not_found, "commit_write: no write of this chunk is in flight on the disk tier");
  Entry& e = it->second;
  e.state = State::present;
  --writing_;
  write_bytes_in_flight_ -= disk_slot_stride(classes_[e.cls].slot_bytes);
  lru_append(key, e);
  ++stats_.writes_committed;
  journal(JournalRecord::Type::commit, key, e);
  return {};
}

Error DiskIndex::abort_write(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::writing)
    return Error(errc::not_found, "abort_write: no write of this chunk is in flight on the disk tier");
  Entry& e = it->second;
  --writing_;
  write_bytes_in_flight_ -= disk_slot_stride(classes_[e.cls].slot_bytes);
  classes_[e.cls].free.push_back(e.slot);
  ++stats_.writes_aborted;
  journal(JournalRecord::Type::remove, key, e);
  erase(it);
  return {};
}

Result<DiskIndex::ReadPin> DiskIndex::pin_read(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return Error(errc::not_found, "the chunk is not on the disk tier");
  Entry& e = it->second;
  if (e.state != State::present)
    return Error(errc::not_found, "the chunk is being written to the disk tier: not readable until its write completes");
  if (e.pins++ == 0) {
    lru_remove(e);
    ++pinned_;
  }
  return ReadPin{key, location(e)};
}

void DiskIndex::unpin(const ReadPin& pin) {
  auto it = map_.find(pin.key);
  if (it != map_.end() && it->second.cls == pin.where.cls && it->second.slot == pin.where.slot && it->second.pins > 0) {
    Entry& e = it->second;
    if (--e.pins == 0) {
      --pinned_;
      lru_append(pin.key, e);
    }
    return;
  }
  // The entry was removed while pinned: its slot is free once no pin is left.
  if (pin.where.cls >= classes_.size()) return;
  Class& c = classes_[pin.where.cls];
  if (pin.where.slot < c.table.size() && c.table[pin.where.slot] > 0 && --c.table[pin.where.slot] == 0)
    c.free.push_back(pin.where.slot);
}

std::optional<DiskIndex::State> DiskIndex::state(const ChunkKey& key) const {
  auto it = map_.find(key);
  if (it == map_.end()) return std::nullopt;
  return it->second.state;
}

void DiskIndex::touch(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it != map_.end() && it->second.in_lru) lru_append(key, it->second);
}

Error DiskIndex::remove(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return Error(errc::not_found, "the chunk is not on the disk tier");
  Entry& e = it->second;
  if (e.state != State::present)
    return Error(errc::bad_request, "the chunk is being written: its write ends with commit_write or abort_write");
  journal(JournalRecord::Type::remove, key, e);
  if (e.pins > 0) {
    classes_[e.cls].table[e.slot] = e.pins;
    --pinned_;
  } else {
    classes_[e.cls].free.push_back(e.slot);
  }
  erase(it);
  return {};
}

Error DiskIndex::drop_corrupt(const ChunkKey& key) {
  if (auto err = remove(key)) return err;
  ++stats_.corrupt_dropped;
  return {};
}

std::size_t DiskIndex::drop_slots_from(DiskClass cls, std::uint32_t first_slot) {
  std::vector<ChunkKey> gone;
  for (const auto& [key, e] : map_)
    if (e.cls == cls && e.slot >= first_slot && e.state == State::present) gone.push_back(key);
  for (const ChunkKey& key : gone) (void)remove(key);
  stats_.truncated_dropped += gone.size();
  return gone.size();
}

std::optional<DiskLocation> DiskIndex::find(const ChunkKey& key) const {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::present) return std::nullopt;
  return location(it->second);
}

std::vector<std::byte> DiskIndex::take_journal() { return std::exchange(journal_, {}); }

std::vector<std::byte> DiskIndex::compact() {
  journal_.clear();
  std::vector<std::byte> out;
  for (std::size_t c = 0; c < classes_.size(); ++c) {
    JournalRecord r;
    r.type = JournalRecord::Type::layout_class;
    r.cls = static_cast<DiskClass>(c);
    r.slot_bytes = classes_[c].slot_bytes;
    r.slots = classes_[c].table.size();
    append(out, r);
  }
  auto commit = [&](const ChunkKey& key, const Entry& e) {
    JournalRecord r;
    r.type = JournalRecord::Type::commit;
    r.cls = e.cls;
    r.slot = e.slot;
    r.key = key;
    r.checksum = e.checksum;
    append(out, r);
  };
  // Pinned entries are in use: the most recent of all, so they go last.
  for (const Class& c : classes_)
    for (const ChunkKey& key : c.lru) commit(key, map_.at(key));
  for (const auto& [key, e] : map_)
    if (e.state == State::present && !e.in_lru) commit(key, e);
  return out;
}

Result<DiskIndex::Recovered> DiskIndex::recover(DiskIndexConfig config, std::span<const std::byte> journal) {
  RecoveryStats st;
  struct Occupant {
    bool used = false;
    bool committed = false;
    ChunkKey key;
    std::uint64_t checksum = 0;
    std::uint64_t seq = 0;  // order of the last commit: the recovered LRU order
  };
  std::vector<std::pair<std::uint64_t, std::uint32_t>> defs;  // slot bytes, slots
  std::vector<std::vector<Occupant>> occ;                     // [class][slot]
  std::unordered_map<ChunkKey, std::pair<DiskClass, std::uint64_t>, ChunkKeyHasher> where;
  auto vacate = [&](Occupant& o) {
    if (o.used) where.erase(o.key);
    o.used = false;
  };
  // A key lives in one slot: a put or commit elsewhere moves it.
  auto vacate_key = [&](const ChunkKey& key) {
    auto it = where.find(key);
    if (it == where.end()) return;
    occ[it->second.first][it->second.second].used = false;
    where.erase(it);
  };

  std::uint64_t need = 0;  // bytes of the classes so far: checked as they come, before any slot table is made
  const std::size_t whole = journal.size() / journal_record_bytes * journal_record_bytes;
  st.torn_bytes = journal.size() - whole;
  std::uint64_t seq = 0;
  for (std::size_t off = 0; off < whole; off += journal_record_bytes) {
    const auto r = decode(std::span<const std::byte, journal_record_bytes>(journal.data() + off, journal_record_bytes));
    if (!r) {
      ++st.corrupt_records;
      continue;
    }
    if (r->type == JournalRecord::Type::layout_class) {
      const bool same = r->cls < defs.size() && defs[r->cls] == std::pair{r->slot_bytes, static_cast<std::uint32_t>(r->slots)};
      if (same) {
        ++st.records;
      } else if (r->cls == defs.size() && r->slot_bytes > 0 && r->slot_bytes <= max_disk_slot_bytes && r->slots > 0 &&
                 r->slots <= UINT32_MAX) {
        const std::uint64_t stride = disk_slot_stride(r->slot_bytes);
        if (stride > (config.capacity_bytes - need) / r->slots)
          return Error(errc::bad_request,
                       fmt::format("the disk tier's journal describes more slots than its size {} holds (class {}: {} "
                                   "slots of {} bytes): start with a larger --l2-disk-size or on an empty directory",
                                   config.capacity_bytes, r->cls, r->slots, stride));
        need += stride * r->slots;
        defs.emplace_back(r->slot_bytes, static_cast<std::uint32_t>(r->slots));
        occ.emplace_back(r->slots);
        ++st.records;
      } else {
        ++st.invalid_records;
      }
      continue;
    }
    if (r->cls >= defs.size() || r->slot >= defs[r->cls].second) {
      ++st.invalid_records;
      continue;
    }
    ++st.records;
    Occupant& o = occ[r->cls][r->slot];
    const bool same_key = o.used && o.key == r->key;
    switch (r->type) {
      case JournalRecord::Type::put:
        // The slot's old content is being overwritten: gone, whatever it was.
        vacate(o);
        vacate_key(r->key);
        o = Occupant{true, false, r->key, r->checksum, 0};
        where[r->key] = {r->cls, r->slot};
        break;
      case JournalRecord::Type::commit:
        // Self-contained, so a lost put record loses nothing.
        if (!same_key) {
          vacate(o);
          vacate_key(r->key);
        }
        o = Occupant{true, true, r->key, r->checksum, ++seq};
        where[r->key] = {r->cls, r->slot};
        break;
      case JournalRecord::Type::remove:
        if (same_key) vacate(o);
        break;
      case JournalRecord::Type::layout_class: break;
    }
  }

  DiskIndex index(config);
  struct Live {
    std::uint64_t seq;
    DiskClass cls;
    std::uint32_t slot;
  };
  std::vector<Live> live;
  for (DiskClass c = 0; c < defs.size(); ++c) {
    std::vector<bool> taken(defs[c].second, false);
    for (std::uint32_t s = 0; s < defs[c].second; ++s) {
      const Occupant& o = occ[c][s];
      if (!o.used) continue;
      if (!o.committed) {
        ++st.incomplete_writes;
        continue;
      }
      taken[s] = true;
      live.push_back({o.seq, c, s});
    }
    index.push_class(defs[c].first, defs[c].second, std::move(taken));
  }
  std::sort(live.begin(), live.end(), [](const Live& a, const Live& b) { return a.seq < b.seq; });
  for (const Live& l : live) {
    const Occupant& o = occ[l.cls][l.slot];
    Entry& e = index.map_[o.key];
    e.cls = l.cls;
    e.slot = l.slot;
    e.state = State::present;
    e.checksum = o.checksum;
    index.lru_append(o.key, e);
  }
  st.entries = live.size();
  return Recovered{std::move(index), st};
}

}  // namespace kvlink::store
