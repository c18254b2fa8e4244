#include "kvlink/transfer/cuda_plan.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "kvlink/transfer/cpu_copy.hpp"

namespace kvlink::transfer {

namespace {

Error check_chunk(const Registration& reg, std::span<const DeviceAllocation> layers, const ChunkCopy& chunk) {
  const wire::KvLayout& l = reg.layout;
  if (chunk.block_ids.size() != reg.blocks_per_chunk)
    return Error(errc::bad_request,
                 fmt::format("{} block ids for a chunk of {} blocks", chunk.block_ids.size(), reg.blocks_per_chunk));
  const std::uint64_t bb = l.block_bytes();
  const auto last_plane = static_cast<std::uint32_t>(l.num_planes - 1);
  for (const std::uint32_t id : chunk.block_ids) {
    if (id >= l.num_blocks)
      return Error(errc::bad_request,
                   fmt::format("block id {} is not below the registered num_blocks {}", id, l.num_blocks));
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer) {
      std::uint64_t end = 0;
      if (__builtin_add_overflow(engine_offset(l, layer, last_plane, id), bb, &end) || end > layers[layer].size)
        return Error(errc::bad_request,
                     fmt::format("block id {} of layer {} lies outside the layer's {}-byte allocation", id, layer,
                                 layers[layer].size));
    }
  }
  return {};
}

void add(std::vector<CopySegment>& out, std::uint64_t dst, std::uint64_t src, std::uint64_t bytes,
         std::uint64_t merge_limit, std::size_t first_of_job) {
  if (out.size() > first_of_job) {
    CopySegment& last = out.back();
    if (last.dst + last.bytes == dst && last.src + last.bytes == src && last.bytes + bytes <= merge_limit) {
      last.bytes += bytes;
      return;
    }
  }
  out.push_back({dst, src, bytes});
}

}  // namespace

Error plan_copies(const TransferJob& job, std::span<const DeviceAllocation> layers, const PlanOptions& options,
                  std::vector<CopySegment>& out) {
  if (!job.registration) return Error(errc::bad_request, "the job has no registration");
  const Registration& reg = *job.registration;
  const wire::KvLayout& l = reg.layout;
  if (l.layers.size() != l.num_layers || layers.size() != l.num_layers)
    return Error(errc::bad_request,
                 fmt::format("the layout has {} layers but {} layer locations and {} opened allocations",
                             l.num_layers, l.layers.size(), layers.size()));
  if (l.block_size == 0 || reg.blocks_per_chunk == 0)
    return Error(errc::bad_request, "the layout has no blocks per chunk");
  for (std::size_t i = 0; i < job.chunks.size(); ++i)
    if (auto err = check_chunk(reg, layers, job.chunks[i])) return err.context(fmt::format("chunk {}", i));

  const std::size_t first = out.size();
  const std::uint64_t bb = l.block_bytes();
  const std::uint64_t token_bytes = bb / l.block_size;
  const std::uint32_t bpc = reg.blocks_per_chunk;
  const std::uint64_t chunk_tokens = std::uint64_t{bpc} * l.block_size;
  const bool store = job.direction == Direction::store;
  for (std::size_t i = 0; i < job.chunks.size(); ++i) {
    const ChunkCopy& chunk = job.chunks[i];
    // Tokens of this chunk to leave untouched (retrieve only), as copy_chunks.
    std::uint64_t chunk_skip = 0;
    if (!store && job.skip_first_n_tokens > i * chunk_tokens)
      chunk_skip = std::min<std::uint64_t>(job.skip_first_n_tokens - i * chunk_tokens, chunk_tokens);
    if (chunk_skip == chunk_tokens) continue;
    const std::uint64_t slot = reinterpret_cast<std::uintptr_t>(chunk.slot) + static_cast<std::uint64_t>(options.host_offset);
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (std::uint32_t plane = 0; plane < l.num_planes; ++plane) {
        for (std::uint32_t j = 0; j < bpc; ++j) {
          const std::uint64_t block_first = std::uint64_t{j} * l.block_size;
          const std::uint64_t skip =
              chunk_skip > block_first ? std::min<std::uint64_t>(chunk_skip - block_first, l.block_size) : 0;
          if (skip == l.block_size) continue;
          const std::uint64_t from = skip * token_bytes;
          const std::uint64_t device = layers[layer].base + engine_offset(l, layer, plane, chunk.block_ids[j]) + from;
          const std::uint64_t host = slot + slot_offset(l, bpc, layer, plane, j) + from;
          if (store) add(out, host, device, bb - from, options.merge_limit, first);
          else add(out, device, host, bb - from, options.merge_limit, first);
        }
      }
    }
  }
  return {};
}

std::uint64_t plan_bytes(std::span<const CopySegment> plan) {
  std::uint64_t n = 0;
  for (const auto& s : plan) n += s.bytes;
  return n;
}

}  // namespace kvlink::transfer
