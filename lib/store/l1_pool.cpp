#include "kvlink/store/l1_pool.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fmt/format.h>

namespace kvlink::store {

std::string parse_size(std::string_view text, std::uint64_t& bytes) {
  const std::string shown(text);
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0)
    return fmt::format("size '{}' does not start with a number; write e.g. 512MiB, 8GiB or 1073741824", shown);
  double value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + i, value);
  if (ec != std::errc{} || ptr != text.data() + i)
    return fmt::format("size '{}' has a malformed number; write e.g. 512MiB, 8GiB or 1073741824", shown);
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
    return fmt::format("size '{}' has unknown unit '{}'; use B, KiB, MiB, GiB, TiB (or k, M, G, T), KB, MB, GB, TB",
                       shown, text.substr(i));
  const double total = std::floor(value * mult);
  if (!(total < 0x1p63)) return fmt::format("size '{}' is too large", shown);
  bytes = static_cast<std::uint64_t>(total);
  return {};
}

L1Pool::L1Pool(std::uint64_t capacity_bytes, bool try_huge_pages)
    : capacity_(capacity_bytes), try_huge_(try_huge_pages) {}

L1Pool::~L1Pool() {
  if (base_) ::munmap(base_, mapped_);
}

std::string L1Pool::map(bool lock) {
  if (base_) return {};
  if (capacity_ == 0) return "--l1-size is 0: L1 needs room for at least one KV chunk; give e.g. --l1-size 8GiB";
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) {
    const auto ram = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page_size);
    if (capacity_ > ram)
      return fmt::format("--l1-size of {:.1f} GiB is more than this machine's memory ({:.1f} GiB); lower --l1-size",
                         static_cast<double>(capacity_) / 0x1p30, static_cast<double>(ram) / 0x1p30);
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
      return fmt::format("cannot map the L1 region of {} bytes: {}; lower --l1-size", len, std::strerror(errno));
    if (try_huge_) ::madvise(p, len, MADV_HUGEPAGE);
  }
  if (lock && ::mlock(p, len) != 0) {
    const int err = errno;
    ::munmap(p, len);
    huge_ = false;
    return fmt::format("cannot lock the L1 region of {} bytes in RAM: {}; raise the locked-memory limit (ulimit -l, "
                       "systemd LimitMEMLOCK=), lower --l1-size, or drop --l1-lock",
                       len, std::strerror(err));
  }
  base_ = static_cast<std::byte*>(p);
  mapped_ = len;
  return {};
}

std::string L1Pool::configure(std::uint64_t slot_bytes) {
  if (slot_bytes == 0) return "slot size is 0 bytes";
  if (slot_bytes_ != 0) {
    if (slot_bytes != slot_bytes_)
      return fmt::format("this layout needs {} bytes per chunk slot but the L1 pool was set up with {} bytes per slot "
                         "by the first registration; every worker of one server must use the same KV layout and "
                         "chunk size (restart the server to change it)",
                         slot_bytes, slot_bytes_);
    return {};
  }
  const std::uint64_t slots = capacity_ / slot_bytes;
  if (slots == 0)
    return fmt::format("--l1-size of {} bytes cannot hold one chunk slot of {} bytes; raise --l1-size", capacity_,
                       slot_bytes);
  if (slots > UINT32_MAX) return fmt::format("{} slots exceed the limit of 2^32-1; raise the chunk size", slots);
  if (auto why = map(); !why.empty()) return why;
  slot_bytes_ = slot_bytes;
  num_slots_ = static_cast<std::uint32_t>(slots);
  free_.resize(num_slots_);
  // Lowest slot on top of the stack: slots are handed out in address order.
  for (std::uint32_t s = 0; s < num_slots_; ++s) free_[s] = num_slots_ - 1 - s;
  return {};
}

std::optional<std::uint32_t> L1Pool::allocate() {
  if (free_.empty()) return std::nullopt;
  const std::uint32_t s = free_.back();
  free_.pop_back();
  return s;
}

void L1Pool::free(std::uint32_t slot) { free_.push_back(slot); }

}  // namespace kvlink::store
