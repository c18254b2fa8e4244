// Launch wrappers of the CUDA engine's kernels (cuda_kernels.cu). Plain
// functions with CUDA runtime types only, so g++ code calls what nvcc built.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvlink::transfer::cuda {

// Copies every segment of `segments` (device-readable, `count` entries laid
// out as transfer::CopySegment: dst, src, bytes) in one launch on `stream`:
// thread block b takes segments b, b + grid, ...; 16-byte loads and stores
// where a segment's addresses and size allow, bytes otherwise. Addresses
// are device-visible (device memory, or mapped pinned host memory).
// Returns the launch's error (cudaSuccess if it was queued).
cudaError_t launch_copy_segments(const void* segments, std::uint32_t count, unsigned grid, unsigned threads,
                                 cudaStream_t stream);

}  // namespace kvlink::transfer::cuda
