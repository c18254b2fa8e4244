// The disk tier's journal record format (docs/tiers.md#journal): what makes
// its index survive a restart. Pure functions over bytes; no files.
//
// The journal is append-only and made of fixed-size 64-byte records, so a
// reader always knows where the next record starts: a torn tail is whatever
// is left over a multiple of 64, and a record with flipped bytes fails its
// own checksum and is skipped without losing the ones after it.
//
// Layout of one record (little-endian):
//   0  u32 magic "KVJ1"     4  u8 type, 3 zero bytes   8  u32 class
//  12  u32 rank            16  u64 slot (class record: slot bytes)
//  24  u64 namespace (class record: slot count)
//  32  u64 hash lo         40  u64 hash hi
//  48  u64 chunk checksum  56  u64 XXH3-64 of bytes 0..55
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kvlink/store/keys.hpp"

namespace kvlink::store {

// A layout class of the tier: all chunks of one size in bytes, in one data
// file of fixed-size slots.
using DiskClass = std::uint32_t;

// O_DIRECT works in whole blocks: slots start and end on 4 KiB.
inline constexpr std::uint64_t disk_block_bytes = 4096;
// Chunks larger than this are refused (no chunk is near it; it keeps slot
// arithmetic far from overflow).
inline constexpr std::uint64_t max_disk_slot_bytes = std::uint64_t{1} << 40;
inline std::uint64_t disk_slot_stride(std::uint64_t slot_bytes) {
  return (slot_bytes + disk_block_bytes - 1) / disk_block_bytes * disk_block_bytes;
}

// The checksum of a chunk's bytes as stored on the tier: XXH3-64 seeded
// with the key, so bytes that are intact but belong to another key (a slot
// reused while its journal records were lost) fail it too.
std::uint64_t chunk_checksum(const ChunkKey& key, std::span<const std::byte> bytes);

inline constexpr std::size_t journal_record_bytes = 64;

struct JournalRecord {
  enum class Type : std::uint8_t {
    layout_class = 1,  // class `cls` has `slots` slots of `slot_bytes`
    put = 2,           // a write of `key` into (cls, slot) begins: the slot's old content is gone
    commit = 3,        // `key` is complete in (cls, slot) with `checksum`
    remove = 4,        // `key` left (cls, slot)
  };
  Type type = Type::put;
  DiskClass cls = 0;
  std::uint64_t slot = 0;
  ChunkKey key;
  std::uint64_t checksum = 0;
  // layout_class records only.
  std::uint64_t slot_bytes = 0;
  std::uint64_t slots = 0;
};

using JournalBytes = std::array<std::byte, journal_record_bytes>;

JournalBytes encode(const JournalRecord& r);
void append(std::vector<std::byte>& out, const JournalRecord& r);
// The record, or nullopt when the bytes are not one (bad magic, unknown
// type, non-zero padding, or a record checksum that does not match).
std::optional<JournalRecord> decode(std::span<const std::byte, journal_record_bytes> bytes);

}  // namespace kvlink::store
