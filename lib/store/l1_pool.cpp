#include "kvlink/store/l1_pool.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fmt/format.h>

namespace kvlink::store {

Result<std::uint64_t> parse_size(std::string_view text) {
  auto bad = [text](std::string_view what) {
    return Error(errc::bad_request, fmt::format("size '{}' {}", text, what));
  };
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return bad("does not start with a number; write e.g. 512MiB, 8GiB or 1073741824");
  double value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + i, value);
  if (ec != std::errc{} || ptr != text.data() + i)
    return bad("has a malformed number; write e.g. 512MiB, 8GiB or 1073741824");
  std::string unit(text.substr(i));
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kib") mult = 0x1p10;
  else if (unit == "m" || unit == "mib") mult = 0x1p20;
  else if (unit == "g" || unit == "gib") mult = 0x1p30;
  else if (unit == "t" || unit == "tib") mult = 0x1p40;
  else if (unit == "kb") mult = 1e3;
  else if (unit == "mb") mult = 1e6;
  else if (unit == "gb") mult = 1e9;
  else if (unit == "tb") mult = 1e12;
  else
    return bad(fmt::format("has unknown unit '{}'; use B, KiB, MiB, GiB, TiB (or k, M, G, T), KB, MB, GB, TB",
                           text.substr(i)));
  const double total = std::floor(value * mult);
  if (!(total < 0x1p63)) return bad("is too large");
  return static_cast<std::uint64_t>(total);
}

std::uint64_t default_slab_bytes(std::uint64_t capacity_bytes) {
  constexpr std::uint64_t huge_page = 2u << 20, page = 4096;
  std::uint64_t slab = std::min<std::uint64_t>(capacity_bytes / 8, std::uint64_t{1} << 30);
  slab = slab >= huge_page ? slab / huge_page * huge_page : slab / page * page;
  return slab == 0 ? capacity_bytes : slab;
}

L1Pool::L1Pool(std::uint64_t capacity_bytes, bool try_huge_pages, std::uint64_t slab_bytes)
    : capacity_(capacity_bytes),
      try_huge_(try_huge_pages),
      slab_bytes_(slab_bytes ? slab_bytes : default_slab_bytes(capacity_bytes)) {}

L1Pool::~L1Pool() {
  if (base_) ::munmap(base_, mapped_);
}

Error L1Pool::map(bool lock) {
  if (base_) return {};
  if (capacity_ == 0)
    return Error(errc::bad_request,
                 "--l1-size is 0: L1 needs room for at least one KV chunk; give e.g. --l1-size 8GiB");
  if (slab_bytes_ > capacity_)
    return Error(
        errc::bad_request,
        fmt::format("--l1-slab-size of {} bytes is more than --l1-size ({} bytes); lower --l1-slab-size or leave "
                    "it out",
                    slab_bytes_, capacity_));
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) {
    const auto ram = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page_size);
    if (capacity_ > ram)
      return Error(
          errc::bad_request,
          fmt::format("--l1-size of {:.1f} GiB is more than this machine's memory ({:.1f} GiB); lower --l1-size",
                      static_cast<double>(capacity_) / 0x1p30, static_cast<double>(ram) / 0x1p30));
  }
  std::uint64_t len = capacity_;
  void* p = MAP_FAILED;
  constexpr std::uint64_t huge_page = 2u << 20;
  if (try_huge_ && len >= huge_page) {
    const std::uint64_t huge_len = (len + huge_page - 1) / huge_page * huge_page;
    // The kernel reserves the huge pages now, so a shortage fails here
    // instead of as SIGBUS on first touch.
    p = ::mmap(nullptr, huge_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (p != MAP_FAILED) {
      len = huge_len;
      huge_ = true;
    }
  }
  if (p == MAP_FAILED) {
    // No reserved huge pages: ordinary pages, transparent huge pages if
    // enabled. Accounted (no MAP_NORESERVE): a host that does not overcommit
    // refuses the size now, not with an OOM kill under load.
    p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return Error(errc::bad_request,
                   fmt::format("cannot map the L1 region of {} bytes: {}; lower --l1-size", len, std::strerror(errno)));
    if (try_huge_) ::madvise(p, len, MADV_HUGEPAGE);
  }
  if (lock && ::mlock(p, len) != 0) {
    const int err = errno;
    ::munmap(p, len);
    huge_ = false;
    return Error(
        errc::bad_request,
        fmt::format("cannot lock the L1 region of {} bytes in RAM: {}; raise the locked-memory limit (ulimit -l, "
                    "systemd LimitMEMLOCK=), lower --l1-size, or drop --l1-lock",
                    len, std::strerror(err)));
  }
  base_ = static_cast<std::byte*>(p);
  mapped_ = len;
  slabs_.resize(num_slabs());
  free_slabs_.resize(slabs_.size());
  for (std::size_t i = 0; i < slabs_.size(); ++i) free_slabs_[i] = static_cast<std::uint32_t>(slabs_.size() - 1 - i);
  return {};
}

Error L1Pool::check_layout(std::uint64_t slot_bytes) const {
  if (slot_bytes == 0) return Error(errc::bad_request, "the layout's chunk is 0 bytes");
  if (slot_bytes > capacity_)
    return Error(errc::bad_request,
                 fmt::format("a chunk of this layout is {} bytes, more than all of L1 ({} bytes); raise --l1-size to a "
                             "multiple of it, or use a smaller chunk size",
                             slot_bytes, capacity_));
  if (slot_bytes > slab_bytes_)
    return Error(
        errc::bad_request,
        fmt::format("a chunk of this layout is {} bytes, more than an L1 slab ({} bytes); raise --l1-slab-size "
                    "(and --l1-size) to at least {} bytes, or use a smaller chunk size",
                    slot_bytes, slab_bytes_, slot_bytes));
  return {};
}

Error L1Pool::class_for(std::uint64_t slot_bytes, LayoutClass& cls) {
  if (auto err = check_layout(slot_bytes)) return err;
  if (auto err = map()) return err;
  std::optional<LayoutClass> idle;
  for (LayoutClass c = 0; c < classes_.size(); ++c) {
    if (classes_[c].slot_bytes == slot_bytes) {
      cls = c;
      return {};
    }
    if (classes_[c].slabs == 0 && !idle) idle = c;
  }
  // Past one record per slab, an idle record (no slabs, so no slot refers
  // to it) is reused: the records stay bounded whatever sizes come.
  if (!idle || classes_.size() <= num_slabs()) {
    idle = static_cast<LayoutClass>(classes_.size());
    classes_.emplace_back();
  }
  Class& c = classes_[*idle];
  c = Class{};
  c.slot_bytes = slot_bytes;
  c.slots_per_slab = static_cast<std::uint32_t>(std::min<std::uint64_t>(slab_bytes_ / slot_bytes, UINT32_MAX));
  cls = *idle;
  return {};
}

void L1Pool::add_room(std::uint32_t slab) {
  auto& room = classes_[slabs_[slab].cls].with_room;
  slabs_[slab].room_at = static_cast<std::uint32_t>(room.size());
  room.push_back(slab);
}

void L1Pool::remove_room(std::uint32_t slab) {
  auto& room = classes_[slabs_[slab].cls].with_room;
  const std::uint32_t at = slabs_[slab].room_at;
  room[at] = room.back();
  slabs_[room[at]].room_at = at;
  room.pop_back();
}

std::optional<Slot> L1Pool::allocate(LayoutClass cls) {
  Class& c = classes_[cls];
  if (c.with_room.empty()) {
    if (free_slabs_.empty()) return std::nullopt;
    const std::uint32_t slab = free_slabs_.back();
    free_slabs_.pop_back();
    slabs_[slab] = Slab{};
    slabs_[slab].cls = cls;
    ++c.slabs;
    add_room(slab);
  }
  const std::uint32_t slab = c.with_room.back();
  Slab& s = slabs_[slab];
  std::uint32_t index = 0;
  if (!s.freed.empty()) {
    index = s.freed.back();
    s.freed.pop_back();
  } else {
    index = s.carved++;
  }
  if (++s.used == c.slots_per_slab) remove_room(slab);
  ++c.used;
  bytes_used_ += c.slot_bytes;
  return slab_slot(slab, index);
}

void L1Pool::free(Slot slot) {
  const std::uint32_t slab = slab_of(slot);
  Slab& s = slabs_[slab];
  Class& c = classes_[s.cls];
  --c.used;
  bytes_used_ -= c.slot_bytes;
  const bool was_full = s.used == c.slots_per_slab;
  if (--s.used == 0) {
    // Empty: back to the free slabs, for any class.
    if (!was_full) remove_room(slab);
    --c.slabs;
    s.freed = {};
    free_slabs_.push_back(slab);
    return;
  }
  s.freed.push_back(index_in_slab(slot));
  if (was_full) add_room(slab);
}

std::uint32_t L1Pool::active_classes() const {
  std::uint32_t n = 0;
  for (const Class& c : classes_) n += c.slabs > 0 ? 1 : 0;
  return n;
}

std::uint64_t L1Pool::bytes_wasted() const {
  std::uint64_t n = 0;
  for (const Class& c : classes_) n += std::uint64_t{c.slabs} * (slab_bytes_ - c.slots_per_slab * c.slot_bytes);
  return n;
}

}  // namespace kvlink::store
