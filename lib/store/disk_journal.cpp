#include "kvlink/store/disk_journal.hpp"

#include <xxhash.h>

#include <cstring>

#include "kvlink/store/little_endian.hpp"

namespace kvlink::store {

namespace {

constexpr std::uint32_t journal_magic = 0x314a564b;  // "KVJ1" in little-endian

using le::get_u32;
using le::get_u64;
using le::put_u32;
using le::put_u64;

}  // namespace

std::uint64_t chunk_checksum(const ChunkKey& key, std::span<const std::byte> bytes) {
  const std::uint64_t seed = key.hash.lo ^ (key.hash.hi * 0x9E3779B97F4A7C15ull) ^ (key.ns * 0xC2B2AE3D27D4EB4Full) ^
                             (std::uint64_t{key.rank} << 32);
  return XXH3_64bits_withSeed(bytes.data(), bytes.size(), seed);
}

JournalBytes encode(const JournalRecord& r) {
  JournalBytes b{};
  std::byte* p = b.data();
  put_u32(p + 0, journal_magic);
  p[4] = static_cast<std::byte>(r.type);
  put_u32(p + 8, r.cls);
  if (r.type == JournalRecord::Type::layout_class) {
    put_u64(p + 16, r.slot_bytes);
    put_u64(p + 24, r.slots);
  } else {
    put_u32(p + 12, r.key.rank);
    put_u64(p + 16, r.slot);
    put_u64(p + 24, r.key.ns);
    put_u64(p + 32, r.key.hash.lo);
    put_u64(p + 40, r.key.hash.hi);
    put_u64(p + 48, r.checksum);
  }
  put_u64(p + 56, XXH3_64bits(p, 56));
  return b;
}

void append(std::vector<std::byte>& out, const JournalRecord& r) {
  const JournalBytes b = encode(r);
  out.insert(out.end(), b.begin(), b.end());
}

std::optional<JournalRecord> decode(std::span<const std::byte, journal_record_bytes> bytes) {
  const std::byte* p = bytes.data();
  if (get_u32(p) != journal_magic) return std::nullopt;
  if (get_u64(p + 56) != XXH3_64bits(p, 56)) return std::nullopt;
  if (p[5] != std::byte{0} || p[6] != std::byte{0} || p[7] != std::byte{0}) return std::nullopt;
  const auto type = std::to_integer<std::uint8_t>(p[4]);
  if (type < 1 || type > 4) return std::nullopt;
  JournalRecord r;
  r.type = static_cast<JournalRecord::Type>(type);
  r.cls = get_u32(p + 8);
  if (r.type == JournalRecord::Type::layout_class) {
    r.slot_bytes = get_u64(p + 16);
    r.slots = get_u64(p + 24);
  } else {
    r.key.rank = get_u32(p + 12);
    r.slot = get_u64(p + 16);
    r.key.ns = get_u64(p + 24);
    r.key.hash.lo = get_u64(p + 32);
    r.key.hash.hi = get_u64(p + 40);
    r.checksum = get_u64(p + 48);
  }
  return r;
}

}  // namespace kvlink::store
