// The disk tier's index and its journal (store/disk_index.hpp,
// store/disk_journal.hpp): slots, states, pins, LRU, the in-flight bound,
// and recovery from torn and corrupted journals. Pure: no files.
#include <doctest/doctest.h>

#include <algorithm>

#include "kvlink/store/disk_index.hpp"

using namespace kvlink;
using namespace kvlink::store;

namespace {

constexpr std::uint64_t kChunk = 6000;  // not a multiple of 4096: the stride is 8192
constexpr std::uint64_t kStride = 8192;

ChunkKey key(std::uint64_t i, std::uint32_t rank = 0) { return ChunkKey{42, ChunkHash{i * 7919 + 1, i}, rank}; }

DiskIndexConfig config(std::uint64_t capacity = 1 << 20) {
  DiskIndexConfig c;
  c.capacity_bytes = capacity;
  c.max_write_bytes_in_flight = 1 << 20;
  return c;
}

// Writes and commits `k` in `cls`; returns its slot.
std::uint32_t put(DiskIndex& idx, const ChunkKey& k, DiskClass cls = 0) {
  auto g = idx.begin_write(k, cls, k.hash.lo ^ 0xabc);
  REQUIRE(g);
  REQUIRE_FALSE(idx.commit_write(k));
  return g->where.slot;
}

std::vector<std::byte> flip(std::vector<std::byte> bytes, std::size_t at) {
  bytes[at] ^= std::byte{0x10};
  return bytes;
}

// The key that a full class evicts next: write one more and see.
ChunkKey next_victim(DiskIndex idx, DiskClass cls = 0) {
  auto g = idx.begin_write(key(999999), cls, 1);
  REQUIRE(g);
  REQUIRE(g->evicted);
  return *g->evicted;
}

}  // namespace

TEST_CASE("disk journal: records round-trip and any flipped byte is caught") {
  JournalRecord r;
  r.type = JournalRecord::Type::commit;
  r.cls = 3;
  r.slot = 17;
  r.key = key(5, 2);
  r.checksum = 0x1234567890abcdefull;
  const JournalBytes b = encode(r);
  auto d = decode(b);
  REQUIRE(d);
  CHECK(d->type == r.type);
  CHECK(d->cls == 3);
  CHECK(d->slot == 17);
  CHECK(d->key == r.key);
  CHECK(d->checksum == r.checksum);

  for (std::size_t i = 0; i < journal_record_bytes; ++i) {
    JournalBytes bad = b;
    bad[i] ^= std::byte{0x01};
    CHECK_MESSAGE(!decode(bad), "flipped byte " << i << " went unnoticed");
  }

  JournalRecord c;
  c.type = JournalRecord::Type::layout_class;
  c.cls = 1;
  c.slot_bytes = kChunk;
  c.slots = 100;
  auto dc = decode(encode(c));
  REQUIRE(dc);
  CHECK(dc->slot_bytes == kChunk);
  CHECK(dc->slots == 100);
}

TEST_CASE("disk journal: the chunk checksum depends on the bytes and the key") {
  std::vector<std::byte> bytes(kChunk, std::byte{7});
  const auto a = chunk_checksum(key(1), bytes);
  CHECK(a == chunk_checksum(key(1), bytes));
  CHECK(a != chunk_checksum(key(2), bytes));
  CHECK(a != chunk_checksum(key(1, 1), bytes));
  bytes[100] = std::byte{8};
  CHECK(a != chunk_checksum(key(1), bytes));
  CHECK(disk_slot_stride(4096) == 4096);
  CHECK(disk_slot_stride(4097) == 8192);
  CHECK(disk_slot_stride(kChunk) == kStride);
}

TEST_CASE("disk index: classes share the capacity, one per chunk size") {
  DiskIndex idx(config(10 * kStride));
  auto a = idx.add_class(kChunk, 6);
  REQUIRE(a);
  CHECK(*a == 0);
  CHECK(idx.unassigned_bytes() == 4 * kStride);
  auto dup = idx.add_class(kChunk, 1);
  CHECK(dup.error() == errc::bad_request);
  auto big = idx.add_class(4096, 9);  // 9 x 4096 > 4 x 8192
  CHECK(big.error() == errc::bad_request);
  CHECK(big.error().message().find("--l2-disk-size") != std::string::npos);
  auto b = idx.add_class(4096, 8);
  REQUIRE(b);
  CHECK(*b == 1);
  CHECK(idx.unassigned_bytes() == 0);
  CHECK(idx.find_class(4096) == DiskClass{1});
  CHECK_FALSE(idx.find_class(12345));
  CHECK(idx.add_class(0, 1).error() == errc::bad_request);
}

TEST_CASE("disk index: a chunk is never readable while its write is in flight") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  auto g = idx.begin_write(key(1), 0, 77);
  REQUIRE(g);
  CHECK(g->where.slot == 0);
  CHECK(g->where.offset == 0);
  CHECK(g->where.bytes == kChunk);
  CHECK(g->where.checksum == 77);
  CHECK(idx.state(key(1)) == DiskIndex::State::writing);
  CHECK(idx.pin_read(key(1)).error() == errc::not_found);
  CHECK(idx.begin_write(key(1), 0, 77).error() == errc::bad_request);  // no second write of it
  CHECK(idx.remove(key(1)) == errc::bad_request);           // its writer ends it

  auto g2 = idx.begin_write(key(2), 0, 78);
  REQUIRE(g2);
  CHECK(g2->where.offset == kStride);
  CHECK(idx.write_bytes_in_flight() == 2 * kStride);

  REQUIRE_FALSE(idx.commit_write(key(1)));
  auto pin = idx.pin_read(key(1));
  REQUIRE(pin);
  CHECK(pin->where.slot == 0);
  CHECK(pin->where.checksum == 77);
  idx.unpin(*pin);

  REQUIRE_FALSE(idx.abort_write(key(2)));  // the write failed: its slot is free again
  CHECK_FALSE(idx.contains(key(2)));
  CHECK(idx.write_bytes_in_flight() == 0);
  CHECK(idx.commit_write(key(2)) == errc::not_found);
  auto g3 = idx.begin_write(key(3), 0, 79);
  REQUIRE(g3);
  CHECK(g3->where.slot == 1);
  CHECK(idx.stats().writes_begun == 3);
  CHECK(idx.stats().writes_committed == 1);
  CHECK(idx.stats().writes_aborted == 1);
}

TEST_CASE("disk index: a full class evicts its least recently used chunk, never one written or read") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 3));
  REQUIRE(idx.add_class(4096, 2));
  put(idx, key(1));
  put(idx, key(2));
  put(idx, key(3));
  put(idx, key(10), 1);
  idx.touch(key(1));  // order now 2, 3, 1

  auto g = idx.begin_write(key(4), 0, 1);
  REQUIRE(g);
  REQUIRE(g->evicted);
  CHECK(*g->evicted == key(2));
  CHECK(g->where.slot == 1);  // key 2's slot
  CHECK_FALSE(idx.contains(key(2)));
  CHECK(idx.contains(key(10)));  // other classes are not touched

  // key 3 is pinned by a read, key 4 is being written: key 1 goes.
  auto pin = idx.pin_read(key(3));
  REQUIRE(pin);
  auto g5 = idx.begin_write(key(5), 0, 1);
  REQUIRE(g5);
  CHECK(*g5->evicted == key(1));
  // Now every slot is written or read: no room.
  auto g6 = idx.begin_write(key(6), 0, 1);
  CHECK(g6.error() == errc::limit_exceeded);
  CHECK(idx.stats().refused_no_room == 1);
  CHECK(idx.state(key(3)) == DiskIndex::State::present);

  idx.unpin(*pin);  // key 3 evictable again
  auto g7 = idx.begin_write(key(7), 0, 1);
  REQUIRE(g7);
  CHECK(*g7->evicted == key(3));
  CHECK(idx.stats().evictions == 3);
}

TEST_CASE("disk index: a chunk removed while read keeps its slot until the last unpin") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 2));
  put(idx, key(1));
  put(idx, key(2));
  auto p1 = idx.pin_read(key(1));
  auto p2 = idx.pin_read(key(1));
  REQUIRE(p1);
  REQUIRE(p2);
  CHECK(idx.pinned() == 1);
  REQUIRE_FALSE(idx.drop_corrupt(key(1)));
  CHECK(idx.stats().corrupt_dropped == 1);
  CHECK_FALSE(idx.contains(key(1)));
  CHECK(idx.pin_read(key(1)).error() == errc::not_found);
  CHECK(idx.pinned() == 0);

  // The only reusable slot is key 2's (evicted); slot 0 is still being read.
  auto g = idx.begin_write(key(3), 0, 1);
  REQUIRE(g);
  CHECK(g->where.slot == 1);
  REQUIRE_FALSE(idx.commit_write(key(3)));
  idx.unpin(*p1);
  CHECK(idx.used_slots(0) == 2);  // one pin left
  idx.unpin(*p2);
  CHECK(idx.used_slots(0) == 1);
  auto g4 = idx.begin_write(key(4), 0, 1);
  REQUIRE(g4);
  CHECK(g4->where.slot == 0);
  CHECK_FALSE(g4->evicted);
}

TEST_CASE("disk index: in-flight write bytes are bounded") {
  DiskIndexConfig c = config();
  c.max_write_bytes_in_flight = 2 * kStride;
  DiskIndex idx(c);
  REQUIRE(idx.add_class(kChunk, 8));
  REQUIRE(idx.begin_write(key(1), 0, 1));
  REQUIRE(idx.begin_write(key(2), 0, 1));
  auto refused = idx.begin_write(key(3), 0, 1);
  CHECK(refused.error() == errc::limit_exceeded);
  CHECK_FALSE(idx.contains(key(3)));
  CHECK(idx.stats().refused_in_flight == 1);
  REQUIRE_FALSE(idx.commit_write(key(1)));
  CHECK(idx.begin_write(key(3), 0, 1));

  // One write larger than the bound still goes, alone.
  DiskIndexConfig small = config();
  small.max_write_bytes_in_flight = 4096;
  DiskIndex one(small);
  REQUIRE(one.add_class(kChunk, 2));
  CHECK(one.begin_write(key(1), 0, 1));
  CHECK(one.begin_write(key(2), 0, 1).error() == errc::limit_exceeded);
}

TEST_CASE("disk index: recovery rebuilds the entries, their slots and their LRU order") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  REQUIRE(idx.add_class(4096, 4));
  for (std::uint64_t i = 1; i <= 4; ++i) put(idx, key(i));
  put(idx, key(20), 1);
  REQUIRE_FALSE(idx.remove(key(2)));
  put(idx, key(5));  // takes key 2's freed slot
  REQUIRE(idx.begin_write(key(6), 1, 1));  // in flight at the "crash"
  std::vector<std::byte> journal = idx.take_journal();
  CHECK(idx.take_journal().empty());
  CHECK(journal.size() % journal_record_bytes == 0);

  auto rec = DiskIndex::recover(config(), journal);
  REQUIRE(rec);
  DiskIndex& r = rec->index;
  CHECK(rec->stats.corrupt_records == 0);
  CHECK(rec->stats.torn_bytes == 0);
  CHECK(rec->stats.incomplete_writes == 1);  // key 6
  CHECK(rec->stats.entries == 5);
  CHECK(r.classes() == 2);
  CHECK(r.slot_bytes(0) == kChunk);
  CHECK(r.slots(1) == 4);
  CHECK_FALSE(r.contains(key(2)));
  CHECK_FALSE(r.contains(key(6)));
  for (std::uint64_t i : {1, 3, 4, 5}) {
    auto a = idx.pin_read(key(i));
    auto b = r.pin_read(key(i));
    REQUIRE(a);
    REQUIRE(b);
    CHECK(a->where.slot == b->where.slot);
    CHECK(a->where.checksum == b->where.checksum);
    idx.unpin(*a);
    r.unpin(*b);
  }
  CHECK(r.used_slots(1) == 1);  // key 6's slot is free again
  // Commit order is the LRU order: key 1 is the least recent.
  CHECK(next_victim(std::move(rec->index)) == key(1));
}

TEST_CASE("disk index: a put without its commit drops the slot's old chunk too") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 1));
  put(idx, key(1));
  auto g = idx.begin_write(key(2), 0, 1);  // evicts key 1: its bytes are being overwritten
  REQUIRE(g);
  CHECK(*g->evicted == key(1));
  auto rec = DiskIndex::recover(config(), idx.take_journal());
  REQUIRE(rec);
  CHECK(rec->index.entries() == 0);
  CHECK(rec->stats.incomplete_writes == 1);
  CHECK(rec->index.used_slots(0) == 0);
}

TEST_CASE("disk index: recovery drops a torn tail and skips records with flipped bytes") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 8));
  for (std::uint64_t i = 1; i <= 3; ++i) put(idx, key(i));
  const std::vector<std::byte> journal = idx.take_journal();
  // Records: class, put 1, commit 1, put 2, commit 2, put 3, commit 3.
  REQUIRE(journal.size() == 7 * journal_record_bytes);

  SUBCASE("torn in the middle of the last record") {
    std::vector<std::byte> torn(journal.begin(), journal.end() - 20);
    auto rec = DiskIndex::recover(config(), torn);
    REQUIRE(rec);
    CHECK(rec->stats.torn_bytes == journal_record_bytes - 20);
    CHECK(rec->stats.incomplete_writes == 1);  // key 3 never committed
    CHECK(rec->index.contains(key(2)));
    CHECK_FALSE(rec->index.contains(key(3)));
  }
  SUBCASE("a flipped put: its commit alone restores the chunk") {
    auto rec = DiskIndex::recover(config(), flip(journal, 3 * journal_record_bytes + 30));
    REQUIRE(rec);
    CHECK(rec->stats.corrupt_records == 1);
    CHECK(rec->stats.entries == 3);
  }
  SUBCASE("a flipped commit: that chunk is dropped, the others stay") {
    auto rec = DiskIndex::recover(config(), flip(journal, 4 * journal_record_bytes + 50));
    REQUIRE(rec);
    CHECK(rec->stats.corrupt_records == 1);
    CHECK(rec->stats.incomplete_writes == 1);
    CHECK(rec->index.contains(key(1)));
    CHECK_FALSE(rec->index.contains(key(2)));
    CHECK(rec->index.contains(key(3)));
  }
  SUBCASE("a flipped class record: nothing of the class can be trusted") {
    auto rec = DiskIndex::recover(config(), flip(journal, 10));
    REQUIRE(rec);
    CHECK(rec->stats.corrupt_records == 1);
    CHECK(rec->stats.invalid_records == 6);
    CHECK(rec->index.entries() == 0);
  }
  SUBCASE("every prefix recovers only committed chunks") {
    for (std::size_t n = 0; n <= journal.size(); ++n) {
      auto rec = DiskIndex::recover(config(), std::span(journal).first(n));
      REQUIRE(rec);
      const std::size_t whole = n / journal_record_bytes;  // records kept
      const std::size_t committed = whole >= 7 ? 3 : whole >= 5 ? 2 : whole >= 3 ? 1 : 0;
      CHECK(rec->index.entries() == committed);
      CHECK(rec->stats.torn_bytes == n % journal_record_bytes);
    }
  }
}

TEST_CASE("disk index: records naming unknown classes or slots are counted, not applied") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 2));
  put(idx, key(1));
  std::vector<std::byte> journal = idx.take_journal();
  JournalRecord bad;
  bad.type = JournalRecord::Type::commit;
  bad.key = key(9);
  bad.cls = 0;
  bad.slot = 2;  // past the class's 2 slots
  append(journal, bad);
  bad.cls = 5;
  bad.slot = 0;
  append(journal, bad);
  JournalRecord conflict;  // class 0 again, another size
  conflict.type = JournalRecord::Type::layout_class;
  conflict.cls = 0;
  conflict.slot_bytes = 4096;
  conflict.slots = 2;
  append(journal, conflict);
  auto rec = DiskIndex::recover(config(), journal);
  REQUIRE(rec);
  CHECK(rec->stats.invalid_records == 3);
  CHECK(rec->index.entries() == 1);
  CHECK(rec->index.slot_bytes(0) == kChunk);
}

TEST_CASE("disk index: recovery refuses classes larger than the configured size") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 64));
  auto rec = DiskIndex::recover(config(32 * kStride), idx.take_journal());
  CHECK(rec.error() == errc::bad_request);
  CHECK(rec.error().message().find("--l2-disk-size") != std::string::npos);
}

TEST_CASE("disk index: compaction writes the live entries only, and later records follow it") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 3));
  for (std::uint64_t i = 1; i <= 10; ++i) put(idx, key(i));  // 7 evictions
  REQUIRE_FALSE(idx.remove(key(9)));
  auto pin = idx.pin_read(key(8));
  REQUIRE(pin);
  REQUIRE(idx.begin_write(key(11), 0, 1));
  (void)idx.take_journal();
  std::vector<std::byte> journal = idx.compact();
  CHECK(idx.take_journal().empty());
  CHECK(journal.size() == 3 * journal_record_bytes);  // class, key 10, key 8 (pinned: most recent)
  REQUIRE_FALSE(idx.commit_write(key(11)));             // after the compaction
  auto after = idx.take_journal();
  journal.insert(journal.end(), after.begin(), after.end());

  auto rec = DiskIndex::recover(config(), journal);
  REQUIRE(rec);
  CHECK(rec->stats.entries == 3);
  CHECK(rec->index.contains(key(8)));
  CHECK(rec->index.contains(key(10)));
  CHECK(rec->index.contains(key(11)));
  CHECK_FALSE(rec->index.contains(key(9)));
  CHECK(next_victim(std::move(rec->index)) == key(10));
}

TEST_CASE("disk index: slots past a truncated data file are dropped") {
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  for (std::uint64_t i = 1; i <= 4; ++i) put(idx, key(i));
  CHECK(idx.drop_slots_from(0, 2) == 2);
  CHECK(idx.stats().truncated_dropped == 2);
  CHECK(idx.contains(key(1)));
  CHECK(idx.contains(key(2)));
  CHECK_FALSE(idx.contains(key(3)));
  CHECK_FALSE(idx.contains(key(4)));
  auto rec = DiskIndex::recover(config(), idx.take_journal());
  REQUIRE(rec);
  CHECK(rec->index.entries() == 2);
}
