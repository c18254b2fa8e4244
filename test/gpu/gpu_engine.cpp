#include "gpu_engine.hpp"

#include <cstring>
#include <fmt/format.h>

#include "gpu_kernels.hpp"
#include "kvlink/transfer/cpu_copy.hpp"
#include "kvlink/transfer/cuda_engine.hpp"

namespace kvlink::gpu_test {

const Error& no_gpu_reason() {
  static const Error reason = transfer::cuda_device_count().error();
  return reason;
}

namespace {
Error cuda_error(const char* call, cudaError_t e) {
  return Error(errc::server_error, fmt::format("{} failed: {} ({})", call, cudaGetErrorName(e), cudaGetErrorString(e)));
}
}  // namespace

DeviceKv::DeviceKv(const KvShape& s) {
  const std::uint64_t bb = std::uint64_t{s.block_size} * s.heads * s.head_size * s.dtype_size;
  layer_bytes_ = 2 * bb * s.num_blocks;
  auto alloc = [&](std::uint64_t bytes) -> void* {
    void* p = nullptr;
    if (auto e = cudaMalloc(&p, bytes); e != cudaSuccess) {
      error_ = cuda_error("cudaMalloc", e);
      return nullptr;
    }
    allocations_.push_back(p);
    return p;
  };
  if (s.one_allocation) {
    auto* base = static_cast<std::uint8_t*>(alloc(layer_bytes_ * s.layers));
    if (!base) return;
    for (std::uint32_t l = 0; l < s.layers; ++l) layers_.push_back(base + l * layer_bytes_);
  } else {
    for (std::uint32_t l = 0; l < s.layers; ++l) {
      void* p = alloc(layer_bytes_);
      if (!p) return;
      layers_.push_back(p);
    }
  }
  transfer::cuda::PagedKvCache c;
  c.layers.assign(layers_.begin(), layers_.end());
  c.num_blocks = s.num_blocks;
  c.block_size = s.block_size;
  c.num_kv_heads = s.heads;
  c.head_size = s.head_size;
  c.dtype_size = s.dtype_size;
  c.order = s.order;
  auto layout = transfer::cuda::export_kv_cache(c);
  if (layout) layout_ = *layout;
  else error_ = layout.error();
}

DeviceKv::~DeviceKv() {
  for (void* p : allocations_) cudaFree(p);
}

Error DeviceKv::fill(std::uint32_t seed, cudaStream_t stream) {
  for (std::uint32_t l = 0; l < layers_.size(); ++l)
    if (auto e = launch_fill_pattern(layers_[l], layer_bytes_, seed, l * layer_bytes_, stream); e != cudaSuccess)
      return cuda_error("the fill kernel's launch", e);
  return {};
}

Error DeviceKv::snapshot(std::vector<std::uint8_t>& out) const {
  out.resize(layers_.size() * layer_bytes_);
  for (std::size_t l = 0; l < layers_.size(); ++l)
    if (auto e = cudaMemcpy(out.data() + l * layer_bytes_, layers_[l], layer_bytes_, cudaMemcpyDeviceToHost);
        e != cudaSuccess)
      return cuda_error("cudaMemcpy (snapshot)", e);
  return {};
}

void expect_retrieve(const wire::KvLayout& l, std::uint64_t layer_bytes, std::vector<std::uint8_t>& snap,
                     std::span<const std::uint32_t> from, std::span<const std::uint32_t> to,
                     std::uint32_t skip_tokens) {
  const std::uint64_t bb = l.block_bytes(), token_bytes = bb / l.block_size;
  const std::vector<std::uint8_t> before = snap;
  for (std::size_t j = 0; j < from.size() && j < to.size(); ++j) {
    const std::uint64_t first_token = j * std::uint64_t{l.block_size};
    const std::uint64_t skip =
        skip_tokens > first_token ? std::min<std::uint64_t>(skip_tokens - first_token, l.block_size) : 0;
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
      for (std::uint32_t plane = 0; plane < l.num_planes; ++plane) {
        // Offsets inside the layer's tensor (the snapshot has no allocation offsets).
        const std::uint64_t src = layer * layer_bytes + transfer::engine_offset(l, layer, plane, from[j]) -
                                  l.layers[layer].offset;
        const std::uint64_t dst = layer * layer_bytes + transfer::engine_offset(l, layer, plane, to[j]) -
                                  l.layers[layer].offset;
        std::memcpy(snap.data() + dst + skip * token_bytes, before.data() + src + skip * token_bytes,
                    bb - skip * token_bytes);
      }
  }
}

Error compare(const wire::KvLayout& l, std::uint64_t layer_bytes, const std::vector<std::uint8_t>& want,
              const std::vector<std::uint8_t>& got) {
  auto differ = [](std::string detail) { return Error(errc::server_error, std::move(detail)); };
  if (want.size() != got.size()) return differ(fmt::format("sizes differ: {} vs {}", want.size(), got.size()));
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (want[i] == got[i]) continue;
    const std::uint64_t layer = i / layer_bytes, in_layer = i % layer_bytes;
    const std::uint64_t plane = l.plane_stride > l.block_stride ? in_layer / l.plane_stride
                                                                : in_layer % l.block_stride / l.block_bytes();
    const std::uint64_t block = l.plane_stride > l.block_stride ? in_layer % l.plane_stride / l.block_stride
                                                                : in_layer / l.block_stride;
    std::size_t wrong = 0;
    for (std::size_t k = i; k < want.size(); ++k) wrong += want[k] != got[k];
    return differ(fmt::format("{} byte(s) differ; the first: layer {} plane {} block {} byte {} of the block is "
                              "{:#04x}, expected {:#04x}",
                              wrong, layer, plane, block, in_layer % l.block_bytes(), got[i], want[i]));
  }
  return {};
}

std::vector<store::Token> tokens(std::uint32_t seed, std::size_t chunks, std::uint32_t chunk_tokens) {
  std::vector<store::Token> t(chunks * chunk_tokens);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<store::Token>(seed * 1000003u + i);
  return t;
}

Error round_trip(adapter::WorkerAdapter& worker, DeviceKv& kv, transfer::cuda::EngineEvent& event, std::uint32_t seed,
                 std::span<const std::uint32_t> from, std::span<const std::uint32_t> to, std::uint32_t skip_tokens,
                 std::uint32_t chunk_tokens) {
  const std::uint32_t bpc = chunk_tokens / kv.layout().block_size;
  const std::size_t chunks = from.size() / bpc;
  if (auto err = kv.fill(seed, nullptr)) return err;
  if (auto err = event.record(nullptr)) return err;  // the fill, then the STORE's copies

  adapter::TransferSpec store;
  store.request_id = fmt::format("store-{}", seed);
  store.tokens = tokens(seed, chunks, chunk_tokens);
  store.block_ids.assign(from.begin(), from.end());
  store.engine_event = event.handle();
  auto stored = worker.submit_store(store, std::chrono::seconds(30));
  if (!stored) return Error(stored.error()).context("STORE failed");
  if (stored->stored_chunks != chunks)
    return Error(errc::server_error, fmt::format("STORE stored {} of {} chunks ({} skipped)", stored->stored_chunks,
                                                 chunks, stored->skipped_chunks));

  std::vector<std::uint8_t> want, got;
  if (auto err = kv.snapshot(want)) return err;
  expect_retrieve(kv.layout(), kv.layer_bytes(), want, from, to, skip_tokens);

  if (auto err = event.record(nullptr)) return err;
  adapter::TransferSpec retrieve;
  retrieve.request_id = fmt::format("retrieve-{}", seed);
  retrieve.tokens = store.tokens;
  retrieve.block_ids.assign(to.begin(), to.end());
  retrieve.skip_first_n_tokens = skip_tokens;
  retrieve.engine_event = event.handle();
  auto retrieved = worker.submit_retrieve(retrieve, std::chrono::seconds(30));
  if (!retrieved) return Error(retrieved.error()).context("RETRIEVE failed");
  if (retrieved->retrieved_chunks != chunks)
    return Error(errc::server_error,
                 fmt::format("RETRIEVE returned {} of {} chunks", retrieved->retrieved_chunks, chunks));
  // The reply came after the copy completed: the blocks must hold the data now.
  if (auto err = kv.snapshot(got)) return err;
  return compare(kv.layout(), kv.layer_bytes(), want, got);
}

}  // namespace kvlink::gpu_test
