#include "kvlink/store/kv_store.hpp"

#include <algorithm>

namespace kvlink::store {

KvStore::KvStore(L1Pool& pool, StoreConfig config) : pool_(pool), config_(config) {}

KvStore::Queue& KvStore::lru(LayoutClass cls) {
  if (lru_.size() <= cls) lru_.resize(cls + 1);
  return lru_[cls];
}

KvStore::Node*& KvStore::at_slot(Slot slot) {
  if (at_slot_.size() < pool_.num_slabs()) at_slot_.resize(pool_.num_slabs());
  auto& slab = at_slot_[pool_.slab_of(slot)];
  const std::uint32_t i = pool_.index_in_slab(slot);
  if (slab.size() <= i) slab.resize(i + 1, nullptr);
  return slab[i];
}

void KvStore::update_lru(Node& n) {
  Entry& e = n.second;
  const bool want = evictable(e);
  if (want && !e.in_lru) {
    Queue& q = lru(e.cls);
    e.lru = q.insert(q.end(), &n);
    e.in_lru = true;
  } else if (!want && e.in_lru) {
    lru_[e.cls].erase(e.lru);
    e.in_lru = false;
  }
}

std::uint32_t KvStore::lookup(std::uint64_t ns, std::uint32_t world_size, std::span<const ChunkHash> hashes,
                              TimePoint now, std::optional<Holder> holder) {
  std::uint32_t matched = 0;
  while (matched < hashes.size() && match_chunk(ns, world_size, hashes[matched], now, holder)) ++matched;
  record_lookup(matched, hashes.size() - matched);
  return matched;
}

bool KvStore::match_chunk(std::uint64_t ns, std::uint32_t world_size, const ChunkHash& hash, TimePoint now,
                          std::optional<Holder> holder) {
  // Only whole chunks (every rank) are locked.
  scratch_.clear();
  for (std::uint32_t r = 0; r < world_size; ++r) {
    auto it = map_.find(ChunkKey{ns, hash, r});
    if (it == map_.end() || it->second.state != State::present) return false;
    scratch_.push_back(&*it);
  }
  for (Node* n : scratch_) {
    if (holder) lock_node(*n, *holder, now);
    else if (n->second.in_lru) {  // reads refresh recency
      Queue& q = lru_[n->second.cls];
      q.splice(q.end(), q, n->second.lru);
    }
  }
  return true;
}

void KvStore::lock_node(Node& n, Holder holder, TimePoint now) {
  Entry& e = n.second;
  if (e.read_locks++ == 0) {
    ++pinned_entries_;
    pinned_bytes_ += slot_bytes(e);
  }
  ++read_locks_;
  auto h = std::find_if(e.holders.begin(), e.holders.end(), [&](const auto& p) { return p.first == holder; });
  if (h == e.holders.end()) e.holders.emplace_back(holder, 1);
  else ++h->second;
  e.read_expiry = now + config_.read_lock_ttl;
  if (e.in_read) {
    read_queue_.splice(read_queue_.end(), read_queue_, e.read);
  } else {
    e.read = read_queue_.insert(read_queue_.end(), &n);
    e.in_read = true;
  }
  update_lru(n);
}

void KvStore::lock(const ChunkKey& key, Holder holder, TimePoint now) {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::present) return;
  lock_node(*it, holder, now);
}

void KvStore::after_unlock(Node& n) {
  Entry& e = n.second;
  if (e.read_locks == 0 && e.in_read) {
    read_queue_.erase(e.read);
    e.in_read = false;
    --pinned_entries_;
    pinned_bytes_ -= slot_bytes(e);
  }
  // A chunk just read is the most recently used: update_lru appends.
  update_lru(n);
}

bool KvStore::release_one(const ChunkKey& key, Holder holder) {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.read_locks == 0) return false;
  Entry& e = it->second;
  auto h = std::find_if(e.holders.begin(), e.holders.end(), [&](const auto& p) { return p.first == holder; });
  if (h == e.holders.end()) return false;
  if (--h->second == 0) e.holders.erase(h);
  --e.read_locks;
  --read_locks_;
  after_unlock(*it);
  return true;
}

void KvStore::release_all(const ChunkKey& key, Holder holder) {
  auto it = map_.find(key);
  if (it == map_.end()) return;
  Entry& e = it->second;
  auto h = std::find_if(e.holders.begin(), e.holders.end(), [&](const auto& p) { return p.first == holder; });
  if (h == e.holders.end()) return;
  e.read_locks -= h->second;
  read_locks_ -= h->second;
  e.holders.erase(h);
  after_unlock(*it);
}

KvStore::Reserve KvStore::reserve(const ChunkKey& key, const Writer& writer, TimePoint now, Slot& slot,
                                  std::uint64_t& generation) {
  const Owner owner = writer.owner;
  auto it = map_.find(key);
  if (it != map_.end()) {
    if (it->second.state == State::writing) return Reserve::locked;
    if (slot_bytes(it->second) != writer.slot_bytes) return Reserve::other_layout;
    touch(key);  // writes refresh recency
    return Reserve::present;
  }
  LayoutClass cls = 0;
  if (pool_.class_for(writer.slot_bytes, cls)) return Reserve::no_room;
  if (writer.quota > 0 && owned_slots(owner) >= writer.quota) {
    // At its quota: the owner's oldest evictable entry makes room.
    Queue& mine = owners_[owner];
    auto victim = std::find_if(mine.begin(), mine.end(), [&](Node* n) { return evictable(n->second); });
    if (victim == mine.end()) {
      ++stats_.quota_refusals;
      return Reserve::over_quota;
    }
    ++stats_.quota_evictions;
    evict(*victim);
  }
  auto s = pool_.allocate(cls);
  if (!s) s = make_room(cls);
  if (!s) return Reserve::no_room;
  auto [pos, inserted] = map_.try_emplace(key);
  Entry& e = pos->second;
  e.slot = *s;
  e.cls = cls;
  at_slot(*s) = &*pos;
  e.state = State::writing;
  e.write_locked = true;
  e.generation = next_generation_++;
  e.write_expiry = now + config_.write_lock_ttl;
  e.write = write_queue_.insert(write_queue_.end(), &*pos);
  e.in_write = true;
  e.owner = owner;
  Queue& mine = owners_[owner];
  e.owned = mine.insert(mine.end(), &*pos);
  ++write_locks_;
  slot = e.slot;
  generation = e.generation;
  return Reserve::reserved;
}

void KvStore::commit(const ChunkKey& key, std::uint64_t generation, TimePoint) {
  auto it = map_.find(key);
  // A reservation that expired (and maybe was reused) is not ours any more.
  if (it == map_.end() || it->second.generation != generation || it->second.state != State::writing) return;
  Entry& e = it->second;
  e.state = State::present;
  e.write_locked = false;
  --write_locks_;
  write_queue_.erase(e.write);
  e.in_write = false;
  ++stats_.stores_committed;
  auto& usage = namespaces_[key.ns];
  ++usage.chunks;
  usage.bytes += slot_bytes(e);
  update_lru(*it);
}

void KvStore::abort(const ChunkKey& key, std::uint64_t generation) {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.generation != generation || it->second.state != State::writing) return;
  ++stats_.stores_aborted;
  drop(&*it);
}

bool KvStore::reserved(const ChunkKey& key, std::uint64_t generation) const {
  auto it = map_.find(key);
  return it != map_.end() && it->second.generation == generation && it->second.state == State::writing;
}

void KvStore::evict(Node* n) {
  if (on_evict_ && n->second.state == State::present)
    on_evict_(n->first, {pool_.data(n->second.slot), slot_bytes(n->second)});
  drop(n);
}

const KvStore::Entry* KvStore::find(const ChunkKey& key) const {
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::present) return nullptr;
  return &it->second;
}

void KvStore::touch(const ChunkKey& key) {
  auto it = map_.find(key);
  if (it == map_.end() || !it->second.in_lru) return;
  Queue& q = lru_[it->second.cls];
  q.splice(q.end(), q, it->second.lru);
}

std::optional<Slot> KvStore::make_room(LayoutClass cls) {
  if (take_slab_for(cls)) return pool_.allocate(cls);
  Queue& q = lru(cls);
  if (q.empty()) return std::nullopt;
  evict(q.front());
  ++stats_.evictions;
  return pool_.allocate(cls);
}

bool KvStore::take_slab_for(LayoutClass cls) {
  // A class below its share of the slabs (the slabs split evenly between the
  // classes holding any) takes one from the class holding the most, if that
  // one is over its share. Otherwise a class lives within its own slabs.
  const std::uint32_t mine = pool_.class_slabs(cls);
  const std::uint32_t classes = pool_.active_classes() + (mine == 0 ? 1 : 0);
  const std::uint32_t share = pool_.num_slabs() / classes;
  if (mine >= share) return false;
  std::optional<LayoutClass> donor;
  for (LayoutClass c = 0; c < pool_.num_classes(); ++c)
    if (c != cls && (!donor || pool_.class_slabs(c) > pool_.class_slabs(*donor))) donor = c;
  if (!donor || pool_.class_slabs(*donor) <= share) return false;
  // One of its slabs whose chunks are all evictable: emptied, it returns
  // to the free slabs. A few of the donor's slabs are tried per call, from
  // where the last call stopped, so a donor whose slabs all hold a locked
  // chunk costs a bounded scan, not one of all L1.
  const std::uint32_t slabs = pool_.num_slabs();
  std::uint32_t tried = 0;
  for (std::uint32_t step = 0; step < slabs && tried < slabs_tried_per_reserve; ++step) {
    const std::uint32_t slab = next_donor_slab_;
    next_donor_slab_ = (next_donor_slab_ + 1) % slabs;
    if (!pool_.slab_in_use(slab) || pool_.slab_class(slab) != *donor) continue;
    ++tried;
    scratch_.clear();
    bool movable = true;
    for (std::uint32_t i = 0; i < pool_.slab_carved(slab) && movable; ++i) {
      Node* n = at_slot(pool_.slab_slot(slab, i));
      if (!n) continue;
      if (evictable(n->second)) scratch_.push_back(n);
      else movable = false;
    }
    if (!movable) continue;
    for (Node* n : scratch_) evict(n);
    stats_.evictions += scratch_.size();
    ++stats_.slabs_moved;
    return true;
  }
  return false;
}

void KvStore::drop(Node* n) {
  Entry& e = n->second;
  if (e.in_lru) lru_[e.cls].erase(e.lru);
  if (e.in_read) {
    read_queue_.erase(e.read);
    --pinned_entries_;
    pinned_bytes_ -= slot_bytes(e);
  }
  if (e.in_write) write_queue_.erase(e.write);
  if (auto o = owners_.find(e.owner); o != owners_.end()) {
    o->second.erase(e.owned);
    if (o->second.empty()) owners_.erase(o);
  }
  read_locks_ -= e.read_locks;
  if (e.write_locked) --write_locks_;
  if (e.state == State::present) {
    auto usage = namespaces_.find(n->first.ns);
    usage->second.bytes -= slot_bytes(e);
    if (--usage->second.chunks == 0) namespaces_.erase(usage);
  }
  at_slot(e.slot) = nullptr;
  pool_.free(e.slot);
  const ChunkKey key = n->first;
  map_.erase(key);
}

std::size_t KvStore::clear(std::size_t limit) {
  std::size_t n = 0;
  for (Queue& q : lru_) {
    while (!q.empty() && n < limit) {
      drop(q.front());
      ++n;
    }
  }
  return n;
}

std::size_t KvStore::evict_to(LayoutClass cls, std::uint64_t target) {
  std::size_t n = 0;
  Queue& q = lru(cls);
  while (pool_.class_used(cls) > target && !q.empty()) {
    evict(q.front());
    ++n;
  }
  stats_.evictions += n;
  return n;
}

void KvStore::tick(TimePoint now) {
  while (!read_queue_.empty() && read_queue_.front()->second.read_expiry <= now) {
    Node& n = *read_queue_.front();
    Entry& e = n.second;
    stats_.expired_read_locks += e.read_locks;
    read_locks_ -= e.read_locks;
    e.read_locks = 0;
    e.holders.clear();
    after_unlock(n);
  }
  // A copy that never completed: drop the reservation (a late commit is
  // ignored by generation).
  while (!write_queue_.empty() && write_queue_.front()->second.write_expiry <= now) {
    ++stats_.expired_write_locks;
    drop(write_queue_.front());
  }
  // While a slab is free, every class can grow: nothing to make room for.
  if (!pool_.mapped() || pool_.free_slabs() > 0) return;
  for (LayoutClass cls = 0; cls < pool_.num_classes(); ++cls) {
    const auto slots = static_cast<double>(pool_.class_slots(cls));
    if (static_cast<double>(pool_.class_used(cls)) > config_.high_watermark * slots)
      evict_to(cls, static_cast<std::uint64_t>(config_.low_watermark * slots));
  }
}

}  // namespace kvlink::store
