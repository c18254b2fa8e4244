#include "kvlink/transfer/cuda_export.hpp"

#include <cstring>
#include <fmt/format.h>
#include <map>
#include <utility>

#include "cuda_util.hpp"

namespace kvlink::transfer::cuda {

Result<wire::KvLayout> export_kv_cache(const PagedKvCache& c) {
  auto bad = [](std::string detail) { return Error(errc::bad_request, std::move(detail)); };
  if (c.layers.empty()) return bad("no layers given");
  if (c.num_blocks == 0 || c.block_size == 0 || c.num_kv_heads == 0 || c.head_size == 0 || c.dtype_size == 0)
    return bad("num_blocks, block_size, num_kv_heads, head_size and dtype_size must all be positive");
  wire::KvLayout l;
  l.backend = wire::KvBackend::cuda_ipc;
  l.num_layers = static_cast<std::uint32_t>(c.layers.size());
  l.num_blocks = c.num_blocks;
  l.block_size = c.block_size;
  l.num_planes = c.num_planes;
  l.num_kv_heads = c.num_kv_heads;
  l.head_size = c.head_size;
  l.dtype_size = c.dtype_size;
  const std::uint64_t bb = l.block_bytes();
  const bool planes_first = c.order == wire::PagedOrder::planes_first;
  l.block_stride = c.block_stride ? c.block_stride : planes_first ? bb : bb * c.num_planes;
  l.plane_stride = c.plane_stride ? c.plane_stride : planes_first ? bb * c.num_blocks : bb;
  l.layers.resize(c.layers.size());

  int device = -1;
  std::map<std::uint64_t, wire::Bytes> handles;  // by allocation base
  for (std::size_t i = 0; i < c.layers.size(); ++i) {
    cudaPointerAttributes attr{};
    if (auto e = cudaPointerGetAttributes(&attr, c.layers[i]); e != cudaSuccess) {
      cudaGetLastError();
      return failure("cudaPointerGetAttributes", e).context(fmt::format("layer {}", i));
    }
    if (attr.type != cudaMemoryTypeDevice)
      return bad(fmt::format("layer {}: {} is not device memory (cudaMalloc)", i, c.layers[i]));
    if (device < 0) device = attr.device;
    if (attr.device != device)
      return bad(fmt::format("layer {} is on CUDA device {} but layer 0 on device {}: one registration per device",
                             i, attr.device, device));
    if (auto e = cudaSetDevice(device); e != cudaSuccess) return failure("cudaSetDevice", device, e);
    auto range = allocation_range(c.layers[i]);
    if (!range) return Error(range.error()).context(fmt::format("layer {}", i));
    const auto [base, size] = *range;
    auto& h = handles[base];
    if (h.empty()) {
      cudaIpcMemHandle_t handle;
      if (auto e = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)); e != cudaSuccess) {
        cudaGetLastError();
        return bad(fmt::format("layer {}: {}; legacy CUDA IPC needs cudaMalloc memory (with PyTorch: no "
                               "expandable_segments, no cudaMallocAsync backend)",
                               i, error("cudaIpcGetMemHandle", device, e)));
      }
      h.resize(sizeof handle);
      std::memcpy(h.data(), &handle, sizeof handle);
    }
    l.layers[i].ipc_handle = h;
    l.layers[i].offset = reinterpret_cast<std::uintptr_t>(c.layers[i]) - base;
    l.region_bytes = std::max(l.region_bytes, size);
    // The server checks this too; failing here names the engine's mistake.
    const std::uint64_t span = std::uint64_t{l.num_blocks - 1} * l.block_stride +
                               std::uint64_t{l.num_planes - 1} * l.plane_stride + bb;
    if (l.layers[i].offset + span > size)
      return bad(fmt::format("layer {}: the layout spans {} bytes but only {} of its allocation follow the pointer; "
                             "check num_blocks, the shape and the strides",
                             i, span, size - l.layers[i].offset));
  }
  auto uuid = device_uuid(device);
  if (!uuid) return uuid.error();
  l.device_uuid = *uuid;
  if (auto err = l.check()) return err;
  return l;
}

EngineEvent::~EngineEvent() {
  if (event_) cudaEventDestroy(event_);
}

EngineEvent::EngineEvent(EngineEvent&& o) noexcept
    : event_(std::exchange(o.event_, nullptr)), handle_(std::move(o.handle_)) {}

EngineEvent& EngineEvent::operator=(EngineEvent&& o) noexcept {
  if (this != &o) {
    if (event_) cudaEventDestroy(event_);
    event_ = std::exchange(o.event_, nullptr);
    handle_ = std::move(o.handle_);
  }
  return *this;
}

Error EngineEvent::create() {
  int device = 0;
  cudaGetDevice(&device);
  cudaEvent_t ev = nullptr;
  if (auto e = cudaEventCreateWithFlags(&ev, cudaEventInterprocess | cudaEventDisableTiming); e != cudaSuccess)
    return failure("cudaEventCreateWithFlags(cudaEventInterprocess | cudaEventDisableTiming)", device, e);
  cudaIpcEventHandle_t h;
  if (auto e = cudaIpcGetEventHandle(&h, ev); e != cudaSuccess) {
    cudaEventDestroy(ev);
    return failure("cudaIpcGetEventHandle", device, e);
  }
  if (event_) cudaEventDestroy(event_);
  event_ = ev;
  handle_.resize(sizeof h);
  std::memcpy(handle_.data(), &h, sizeof h);
  return {};
}

Error EngineEvent::record(cudaStream_t stream) {
  if (!event_) return Error(errc::bad_request, "the event was not created (EngineEvent::create)");
  if (auto e = cudaEventRecord(event_, stream); e != cudaSuccess) return failure("cudaEventRecord", e);
  return {};
}

}  // namespace kvlink::transfer::cuda
