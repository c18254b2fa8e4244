#include "kvlink/wire/messages.hpp"

#include <fmt/format.h>

namespace kvlink::wire {

const char* role_name(Role r) {
  switch (r) {
    case Role::scheduler: return "scheduler";
    case Role::worker: return "worker";
    case Role::admin: return "admin";
  }
  return "unknown";
}

Error HelloRequest::check() const {
  if (protocol_version != wire::protocol_version)
    return Error(errc::version_mismatch,
                 fmt::format("protocol version {} is not supported (this side speaks {}); upgrade the older side",
                             protocol_version, wire::protocol_version));
  if (role != Role::scheduler && role != Role::worker && role != Role::admin)
    return Error(errc::bad_request,
                 fmt::format("role {} is not scheduler (1), worker (2) or admin (3)", static_cast<int>(role)));
  if (instance_id == 0 || (instance_id >> 63) != 0)
    return Error(errc::bad_request, "instance_id must be a non-zero 63-bit number");
  if (!instance_secret.empty() && instance_secret.size() < min_instance_secret)
    return Error(
        errc::bad_request,
        fmt::format("instance_secret is {} bytes; send none or {} to {} random bytes (net::random_instance_secret)",
                    instance_secret.size(), min_instance_secret, max_instance_secret));
  return {};
}

Error KvLayout::check() const {
  if (backend != KvBackend::cpu_memfd && backend != KvBackend::cuda_ipc)
    return Error(errc::bad_request,
                 fmt::format("backend {} is not cpu_memfd (1) or cuda_ipc (2)", static_cast<int>(backend)));
  if (num_layers == 0 || num_blocks == 0 || block_size == 0 || num_kv_heads == 0 || head_size == 0 ||
      dtype_size == 0)
    return Error(errc::bad_request,
                 "num_layers, num_blocks, block_size, num_kv_heads, head_size and dtype_size must all be positive");
  if (num_planes != 1 && num_planes != 2)
    return Error(errc::bad_request, fmt::format("num_planes is {}; it must be 1 (MLA) or 2 (K and V)", num_planes));
  if (layers.size() != num_layers)
    return Error(errc::bad_request,
                 fmt::format("{} layer locations given for num_layers = {}", layers.size(), num_layers));
  const std::uint64_t bb = block_bytes();
  if (block_stride < bb)
    return Error(errc::bad_request,
                 fmt::format("block_stride {} is smaller than one block ({} bytes)", block_stride, bb));
  if (num_planes == 2 && plane_stride < bb)
    return Error(errc::bad_request,
                 fmt::format("plane_stride {} is smaller than one block ({} bytes)", plane_stride, bb));
  // The last byte of each layer must lie inside the registered region;
  // overflow-checked so huge strides cannot wrap around.
  std::uint64_t blocks_span = 0, planes_span = 0, span = 0;
  if (__builtin_mul_overflow(std::uint64_t{num_blocks - 1}, block_stride, &blocks_span) ||
      __builtin_mul_overflow(std::uint64_t{num_planes - 1}, plane_stride, &planes_span) ||
      __builtin_add_overflow(blocks_span, planes_span, &span) || __builtin_add_overflow(span, bb, &span))
    return Error(errc::bad_request, "block_stride / plane_stride are so large the layout overflows 64-bit offsets");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    std::uint64_t end = 0;
    if (__builtin_add_overflow(layers[i].offset, span, &end) || end > region_bytes)
      return Error(errc::bad_request, fmt::format("layer {} (offset {}) extends past the registered region of {} bytes",
                                                  i, layers[i].offset, region_bytes));
  }
  return {};
}

KvLayout paged_layout(std::uint32_t num_layers, std::uint32_t num_blocks, std::uint32_t block_size,
                      std::uint32_t num_kv_heads, std::uint32_t head_size, std::uint32_t dtype_size,
                      PagedOrder order) {
  KvLayout l;
  l.backend = KvBackend::cpu_memfd;
  l.num_layers = num_layers;
  l.num_blocks = num_blocks;
  l.block_size = block_size;
  l.num_planes = 2;
  l.num_kv_heads = num_kv_heads;
  l.head_size = head_size;
  l.dtype_size = dtype_size;
  const std::uint64_t bb = l.block_bytes();
  const bool planes_first = order == PagedOrder::planes_first;
  l.block_stride = planes_first ? bb : 2 * bb;
  l.plane_stride = planes_first ? bb * num_blocks : bb;
  const std::uint64_t layer_bytes = 2 * bb * num_blocks;
  l.region_bytes = layer_bytes * num_layers;
  l.layers.resize(num_layers);
  for (std::uint32_t i = 0; i < num_layers; ++i) l.layers[i].offset = i * layer_bytes;
  return l;
}

Error RegisterKvCacheRequest::check() const {
  if (model.empty()) return Error(errc::bad_request, "model name is empty");
  if (world_size == 0) return Error(errc::bad_request, "world_size must be at least 1");
  if (kv_rank >= world_size)
    return Error(errc::bad_request, fmt::format("kv_rank {} is not below world_size {}", kv_rank, world_size));
  return layout.check();
}

}  // namespace kvlink::wire
