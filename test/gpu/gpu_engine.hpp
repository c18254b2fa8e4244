// The engine side of the GPU tests, in plain CUDA (no PyTorch): paged KV
// tensors made with cudaMalloc and exported for IPC, filled with known
// bytes, snapshotted back to the host, and a STORE -> RETRIEVE round trip
// through a WorkerAdapter checked byte for byte. Shared by gpu-tests and
// the second engine process (gpu-engine-helper).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvlink/adapter/worker.hpp"
#include "kvlink/error.hpp"
#include "kvlink/transfer/cuda_export.hpp"

namespace kvlink::gpu_test {

// Success when a CUDA device is usable, otherwise why not (asked once).
const Error& no_gpu_reason();
inline bool gpu_available() { return !no_gpu_reason(); }

// 4 MiB per layer: cudaMalloc may carve small allocations out of a shared
// block, which CUDA IPC then shares whole; engines' KV tensors are large.
struct KvShape {
  std::uint32_t layers = 4;
  std::uint32_t num_blocks = 512;
  std::uint32_t block_size = 16;
  std::uint32_t heads = 2;
  std::uint32_t head_size = 64;
  std::uint32_t dtype_size = 2;
  wire::PagedOrder order = wire::PagedOrder::planes_first;
  bool one_allocation = false;  // all layers in one cudaMalloc, else one each
};

// The engine's KV cache on the current device.
class DeviceKv {
 public:
  explicit DeviceKv(const KvShape& shape);
  ~DeviceKv();
  DeviceKv(const DeviceKv&) = delete;
  DeviceKv& operator=(const DeviceKv&) = delete;

  const Error& error() const { return error_; }  // success if created and exported
  const wire::KvLayout& layout() const { return layout_; }
  std::uint64_t layer_bytes() const { return layer_bytes_; }
  void* layer(std::uint32_t i) const { return layers_[i]; }

  // Every byte of layer l is pattern_byte(seed, l * layer_bytes + offset),
  // written by a kernel on `stream` (not waited for).
  Error fill(std::uint32_t seed, cudaStream_t stream);
  // All layers to the host, one after the other (synchronous).
  Error snapshot(std::vector<std::uint8_t>& out) const;

 private:
  Error error_;
  std::uint64_t layer_bytes_ = 0;
  std::vector<void*> allocations_;
  std::vector<void*> layers_;
  wire::KvLayout layout_;
};

// What RETRIEVE of the chunks stored from blocks `from` into blocks `to`
// must do to a snapshot (DeviceKv::snapshot layout): copy each block, but
// leave the first `skip_tokens` tokens of the request untouched.
void expect_retrieve(const wire::KvLayout& layout, std::uint64_t layer_bytes, std::vector<std::uint8_t>& snapshot,
                     std::span<const std::uint32_t> from, std::span<const std::uint32_t> to,
                     std::uint32_t skip_tokens);

// Success if equal, else where the first difference is (layer, plane, block,
// byte).
Error compare(const wire::KvLayout& layout, std::uint64_t layer_bytes, const std::vector<std::uint8_t>& want,
              const std::vector<std::uint8_t>& got);

// Tokens of `chunks` full chunks, unique per seed.
std::vector<store::Token> tokens(std::uint32_t seed, std::size_t chunks, std::uint32_t chunk_tokens);

// Fills `kv` with `seed`, STOREs the chunks of tokens(seed) from blocks
// `from`, RETRIEVEs them into blocks `to` skipping `skip_tokens`, each call
// carrying `event` recorded on the default stream, and compares the whole
// cache with what it must hold. Success or what went wrong.
Error round_trip(adapter::WorkerAdapter& worker, DeviceKv& kv, transfer::cuda::EngineEvent& event, std::uint32_t seed,
                 std::span<const std::uint32_t> from, std::span<const std::uint32_t> to, std::uint32_t skip_tokens,
                 std::uint32_t chunk_tokens);

}  // namespace kvlink::gpu_test
