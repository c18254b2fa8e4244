#include "kvlink/transfer/cpu_copy.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <fmt/format.h>

#include "kvlink/transfer/kv_memfd.hpp"

namespace kvlink::transfer {

Mapping::~Mapping() {
  if (base_ && size_ > 0) ::munmap(base_, size_);
}

Error check_memfd_seals(int fd) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0)
    return Error(errc::bad_request,
                 fmt::format("the fd received with REGISTER_KV_CACHE cannot be sealed (F_GET_SEALS: {}): a regular "
                             "file or another non-memfd can be shrunk under the server's mapping; pass a memfd "
                             "created with MFD_ALLOW_SEALING and sealed with F_SEAL_SHRINK|F_SEAL_GROW, e.g. with "
                             "kvlink::transfer::create_kv_memfd",
                             std::strerror(errno)));
  const bool shrink_sealed = (seals & F_SEAL_SHRINK) != 0, grow_sealed = (seals & F_SEAL_GROW) != 0;
  if (!shrink_sealed || !grow_sealed)
    return Error(errc::bad_request,
                 fmt::format("the KV memfd is not sealed against resizing (it lacks {}): an engine that shrank it "
                             "would crash the server's copies; seal the memfd with F_SEAL_SHRINK|F_SEAL_GROW, e.g. "
                             "with kvlink::transfer::create_kv_memfd (a memfd takes seals only if created with "
                             "MFD_ALLOW_SEALING)",
                             !shrink_sealed && !grow_sealed ? "F_SEAL_SHRINK and F_SEAL_GROW"
                             : !shrink_sealed               ? "F_SEAL_SHRINK"
                                                            : "F_SEAL_GROW"));
  return {};
}

Result<std::shared_ptr<const Mapping>> map_memfd(UniqueFd fd, std::uint64_t region_bytes) {
  auto bad = [](std::string detail) { return Error(errc::bad_request, std::move(detail)); };
  // A failed system call: its errno is the code.
  auto sys = [](int e, std::string_view what) {
    return Error(std::error_code(e, std::system_category()), fmt::format("{} failed: {}", what, std::strerror(e)));
  };
  if (!fd) return bad("no memfd received with REGISTER_KV_CACHE");
  if (region_bytes == 0) return bad("the layout's region_bytes is 0; it must be the memfd's size");
  // Seals first: once the size is sealed, the fstat below stays true for as
  // long as the mapping lives (seals cannot be removed).
  if (auto err = check_memfd_seals(fd.get())) return err;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return sys(errno, "fstat of the received memfd");
  if (static_cast<std::uint64_t>(st.st_size) < region_bytes)
    return bad(fmt::format("memfd is {} bytes, layout needs {} (region_bytes); a sealed memfd cannot grow: create it "
                           "at region_bytes, e.g. with kvlink::transfer::create_kv_memfd(layout)",
                           st.st_size, region_bytes));
  if (region_bytes > std::numeric_limits<std::size_t>::max() / 2)
    return bad(fmt::format("region_bytes {} is too large to map", region_bytes));
  void* p = ::mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) {
    const int e = errno;  // before the formatting below
    return sys(e, fmt::format("mmap of {} bytes of the memfd", region_bytes));
  }
  return std::make_shared<const Mapping>(static_cast<std::byte*>(p), static_cast<std::size_t>(region_bytes));
}

Error copy_chunk(Direction direction, const Registration& reg, const Mapping& memory, const ChunkCopy& chunk,
                       std::uint32_t skip_tokens, TimePoint fence) {
  const wire::KvLayout& l = reg.layout;
  const std::uint64_t bb = l.block_bytes();
  const std::uint32_t bpc = reg.blocks_per_chunk;
  if (chunk.block_ids.size() != bpc)
    return Error(errc::bad_request, fmt::format("{} block ids for a chunk of {} blocks", chunk.block_ids.size(), bpc));
  if (l.layers.size() != l.num_layers)
    return Error(errc::bad_request, "the layout's layer list does not match num_layers");
  // Check first, copy after: a bad id fails the chunk before any byte moves.
  const std::uint64_t last_plane = l.num_planes - 1;
  for (std::size_t j = 0; j < bpc; ++j) {
    const std::uint32_t id = chunk.block_ids[j];
    if (id >= l.num_blocks)
      return Error(errc::bad_request,
                   fmt::format("block id {} is not below the registered num_blocks {}", id, l.num_blocks));
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer) {
      std::uint64_t end = 0;
      if (__builtin_add_overflow(engine_offset(l, layer, static_cast<std::uint32_t>(last_plane), id), bb, &end) ||
          end > memory.size())
        return Error(errc::bad_request,
                     fmt::format("block id {} of layer {} lies outside the {} mapped bytes", id, layer, memory.size()));
    }
  }
  const std::uint64_t token_bytes = bb / l.block_size;
  std::byte* const base = memory.base();
  for (std::uint32_t j = 0; j < bpc; ++j) {
    // Tokens of this block to leave untouched (retrieve only).
    const std::uint64_t block_first = std::uint64_t{j} * l.block_size;
    const std::uint64_t skip =
        skip_tokens > block_first ? std::min<std::uint64_t>(skip_tokens - block_first, l.block_size) : 0;
    if (skip == l.block_size) continue;
    const std::uint64_t from = skip * token_bytes;
    const std::uint64_t n = bb - from;
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer) {
      if (fence != TimePoint::max() && Clock::now() >= fence) return fence_passed();
      for (std::uint32_t plane = 0; plane < l.num_planes; ++plane) {
        std::byte* engine = base + engine_offset(l, layer, plane, chunk.block_ids[j]) + from;
        std::byte* slot = chunk.slot + slot_offset(l, bpc, layer, plane, j) + from;
        if (direction == Direction::store) std::memcpy(slot, engine, n);
        else std::memcpy(engine, slot, n);
      }
    }
  }
  return {};
}

Error copy_chunks(const TransferJob& job, std::size_t first, std::size_t last) {
  if (!job.registration) return Error(errc::bad_request, "the job has no registration");
  const Registration& reg = *job.registration;
  if (!reg.memory)
    return Error(errc::bad_request, "the registered KV cache has no mapped memory (registered without a memfd?)");
  const std::uint64_t chunk_tokens = std::uint64_t{reg.blocks_per_chunk} * reg.layout.block_size;
  for (std::size_t i = first; i < last && i < job.chunks.size(); ++i) {
    std::uint32_t skip = 0;
    if (job.direction == Direction::retrieve) {
      const std::uint64_t chunk_first = i * chunk_tokens;
      if (job.skip_first_n_tokens > chunk_first)
        skip = static_cast<std::uint32_t>(std::min<std::uint64_t>(job.skip_first_n_tokens - chunk_first, chunk_tokens));
    }
    if (skip == chunk_tokens) continue;
    if (auto err = copy_chunk(job.direction, reg, *reg.memory, job.chunks[i], skip, job.fence))
      return err == errc::timed_out ? err : err.context(fmt::format("chunk {}", i));
  }
  return {};
}

}  // namespace kvlink::transfer
