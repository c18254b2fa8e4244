// Fuzzes the disk tier's journal recovery. The input is read twice: as raw
// journal bytes, and as a list of well-formed records (5 input bytes each:
// type, class, slot, key, and a byte that may flip a bit or tear the end),
// so the replay rules are reached past the record checksums. Recovery must
// never crash, every slot must hold at most one chunk, and a compaction of
// the result must recover to the same chunks with nothing dropped.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "kvlink/store/disk_index.hpp"

using namespace kvlink;
using namespace kvlink::store;

namespace {

DiskIndexConfig config() {
  DiskIndexConfig c;
  c.capacity_bytes = 64 * 4096;
  return c;
}

void check(std::span<const std::byte> journal) {
  auto rec = DiskIndex::recover(config(), journal);
  if (!rec) return;
  DiskIndex& idx = rec->index;
  std::size_t used = 0;
  for (DiskClass c = 0; c < idx.classes(); ++c) used += idx.used_slots(c);
  if (used != idx.entries() || idx.entries() != rec->stats.entries) std::abort();
  const std::vector<std::byte> compacted = idx.compact();
  auto again = DiskIndex::recover(config(), compacted);
  if (!again || again->index.entries() != idx.entries()) std::abort();
  const RecoveryStats& s = again->stats;
  if (s.corrupt_records + s.invalid_records + s.torn_bytes + s.incomplete_writes != 0) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check(std::span(reinterpret_cast<const std::byte*>(data), size));

  std::vector<std::byte> journal;
  for (std::size_t i = 0; i + 5 <= size; i += 5) {
    const std::uint8_t* p = data + i;
    JournalRecord r;
    r.type = static_cast<JournalRecord::Type>(1 + p[0] % 4);
    r.cls = p[1] % 3;
    r.slot = p[2] % 12;
    r.key = ChunkKey{1, ChunkHash{p[3] % 16u, 0}, 0};
    r.checksum = p[3];
    r.slot_bytes = 4096u * (1 + p[2] % 3);
    r.slots = 1 + p[3] % 10;
    append(journal, r);
    if (p[4] >= 250) journal[journal.size() - 1 - p[4] % 64] ^= std::byte{0x40};  // flipped bytes
  }
  if (size > 0 && data[size - 1] % 7 == 0 && !journal.empty()) journal.resize(journal.size() - 1 - data[0] % 63);
  check(journal);
  return 0;
}
