#include "gpu_kernels.hpp"

namespace kvlink::gpu_test {

namespace {

__global__ void fill_pattern(std::uint8_t* p, std::size_t n, std::uint32_t seed, std::uint64_t first) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x)
    p[i] = pattern_byte(seed, first + i);
}

__device__ std::uint64_t global_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin(std::uint64_t ns) {
  const std::uint64_t start = global_ns();
  while (global_ns() - start < ns) {
  }
}

__global__ void compute(float* data, std::size_t n, int iters) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    float x = data[i];
    for (int k = 0; k < iters; ++k) x = x * 0.999f + 0.001f;
    data[i] = x;
  }
}

}  // namespace

cudaError_t launch_fill_pattern(void* p, std::size_t n, std::uint32_t seed, std::uint64_t first, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  fill_pattern<<<1024, 256, 0, s>>>(static_cast<std::uint8_t*>(p), n, seed, first);
  return cudaGetLastError();
}

cudaError_t launch_spin(std::uint64_t ns, cudaStream_t s) {
  spin<<<1, 1, 0, s>>>(ns);
  return cudaGetLastError();
}

cudaError_t launch_compute(float* data, std::size_t n, int iters, cudaStream_t s) {
  compute<<<1024, 256, 0, s>>>(data, n, iters);
  return cudaGetLastError();
}

}  // namespace kvlink::gpu_test
