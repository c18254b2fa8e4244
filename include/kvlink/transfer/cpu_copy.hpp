// The CPU engine's gather/scatter between the engine's paged KV memory (a
// mapped memfd) and L1 chunk slots. Pure functions, no threads and no Asio:
// CpuTransferEngine runs them on its pool; unit tests call them directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvlink/error.hpp"
#include "kvlink/transfer/transfer_engine.hpp"

namespace kvlink::transfer {

// The layout of one chunk inside its L1 slot, the same for STORE and
// RETRIEVE: [layer][plane][block of the chunk], each block `block_bytes`,
// packed. slot_bytes = layers x planes x blocks_per_chunk x block_bytes.
inline std::uint64_t slot_offset(const wire::KvLayout& l, std::uint32_t blocks_per_chunk, std::uint32_t layer,
                                 std::uint32_t plane, std::uint32_t block_in_chunk) {
  return ((std::uint64_t{layer} * l.num_planes + plane) * blocks_per_chunk + block_in_chunk) * l.block_bytes();
}

// Where block `block_id` of `plane` of `layer` starts in the engine memory.
inline std::uint64_t engine_offset(const wire::KvLayout& l, std::uint32_t layer, std::uint32_t plane,
                                   std::uint32_t block_id) {
  return l.layers[layer].offset + plane * l.plane_stride + block_id * l.block_stride;
}

// Copies one chunk between `memory` (the engine's KV cache) and its slot:
// store gathers engine blocks into the slot, retrieve scatters the slot into
// engine blocks, leaving the chunk's first `skip_tokens` tokens untouched
// (whole blocks, then the head of a partial block). Every block id is checked
// against num_blocks and the mapping's size before anything is copied;
// refuses with bad_request and why (nothing outside the mapping is ever
// written). Before each layer of each block it checks `fence` and stops
// with timed_out (fence_passed()) once the clock reached it.
Error copy_chunk(Direction direction, const Registration& reg, const Mapping& memory, const ChunkCopy& chunk,
                       std::uint32_t skip_tokens, TimePoint fence = TimePoint::max());

// What copy_chunk(s) return when the job's fence passed mid-copy.
inline Error fence_passed() {
  return Error(errc::timed_out,
               "the request's fence passed before the copy was done: the engine may reuse its blocks now, so the "
               "server stopped touching them; raise the worker's transfer_timeout if the server is merely busy");
}

// Copies chunks [first, last) of `job`; chunk i of the job covers tokens
// [i x chunk_size, (i+1) x chunk_size) for skip_first_n_tokens. Stops at the
// first error (or the job's fence) and returns it.
Error copy_chunks(const TransferJob& job, std::size_t first, std::size_t last);

}  // namespace kvlink::transfer
