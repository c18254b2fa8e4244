// The CUDA engine's copy plan: a job (chunks, engine block ids, skip) and
// a registered layout turned into a flat list of byte-range copies between
// device and host addresses. Plain C++ with no CUDA: the engine feeds the
// list to one kernel launch or one cudaMemcpyBatchAsync call, and unit
// tests check it on any machine (against cpu_copy's semantics).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvlink/error.hpp"
#include "kvlink/transfer/transfer_engine.hpp"

namespace kvlink::transfer {

// One contiguous copy of `bytes` from address `src` to address `dst`. The
// layout is shared with the kernel (lib/transfer/cuda_kernels.cu).
struct CopySegment {
  std::uint64_t dst = 0;
  std::uint64_t src = 0;
  std::uint64_t bytes = 0;
  friend bool operator==(const CopySegment&, const CopySegment&) = default;
};
static_assert(sizeof(CopySegment) == 24);

// A layer's allocation as the copier addresses it: the address where the
// IPC handle was opened (the allocation's base) and the allocation's size.
// The layer's tensor starts at base + layout.layers[i].offset.
struct DeviceAllocation {
  std::uint64_t base = 0;
  std::uint64_t size = 0;
};

struct PlanOptions {
  // Added to L1 (host) addresses: the device-side address of mapped pinned
  // memory minus its host address (0 with unified addressing, and for
  // cudaMemcpyBatchAsync, which takes host pointers).
  std::int64_t host_offset = 0;
  // Neighbouring copies that are contiguous on both sides are merged up to
  // this many bytes (fewer, larger copies for the copy engines; bounded so
  // a kernel's thread blocks get balanced work). 0: never merge.
  std::uint64_t merge_limit = 0;
};

// Appends the copies of `job` to `out`, in the order of cpu_copy: chunk,
// layer, plane, block. Store copies engine blocks into the chunk's slot;
// retrieve copies the slot into engine blocks leaving the job's first
// skip_first_n_tokens tokens untouched (whole blocks, then the head of a
// partial block), exactly as copy_chunks does. `layers` has one entry per
// layer of the layout. Every block id is checked against num_blocks and
// its layer's allocation before anything is added; a bad_request says
// which is wrong (then `out` is left as it was).
Error plan_copies(const TransferJob& job, std::span<const DeviceAllocation> layers, const PlanOptions& options,
                  std::vector<CopySegment>& out);

// Total bytes of a plan.
std::uint64_t plan_bytes(std::span<const CopySegment> plan);

}  // namespace kvlink::transfer
