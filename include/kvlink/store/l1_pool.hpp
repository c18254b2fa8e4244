// L1: one large memory region carved into fixed-size chunk slots. A slot
// holds one chunk of one KV rank. Allocation and release are O(1) (a free
// list of slot indices); there is no fragmentation.
//
// The server maps the region at startup (map()), so a size it cannot serve
// fails before it says ready; it is carved into slots once the slot size is
// known (from the first KV-cache registration). Huge pages when the system
// has them.
// CUDA pinning (cudaHostRegister of the region) belongs to the CUDA
// transfer engine (issue 6): it hooks in through region()/region_bytes().
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kvlink::store {

// Parses a size such as "512MiB", "8GiB", "1.5G", "4096" or "64k" (k/M/G/T
// and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal). Returns "" and sets
// `bytes`, or a message naming what is wrong.
std::string parse_size(std::string_view text, std::uint64_t& bytes);

class L1Pool {
 public:
  explicit L1Pool(std::uint64_t capacity_bytes, bool try_huge_pages = true);
  ~L1Pool();
  L1Pool(const L1Pool&) = delete;
  L1Pool& operator=(const L1Pool&) = delete;

  // Maps the whole region; `lock` also pins it in RAM (mlock), so it can
  // never be paged out. Returns "" or why not, naming --l1-size (0, more
  // than this machine's memory, refused by the kernel) or the lock limit.
  std::string map(bool lock = false);
  bool mapped() const { return base_ != nullptr; }

  // Sets the slot size (mapping the region first if map() was not called),
  // or checks that a later caller agrees. Returns "" or why not (size
  // mismatch, too small, mapping failed).
  std::string configure(std::uint64_t slot_bytes);
  bool configured() const { return slot_bytes_ != 0; }

  std::optional<std::uint32_t> allocate();
  void free(std::uint32_t slot);
  std::byte* data(std::uint32_t slot) const { return base_ + std::uint64_t{slot} * slot_bytes_; }

  std::uint64_t capacity_bytes() const { return capacity_; }
  std::uint64_t slot_bytes() const { return slot_bytes_; }
  std::uint32_t num_slots() const { return num_slots_; }
  std::uint32_t used_slots() const { return num_slots_ - static_cast<std::uint32_t>(free_.size()); }
  std::uint32_t free_slots() const { return static_cast<std::uint32_t>(free_.size()); }
  bool huge_pages() const { return huge_; }
  std::byte* region() const { return base_; }
  std::uint64_t region_bytes() const { return mapped_; }

 private:
  std::uint64_t capacity_;
  bool try_huge_;
  bool huge_ = false;
  std::byte* base_ = nullptr;
  std::uint64_t mapped_ = 0;
  std::uint64_t slot_bytes_ = 0;
  std::uint32_t num_slots_ = 0;
  std::vector<std::uint32_t> free_;  // stack of free slot indices
};

}  // namespace kvlink::store
