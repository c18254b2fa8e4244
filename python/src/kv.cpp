// The KV-cache helpers: layouts, a sealed memfd-backed CPU KV cache with a
// buffer Python views (numpy, torch; kvlink/kv.py), and the CUDA export of
// an engine's device tensors.
#include <pybind11/stl.h>

#include <cstring>

#include "bindings.hpp"
#include "record.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/wire/messages.hpp"
#ifdef KVLINK_HAVE_CUDA
#include "kvlink/transfer/cuda_export.hpp"
#endif

namespace kvlink::python {

namespace {

py::bytes to_bytes(const void* data, std::size_t n) { return py::bytes(static_cast<const char*>(data), n); }
wire::Bytes from_bytes(const py::bytes& b) {
  const std::string v = b;
  const auto* p = reinterpret_cast<const std::byte*>(v.data());
  return wire::Bytes(p, p + v.size());
}

// A cpu_memfd KV cache: the sealed memfd of `layout` and its mapping.
class CpuKvCache {
 public:
  CpuKvCache(wire::KvLayout layout, std::string name) : layout_(std::move(layout)) {
    if (layout_.backend != wire::KvBackend::cpu_memfd)
      raise(Error(errc::bad_request, "CpuKvCache needs a cpu_memfd layout (paged_layout makes one)"));
    if (auto e = layout_.check()) raise(e.context("CpuKvCache"));
    auto kv = transfer::create_kv_memfd(layout_, {.name = std::move(name), .map = true});
    if (!kv) raise(kv.error());
    kv_ = std::move(*kv);
  }
  int fd() const { return kv_.fd.get(); }
  const wire::KvLayout& layout() const { return layout_; }
  std::byte* data() const { return kv_.memory.get(); }
  std::size_t size() const { return layout_.region_bytes; }

 private:
  wire::KvLayout layout_;
  transfer::KvMemfd kv_;
};

}  // namespace

void bind_kv(py::module_& m) {
  py::enum_<wire::KvBackend>(m, "KvBackend")
      .value("cpu_memfd", wire::KvBackend::cpu_memfd)
      .value("cuda_ipc", wire::KvBackend::cuda_ipc);
  py::enum_<wire::PagedOrder>(m, "PagedOrder", "Block order of each layer's paged KV tensor.")
      .value("planes_first", wire::PagedOrder::planes_first, "vLLM's [2, num_blocks, block_size, heads, head_size]")
      .value("blocks_first", wire::PagedOrder::blocks_first, "[num_blocks, 2, block_size, heads, head_size]");

  using wire::LayerLocation;
  Record<LayerLocation>(m, "LayerLocation", "Where one layer lives: a memfd offset (CPU) or a CUDA IPC handle.")
      .field("offset", &LayerLocation::offset)
      .property(
          "ipc_handle", [](const LayerLocation& l) { return to_bytes(l.ipc_handle.data(), l.ipc_handle.size()); },
          [](LayerLocation& l, const py::bytes& b) { l.ipc_handle = from_bytes(b); })
      .done();

  using wire::KvLayout;
  Record<KvLayout>(m, "KvLayout", "A worker's paged KV layout, described by strides in bytes (docs/adapters.md).")
      .field("backend", &KvLayout::backend)
      .field("num_layers", &KvLayout::num_layers)
      .field("num_blocks", &KvLayout::num_blocks)
      .field("block_size", &KvLayout::block_size, "tokens per block")
      .field("num_planes", &KvLayout::num_planes, "2: K and V; 1: MLA latent")
      .field("num_kv_heads", &KvLayout::num_kv_heads)
      .field("head_size", &KvLayout::head_size)
      .field("dtype_size", &KvLayout::dtype_size, "bytes per element")
      .field("block_stride", &KvLayout::block_stride, "bytes between block b and b+1 of a plane")
      .field("plane_stride", &KvLayout::plane_stride, "bytes between plane 0 and 1 of a block")
      .field("region_bytes", &KvLayout::region_bytes, "memfd size / bytes of each layer allocation")
      .property(
          "device_uuid", [](const KvLayout& l) { return to_bytes(l.device_uuid.data(), l.device_uuid.size()); },
          [](KvLayout& l, const py::bytes& b) {
            const std::string v = b;
            if (v.size() != l.device_uuid.size()) throw py::value_error("device_uuid is 16 bytes");
            std::memcpy(l.device_uuid.data(), v.data(), v.size());
          })
      .field("layers", &KvLayout::layers)
      .done()
      .def_property_readonly("block_bytes", &KvLayout::block_bytes, "bytes of one block of one plane of one layer")
      .def(
          "check",
          [](const KvLayout& l) {
            if (auto e = l.check()) raise(e);
          },
          "Raises kvlink.Error (bad_request) naming what is wrong with the layout.");

  m.def("paged_layout", &wire::paged_layout, py::arg("num_layers"), py::arg("num_blocks"), py::arg("block_size"),
        py::arg("num_kv_heads"), py::arg("head_size"), py::arg("dtype_size"),
        py::arg("order") = wire::PagedOrder::planes_first,
        "The cpu_memfd layout of a paged K/V cache, every layer one after the other in one region.");

  py::class_<CpuKvCache>(m, "_CpuKvCache", py::buffer_protocol())
      .def(py::init<wire::KvLayout, std::string>(), py::arg("layout"), py::arg("name") = "kvlink-kv")
      .def_property_readonly("fd", &CpuKvCache::fd, "the sealed memfd: register_kv_caches(layout, fd)")
      .def_property_readonly("layout", &CpuKvCache::layout)
      .def_property_readonly("nbytes", &CpuKvCache::size)
      .def_buffer([](CpuKvCache& c) {
        return py::buffer_info(c.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(c.size())}, {1}, /*readonly=*/false);
      });

#ifdef KVLINK_HAVE_CUDA
  m.attr("have_cuda") = true;
  m.def(
      "_export_kv_cache",
      [](std::vector<std::uintptr_t> layers, std::uint32_t num_blocks, std::uint32_t block_size,
         std::uint32_t num_kv_heads, std::uint32_t head_size, std::uint32_t dtype_size, std::uint32_t num_planes,
         std::uint64_t block_stride, std::uint64_t plane_stride) {
        transfer::cuda::PagedKvCache cache;
        for (auto p : layers) cache.layers.push_back(reinterpret_cast<const void*>(p));
        cache.num_blocks = num_blocks;
        cache.block_size = block_size;
        cache.num_kv_heads = num_kv_heads;
        cache.head_size = head_size;
        cache.dtype_size = dtype_size;
        cache.num_planes = num_planes;
        cache.block_stride = block_stride;
        cache.plane_stride = plane_stride;
        Result<KvLayout> r = [&] {
          py::gil_scoped_release release;  // CUDA calls may wait on the driver
          return transfer::cuda::export_kv_cache(cache);
        }();
        if (!r) raise(r.error());
        return std::move(*r);
      },
      py::arg("layers"), py::arg("num_blocks"), py::arg("block_size"), py::arg("num_kv_heads"), py::arg("head_size"),
      py::arg("dtype_size"), py::arg("num_planes"), py::arg("block_stride"), py::arg("plane_stride"));

  using transfer::cuda::EngineEvent;
  py::class_<EngineEvent>(m, "EngineEvent",
                          "An interprocess CUDA event: record it on the stream that wrote (or will read) the blocks "
                          "right before each store / retrieve, and pass handle as the TransferSpec's engine_event.")
      .def(py::init([] {
        auto e = std::make_unique<EngineEvent>();
        if (auto err = e->create()) raise(err);
        return e;
      }))
      .def(
          "record",
          [](EngineEvent& e, std::uintptr_t stream) {
            if (auto err = e.record(reinterpret_cast<cudaStream_t>(stream))) raise(err);
          },
          py::arg("stream"), "cudaEventRecord on the stream (torch: torch.cuda.current_stream().cuda_stream).")
      .def_property_readonly("handle",
                             [](const EngineEvent& e) { return to_bytes(e.handle().data(), e.handle().size()); });
#else
  m.attr("have_cuda") = false;
#endif
}

}  // namespace kvlink::python
