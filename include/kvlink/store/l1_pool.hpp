// L1: one large memory region for KV chunks, shared by every KV layout the
// server serves.
//
// The region is cut into equal slabs. A slab belongs to one layout class
// (one chunk size in bytes) while it holds chunks, and is carved into that
// class's slots; an empty slab goes back to the free slabs at once, for any
// class. Allocation and release are O(1) (per-slab free lists, a list of a
// class's slabs with room); a slab wastes at most its tail (slab size mod
// chunk size), which STATS reports.
//
// The server maps the region at startup (map()), so a size it cannot serve
// fails before it says ready. Huge pages when the system has them.
// CUDA pinning (cudaHostRegister of the region) belongs to the CUDA
// transfer engine: it hooks in through region()/region_bytes().
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvlink/error.hpp"

namespace kvlink::store {

// Parses a size such as "512MiB", "8GiB", "1.5G", "4096" or "64k" (k/M/G/T
// and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal), or says what is
// wrong with it (bad_request).
Result<std::uint64_t> parse_size(std::string_view text);

// A chunk slot: its byte offset in the region.
using Slot = std::uint64_t;
// A layout class: chunks of one size. An id stays valid while its class
// holds slabs; an idle one may be given to another size once there are
// more records than slabs, so resolve it with class_for() before use.
using LayoutClass = std::uint32_t;

// The slab size for an L1 of `capacity_bytes` when none is given: an eighth
// of L1 (so several layouts can share it), at most 1 GiB, in whole 2 MiB
// huge pages when L1 is large enough.
std::uint64_t default_slab_bytes(std::uint64_t capacity_bytes);

class L1Pool {
 public:
  // `slab_bytes` 0 picks default_slab_bytes(capacity_bytes).
  explicit L1Pool(std::uint64_t capacity_bytes, bool try_huge_pages = true, std::uint64_t slab_bytes = 0);
  ~L1Pool();
  L1Pool(const L1Pool&) = delete;
  L1Pool& operator=(const L1Pool&) = delete;

  // Maps the whole region; `lock` also pins it in RAM (mlock), so it can
  // never be paged out. On failure says why, naming --l1-size (0, more
  // than this machine's memory, refused by the kernel) or the lock limit.
  Error map(bool lock = false);
  bool mapped() const { return base_ != nullptr; }

  // Whether chunks of `slot_bytes` can be stored, or why not (naming
  // --l1-slab-size and --l1-size).
  Error check_layout(std::uint64_t slot_bytes) const;
  // The class of chunks of `slot_bytes` (made if none holds slabs), mapping
  // the region first if map() was not called; or why there is none.
  Error class_for(std::uint64_t slot_bytes, LayoutClass& cls);

  // A free slot of `cls`: in one of its slabs with room, else in a free
  // slab. nullopt when neither is left (evict, or reclaim a slab).
  std::optional<Slot> allocate(LayoutClass cls);
  void free(Slot slot);
  std::byte* data(Slot slot) const { return base_ + slot; }

  LayoutClass class_of(Slot slot) const { return slabs_[slab_of(slot)].cls; }
  std::uint64_t slot_bytes(LayoutClass cls) const { return classes_[cls].slot_bytes; }
  std::uint32_t slots_per_slab(LayoutClass cls) const { return classes_[cls].slots_per_slab; }
  // Slots `cls` has in its slabs, and how many of them are in use.
  std::uint64_t class_slots(LayoutClass cls) const {
    return std::uint64_t{classes_[cls].slabs} * classes_[cls].slots_per_slab;
  }
  std::uint64_t class_used(LayoutClass cls) const { return classes_[cls].used; }
  std::uint32_t class_slabs(LayoutClass cls) const { return classes_[cls].slabs; }
  // Class records ever made (ids 0..num_classes()-1; those without slabs
  // are idle and may be reused for another size).
  std::uint32_t num_classes() const { return static_cast<std::uint32_t>(classes_.size()); }
  // Classes holding at least one slab.
  std::uint32_t active_classes() const;

  // Slabs: which class holds slab `slab`, and the slots carved in it so far
  // (slot i of the slab is slab_slot(slab, i)).
  std::uint32_t num_slabs() const {
    return slab_bytes_ ? static_cast<std::uint32_t>(std::min<std::uint64_t>(capacity_ / slab_bytes_, UINT32_MAX)) : 0;
  }
  std::uint32_t free_slabs() const { return static_cast<std::uint32_t>(free_slabs_.size()); }
  bool slab_in_use(std::uint32_t slab) const { return slabs_[slab].used > 0; }
  LayoutClass slab_class(std::uint32_t slab) const { return slabs_[slab].cls; }
  std::uint32_t slab_carved(std::uint32_t slab) const { return slabs_[slab].carved; }
  std::uint32_t slab_of(Slot slot) const { return static_cast<std::uint32_t>(slot / slab_bytes_); }
  std::uint32_t index_in_slab(Slot slot) const {
    return static_cast<std::uint32_t>((slot % slab_bytes_) / classes_[class_of(slot)].slot_bytes);
  }
  Slot slab_slot(std::uint32_t slab, std::uint32_t i) const {
    return std::uint64_t{slab} * slab_bytes_ + std::uint64_t{i} * classes_[slabs_[slab].cls].slot_bytes;
  }

  std::uint64_t capacity_bytes() const { return capacity_; }
  std::uint64_t slab_bytes() const { return slab_bytes_; }
  // Bytes of chunks held, and bytes no chunk can use (the tails of slabs in use).
  std::uint64_t bytes_used() const { return bytes_used_; }
  std::uint64_t bytes_wasted() const;
  bool huge_pages() const { return huge_; }
  std::byte* region() const { return base_; }
  std::uint64_t region_bytes() const { return mapped_; }

 private:
  struct Slab {
    LayoutClass cls = 0;
    std::uint32_t used = 0;
    std::uint32_t carved = 0;  // slots 0..carved-1 have been handed out at least once
    std::uint32_t room_at = 0;  // position in its class's `with_room` while it has room
    std::vector<std::uint32_t> freed;  // freed slot indices, reused first
  };
  struct Class {
    std::uint64_t slot_bytes = 0;
    std::uint32_t slots_per_slab = 0;
    std::uint32_t slabs = 0;
    std::uint64_t used = 0;
    std::vector<std::uint32_t> with_room;  // its slabs with a free slot
  };

  void add_room(std::uint32_t slab);
  void remove_room(std::uint32_t slab);

  std::uint64_t capacity_;
  bool try_huge_;
  std::uint64_t slab_bytes_;
  bool huge_ = false;
  std::byte* base_ = nullptr;
  std::uint64_t mapped_ = 0;
  std::uint64_t bytes_used_ = 0;
  std::vector<Slab> slabs_;
  std::vector<std::uint32_t> free_slabs_;  // stack; lowest address on top
  std::vector<Class> classes_;
};

}  // namespace kvlink::store
