// Engine side of the CUDA data path: describe the engine's paged KV tensors
// as a cuda_ipc KvLayout (per-layer IPC memory handle + offset inside its
// allocation, shape, strides, device UUID) for
// WorkerAdapter::register_kv_caches(layout), and the interprocess event an
// engine records on its stream before each STORE / RETRIEVE
// (TransferSpec::engine_event) so the server's copies run after the
// engine's writes (stores) or before its next reads (retrieves), with no
// host synchronisation.
//
// Built only with CUDA (KVLINK_HAVE_CUDA). Memory must come from cudaMalloc
// (PyTorch's caching allocator qualifies; cudaMallocAsync pools and
// cuMemCreate (expandable segments) cannot be shared through legacy IPC).
// The offset of a layer is taken from cuMemGetAddressRange, as PyTorch's
// own CUDA IPC does; tiny cudaMalloc allocations (well under 2 MiB) may be
// carved from a shared block and are not what a KV cache is made of.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kvlink/error.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::transfer::cuda {

// One worker's paged KV cache: every layer a tensor of the same shape, in
// which one block of one plane is block_size x num_kv_heads x head_size
// contiguous elements. vLLM's [2, num_blocks, block_size, heads, head_size]
// per layer is PagedOrder::planes_first; [num_blocks, 2, block_size, heads,
// head_size] is blocks_first. Other strides: set them (bytes) explicitly.
struct PagedKvCache {
  std::vector<const void*> layers;  // device pointer of each layer's tensor
  std::uint32_t num_blocks = 0;
  std::uint32_t block_size = 0;  // tokens per block
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_size = 0;
  std::uint32_t dtype_size = 0;  // bytes per element
  std::uint32_t num_planes = 2;  // 2: K and V; 1: MLA latent
  wire::PagedOrder order = wire::PagedOrder::planes_first;
  std::uint64_t block_stride = 0;  // bytes; 0: from `order` for a contiguous tensor
  std::uint64_t plane_stride = 0;  // bytes; 0: from `order`
};

// The cuda_ipc layout of `cache`, or why not: bad_request for the
// caller's mistakes (not device memory, layers on different devices, a
// layer not fitting its allocation, memory that cannot be exported),
// server_error for other CUDA failures. Each handle names the whole
// cudaMalloc allocation holding a layer; layers sharing one are fine.
Result<wire::KvLayout> export_kv_cache(const PagedKvCache& cache);

// An interprocess CUDA event (cudaEventInterprocess | cudaEventDisableTiming)
// on the current device. Record it on the stream that wrote (or will read)
// the blocks right before each STORE / RETRIEVE, and pass handle() as the
// TransferSpec's engine_event. One event serves every call: the server
// waits on its latest record at the time the request arrives.
class EngineEvent {
 public:
  EngineEvent() = default;
  ~EngineEvent();
  EngineEvent(EngineEvent&& o) noexcept;
  EngineEvent& operator=(EngineEvent&& o) noexcept;
  EngineEvent(const EngineEvent&) = delete;
  EngineEvent& operator=(const EngineEvent&) = delete;

  // Creates the event and its IPC handle.
  Error create();
  // cudaEventRecord on `stream`.
  Error record(cudaStream_t stream);
  const wire::Bytes& handle() const { return handle_; }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
  wire::Bytes handle_;
};

}  // namespace kvlink::transfer::cuda
