// The CUDA engine's gather/scatter kernel. Kernels and plain launch
// wrappers only (nvcc compiles this file; no Asio, no coroutines).
#include <cstdint>

#include "cuda_kernels.hpp"

namespace kvlink::transfer::cuda {

namespace {

struct Segment {  // transfer::CopySegment
  std::uint64_t dst;
  std::uint64_t src;
  std::uint64_t bytes;
};

// One thread block per segment at a time. Each thread issues four 16-byte
// loads before its stores, so enough reads are in flight to fill PCIe when
// the source is mapped host memory (retrieve).
__global__ void copy_segments(const Segment* __restrict__ segments, std::uint32_t count) {
  constexpr unsigned unroll = 4;
  for (std::uint32_t s = blockIdx.x; s < count; s += gridDim.x) {
    const Segment g = segments[s];
    if (((g.dst | g.src | g.bytes) & 15u) == 0) {
      const uint4* src = reinterpret_cast<const uint4*>(g.src);
      uint4* dst = reinterpret_cast<uint4*>(g.dst);
      const std::uint64_t n = g.bytes / 16;
      const std::uint64_t step = std::uint64_t{blockDim.x} * unroll;
      std::uint64_t i = threadIdx.x;
      for (; i + (unroll - 1) * blockDim.x < n; i += step) {
        uint4 v[unroll];
#pragma unroll
        for (unsigned k = 0; k < unroll; ++k) v[k] = src[i + k * blockDim.x];
#pragma unroll
        for (unsigned k = 0; k < unroll; ++k) dst[i + k * blockDim.x] = v[k];
      }
      for (; i < n; i += blockDim.x) dst[i] = src[i];
    } else {
      const unsigned char* src = reinterpret_cast<const unsigned char*>(g.src);
      unsigned char* dst = reinterpret_cast<unsigned char*>(g.dst);
      for (std::uint64_t i = threadIdx.x; i < g.bytes; i += blockDim.x) dst[i] = src[i];
    }
  }
}

}  // namespace

cudaError_t launch_copy_segments(const void* segments, std::uint32_t count, unsigned grid, unsigned threads,
                                 cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (grid > count) grid = count;
  copy_segments<<<grid, threads, 0, stream>>>(static_cast<const Segment*>(segments), count);
  return cudaGetLastError();
}

}  // namespace kvlink::transfer::cuda
