#include "kvlink/transfer/cuda_engine.hpp"

#include <cuda_runtime_api.h>

#include <asio/execution/outstanding_work.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <algorithm>
#include <bit>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <vector>

#include "cuda_kernels.hpp"
#include "cuda_util.hpp"
#include "kvlink/error.hpp"
#include "kvlink/log.hpp"
#include "kvlink/transfer/cpu_copy.hpp"
#include "kvlink/transfer/cuda_plan.hpp"

namespace kvlink::transfer {

Result<int> cuda_device_count() {
  int n = 0;
  if (auto e = cudaGetDeviceCount(&n); e != cudaSuccess) {
    cudaGetLastError();  // not sticky; leave no error behind
    return cuda::failure("cudaGetDeviceCount", e);
  }
  if (n <= 0) return Error(errc::not_found, "cudaGetDeviceCount found no CUDA device");
  return n;
}

namespace {

using cuda::error;
using cuda::failure;

// A descriptor table for the kernel method: pinned host staging and its
// device copy, reused across jobs (returned when a job's copy completed).
struct DescriptorBuffer {
  void* host = nullptr;
  void* device = nullptr;
  std::size_t capacity = 0;
};

// One device's streams and buffers. Shared by the engine, registrations on
// the device and jobs in flight; released on the io thread or the thread
// destroying the engine, never in a stream callback.
struct Device {
  int ordinal = 0;
  int sms = 1;
  cuda::Uuid uuid{};
  std::vector<cudaStream_t> store_streams, retrieve_streams;
  std::size_t next_store = 0, next_retrieve = 0;
  std::vector<DescriptorBuffer> free_buffers;
  std::int64_t l1_offset = 0;  // device address of mapped L1 minus its host address
  bool l1_offset_known = false;
  // Set once a failed copy left the context answering every call with an
  // error (a sticky fault: illegal address, ECC, Xid...): why. Nothing on
  // this device copies again until the server restarts.
  Error fault;

  ~Device() {
    if (cudaSetDevice(ordinal) != cudaSuccess) return;
    for (auto* list : {&store_streams, &retrieve_streams})
      for (cudaStream_t s : *list) {
        cudaStreamSynchronize(s);
        cudaStreamDestroy(s);
      }
    for (auto& b : free_buffers) {
      cudaFreeHost(b.host);
      cudaFree(b.device);
    }
  }

  Error create_streams(unsigned per_direction) {
    if (auto e = cudaSetDevice(ordinal); e != cudaSuccess) return failure("cudaSetDevice", ordinal, e);
    int least = 0, greatest = 0;  // numerically: greatest is the highest priority
    if (auto e = cudaDeviceGetStreamPriorityRange(&least, &greatest); e != cudaSuccess)
      return failure("cudaDeviceGetStreamPriorityRange", ordinal, e);
    for (unsigned i = 0; i < per_direction; ++i) {
      cudaStream_t s = nullptr;
      if (auto e = cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, least); e != cudaSuccess)
        return failure("cudaStreamCreateWithPriority (store)", ordinal, e);
      store_streams.push_back(s);
      // Retrieves feed a forward step that is waiting: highest priority.
      if (auto e = cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest); e != cudaSuccess)
        return failure("cudaStreamCreateWithPriority (retrieve)", ordinal, e);
      retrieve_streams.push_back(s);
    }
    return {};
  }

  // After a failure: does the context still work? A sticky error makes
  // every call fail, a cheap non-blocking one included. Sets `fault` (and
  // logs it, once) when it does not.
  void check_context() {
    if (fault) return;
    cudaError_t e = cudaSetDevice(ordinal);
    if (e == cudaSuccess && !store_streams.empty()) e = cudaStreamQuery(store_streams.front());
    if (e == cudaSuccess || e == cudaErrorNotReady) return;
    fault = Error(errc::server_error,
                  error("the server's CUDA context", ordinal, e) +
                      ": it is lost and no copy on this device can work again; restart kvlink-server");
    log::error("kvlink-server: CUDA device {} ({}): {}", ordinal, cuda::uuid_string(uuid), fault.message());
  }

  cudaStream_t next_stream(Direction d) {
    if (d == Direction::store) return store_streams[next_store++ % store_streams.size()];
    return retrieve_streams[next_retrieve++ % retrieve_streams.size()];
  }

  // A buffer of at least `bytes` (called with this device current).
  Result<DescriptorBuffer> acquire(std::size_t bytes) {
    auto it = std::find_if(free_buffers.begin(), free_buffers.end(), [&](auto& b) { return b.capacity >= bytes; });
    if (it != free_buffers.end()) {
      DescriptorBuffer b = *it;
      free_buffers.erase(it);
      return b;
    }
    DescriptorBuffer b;
    b.capacity = std::max<std::size_t>(std::bit_ceil(bytes), 64u << 10);
    if (auto e = cudaHostAlloc(&b.host, b.capacity, cudaHostAllocPortable); e != cudaSuccess)
      return failure("cudaHostAlloc (copy descriptors)", ordinal, e);
    if (auto e = cudaMalloc(&b.device, b.capacity); e != cudaSuccess) {
      cudaFreeHost(b.host);
      return failure("cudaMalloc (copy descriptors)", ordinal, e);
    }
    return b;
  }
};

// A registration's opened IPC memory and events.
struct CudaRegistration final : EngineState {
  std::shared_ptr<Device> device;
  std::vector<void*> opened;                // one per distinct memory handle
  std::vector<DeviceAllocation> layers;     // one per layer, into `opened`
  std::map<std::array<std::byte, CUDA_IPC_HANDLE_SIZE>, cudaEvent_t> events;  // the engine's IPC events

  ~CudaRegistration() override {
    if (cudaSetDevice(device->ordinal) != cudaSuccess) return;
    for (auto& [handle, ev] : events) cudaEventDestroy(ev);
    for (void* p : opened)
      if (auto e = cudaIpcCloseMemHandle(p); e != cudaSuccess)
        log::warn("kvlink-server: {}", error("cudaIpcCloseMemHandle", device->ordinal, e));
  }

  // The engine's event for `bytes` (an IPC event handle), opened once.
  Result<cudaEvent_t> event(const wire::Bytes& bytes) {
    std::array<std::byte, CUDA_IPC_HANDLE_SIZE> key{};
    if (bytes.size() != key.size())
      return Error(errc::bad_request,
                   fmt::format("engine_event is {} bytes; a CUDA IPC event handle (cudaIpcGetEventHandle of an event "
                               "created with cudaEventInterprocess | cudaEventDisableTiming) is {}",
                               bytes.size(), key.size()));
    std::memcpy(key.data(), bytes.data(), key.size());
    if (auto it = events.find(key); it != events.end()) return it->second;
    // An engine records into a few events; more distinct ones than this
    // means it creates one per step: drop the oldest opened (destroying an
    // event a stream still waits on is safe).
    constexpr std::size_t max_events = 64;
    if (events.size() >= max_events) {
      cudaEventDestroy(events.begin()->second);
      events.erase(events.begin());
    }
    cudaIpcEventHandle_t h;
    std::memcpy(&h, key.data(), sizeof h);
    cudaEvent_t ev = nullptr;
    if (auto e = cudaIpcOpenEventHandle(&ev, h); e != cudaSuccess)
      return Error(errc::bad_request,
                   error("cudaIpcOpenEventHandle", device->ordinal, e) +
                       "; the engine_event must come from cudaIpcGetEventHandle in the live engine process");
    events.emplace(key, ev);
    return ev;
  }
};

// One job in flight. Owned by the stream callback while the GPU works,
// then by the completion posted to the io_context (so it is destroyed
// there: releasing the registration can close IPC handles, which a stream
// callback must not).
struct JobState {
  TransferJob job;
  TransferDone done;
  asio::any_io_executor work;  // tracked: io_context::run() waits for us
  std::shared_ptr<Device> device;
  std::vector<CopySegment> plan;
  DescriptorBuffer buffer;  // kernel method
  // Batch method: the call's arrays (kept until completion, though the
  // call reads them before it returns).
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<std::size_t> sizes;
  Error enqueue_error;  // queued work exists but something after it failed
  cudaError_t status = cudaSuccess;
  TimePoint ended{};  // when the stream callback ran: the copy was done by then
};

const char* op_name(Direction d) { return d == Direction::store ? "STORE" : "RETRIEVE"; }

void finish(const std::shared_ptr<JobState>& js) {
  if (js->buffer.host) js->device->free_buffers.push_back(std::exchange(js->buffer, {}));
  std::error_code ec;
  if (js->status != cudaSuccess || js->enqueue_error) {
    std::string why = js->enqueue_error.message();
    if (js->status != cudaSuccess) {
      // A device fault (e.g. cudaErrorIllegalAddress) poisons the whole
      // context: every later call fails with it too.
      why = error("the copy", js->device->ordinal, js->status) +
            "; if every later copy fails the same way the server's CUDA context is lost: restart kvlink-server";
    }
    log::warn("kvlink-server: {} copy of {} chunk(s) failed: {}", op_name(js->job.direction), js->job.chunks.size(),
              why);
    js->device->check_context();
    ec = errc::server_error;
  } else if (js->ended >= js->job.fence) {
    // The engine may have reused its blocks by now: a store's bytes may be
    // reused ones (discarded), a retrieve may have written late (its blocks
    // count as not loaded). A queued GPU copy cannot be stopped; it can
    // only be reported.
    log::warn("kvlink-server: {} copy ended {} us after the request's fence; reported as timed out",
              op_name(js->job.direction),
              std::chrono::duration_cast<std::chrono::microseconds>(js->ended - js->job.fence).count());
    ec = errc::timed_out;
  }
  js->done(ec);
}

// Stream callback: no CUDA calls here, only hand the job to the io thread.
// cudaStreamAddCallback (not cudaLaunchHostFunc) because it also runs, with
// the error, after a device fault, so a failed copy is reported, not lost.
void CUDART_CB on_stream_done(cudaStream_t, cudaError_t status, void* p) {
  std::shared_ptr<JobState> js(static_cast<JobState*>(p));
  js->status = status;
  js->ended = Clock::now();
  asio::any_io_executor ex = js->work;
  asio::post(ex, [js = std::move(js)] { finish(js); });
}

}  // namespace

struct CudaTransferEngine::Impl {
  asio::any_io_executor completions;
  CudaEngineConfig config;
  std::vector<std::shared_ptr<Device>> devices;  // by ordinal; created on first use
  std::vector<cuda::Uuid> uuids;                 // by ordinal
  std::byte* l1_base = nullptr;
  std::uint64_t l1_bytes = 0;

  Result<std::shared_ptr<Device>> device(int ordinal) {
    if (!devices[ordinal]) {
      auto d = std::make_shared<Device>();
      d->ordinal = ordinal;
      d->uuid = uuids[ordinal];
      if (auto e = cudaSetDevice(ordinal); e != cudaSuccess) return failure("cudaSetDevice", ordinal, e);
      if (auto e = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, ordinal); e != cudaSuccess)
        return failure("cudaDeviceGetAttribute(MultiProcessorCount)", ordinal, e);
      if (auto err = d->create_streams(config.streams_per_direction)) return err;
      devices[ordinal] = std::move(d);
    }
    return devices[ordinal];
  }

  // L1's device-side address on `d` (kernel method), once L1 is pinned.
  Error map_l1(Device& d) {
    if (d.l1_offset_known || !l1_base) return {};
    if (auto e = cudaSetDevice(d.ordinal); e != cudaSuccess) return failure("cudaSetDevice", d.ordinal, e);
    void* dev = nullptr;
    if (auto e = cudaHostGetDevicePointer(&dev, l1_base, 0); e != cudaSuccess)
      return failure("cudaHostGetDevicePointer (L1)", d.ordinal, e);
    d.l1_offset = reinterpret_cast<std::intptr_t>(dev) - reinterpret_cast<std::intptr_t>(l1_base);
    d.l1_offset_known = true;
    return {};
  }

  std::uint64_t merge_limit() const {
    if (config.merge_limit) return config.merge_limit;
    return config.method == CudaCopyMethod::batch ? 4u << 20 : 256u << 10;
  }

  // Queues the copies of `js` (a job in `direction`; js.job is not set yet)
  // on `stream`.
  Error enqueue(JobState& js, Direction direction, cudaStream_t stream) {
    Device& d = *js.device;
    if (config.method == CudaCopyMethod::kernel) {
      const std::size_t bytes = js.plan.size() * sizeof(CopySegment);
      auto buffer = d.acquire(bytes);
      if (!buffer) return buffer.error();
      js.buffer = *buffer;
      std::memcpy(js.buffer.host, js.plan.data(), bytes);
      if (auto e = cudaMemcpyAsync(js.buffer.device, js.buffer.host, bytes, cudaMemcpyHostToDevice, stream);
          e != cudaSuccess)
        return failure("cudaMemcpyAsync (copy descriptors)", d.ordinal, e);
      const unsigned grid = config.kernel_blocks ? config.kernel_blocks : static_cast<unsigned>(d.sms);
      if (auto e = cuda::launch_copy_segments(js.buffer.device, static_cast<std::uint32_t>(js.plan.size()), grid,
                                              config.kernel_threads, stream);
          e != cudaSuccess) {
        js.enqueue_error = failure("the copy kernel's launch", d.ordinal, e);
        return {};  // the descriptor copy is queued: the callback must still run
      }
      return {};
    }
    const std::size_t n = js.plan.size();
    js.dsts.resize(n);
    js.srcs.resize(n);
    js.sizes.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      js.dsts[i] = reinterpret_cast<void*>(js.plan[i].dst);
      js.srcs[i] = reinterpret_cast<const void*>(js.plan[i].src);
      js.sizes[i] = js.plan[i].bytes;
    }
    cudaMemcpyAttributes attr{};
    const bool any_order = config.batch_retrieve_any_order && direction == Direction::retrieve;
    attr.srcAccessOrder = any_order ? cudaMemcpySrcAccessOrderAny : cudaMemcpySrcAccessOrderStream;
    attr.flags = config.batch_overlap_hint ? cudaMemcpyFlagPreferOverlapWithCompute : cudaMemcpyFlagDefault;
    if (config.batch_location_hints) {
      const cudaMemLocation host{cudaMemLocationTypeHost, 0}, device{cudaMemLocationTypeDevice, d.ordinal};
      const bool store = direction == Direction::store;
      attr.srcLocHint = store ? device : host;
      attr.dstLocHint = store ? host : device;
    }
    std::size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    auto e = cudaMemcpyBatchAsync(js.dsts.data(), js.srcs.data(), js.sizes.data(), n, &attr, &attr_index, 1, stream);
#else
    std::size_t failed = 0;
    auto e = cudaMemcpyBatchAsync(js.dsts.data(), const_cast<void**>(js.srcs.data()), js.sizes.data(), n, &attr,
                                  &attr_index, 1, &failed, stream);
#endif
    if (e != cudaSuccess) return failure("cudaMemcpyBatchAsync", d.ordinal, e);
    return {};
  }
};

CudaTransferEngine::CudaTransferEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<CudaTransferEngine>> CudaTransferEngine::create(asio::any_io_executor completions,
                                                                       CudaEngineConfig config) {
  auto found = cuda_device_count();
  if (!found) return Error(found.error()).context("no CUDA device");
  const int count = *found;
  config.streams_per_direction = std::max(config.streams_per_direction, 1u);
  config.kernel_threads = std::clamp(config.kernel_threads, 32u, 1024u) / 32 * 32;
  auto impl = std::make_unique<Impl>();
  impl->completions = std::move(completions);
  impl->config = config;
  impl->devices.resize(static_cast<std::size_t>(count));
  impl->uuids.resize(static_cast<std::size_t>(count));
  for (int d = 0; d < count; ++d) {
    auto uuid = cuda::device_uuid(d);
    if (!uuid) return uuid.error();
    impl->uuids[d] = *uuid;
  }
  return std::unique_ptr<CudaTransferEngine>(new CudaTransferEngine(std::move(impl)));
}

CudaTransferEngine::~CudaTransferEngine() {
  // Streams drain (their callbacks post the completions) as each device
  // held only by the engine is destroyed; jobs still queued on the
  // io_context keep theirs until they run or the io_context is destroyed.
  for (auto& d : impl_->devices) {
    if (!d) continue;
    if (cudaSetDevice(d->ordinal) != cudaSuccess) continue;
    for (auto* list : {&d->store_streams, &d->retrieve_streams})
      for (cudaStream_t s : *list) cudaStreamSynchronize(s);
  }
  impl_->devices.clear();
  if (impl_->l1_base) {
    if (auto e = cudaHostUnregister(impl_->l1_base); e != cudaSuccess)
      log::debug("kvlink-server: {}", error("cudaHostUnregister (L1)", e));
  }
}

const CudaEngineConfig& CudaTransferEngine::config() const { return impl_->config; }
int CudaTransferEngine::devices() const { return static_cast<int>(impl_->devices.size()); }

Error CudaTransferEngine::attach(Registration& reg, UniqueFd fd) {
  fd.reset();
  const wire::KvLayout& l = reg.layout;
  if (l.backend != wire::KvBackend::cuda_ipc)
    return Error(
        errc::bad_request,
        "the CUDA transfer engine takes cuda_ipc layouts only (register a cpu_memfd layout with a CPU server)");
  // The device with the registered UUID.
  int ordinal = -1;
  for (std::size_t d = 0; d < impl_->uuids.size(); ++d)
    if (impl_->uuids[d] == l.device_uuid) ordinal = static_cast<int>(d);
  if (ordinal < 0) {
    std::string seen;
    for (std::size_t d = 0; d < impl_->uuids.size(); ++d)
      seen += fmt::format("{}{}: {}", d ? ", " : "", d, cuda::uuid_string(impl_->uuids[d]));
    return Error(errc::bad_request,
                 fmt::format("the KV cache is on CUDA device {}, which this server does not see (it sees {}); run the "
                             "server on the engine's host with that GPU visible (CUDA_VISIBLE_DEVICES)",
                             cuda::uuid_string(l.device_uuid), seen));
  }
  auto opened_device = impl_->device(ordinal);
  if (!opened_device) return opened_device.error();
  const std::shared_ptr<Device>& device = *opened_device;
  if (auto e = cudaSetDevice(ordinal); e != cudaSuccess) return failure("cudaSetDevice", ordinal, e);

  auto state = std::make_shared<CudaRegistration>();
  state->device = device;
  // Layers often share one allocation: open each distinct handle once.
  std::map<wire::Bytes, std::size_t> by_handle;
  std::vector<std::uint64_t> sizes;
  std::uint64_t blocks_span = 0;  // bytes of one layer's tensor (KvLayout::check bounds it)
  blocks_span = std::uint64_t{l.num_blocks - 1} * l.block_stride + std::uint64_t{l.num_planes - 1} * l.plane_stride +
                l.block_bytes();
  for (std::uint32_t i = 0; i < l.num_layers; ++i) {
    const wire::Bytes& h = l.layers[i].ipc_handle;
    if (h.size() != sizeof(cudaIpcMemHandle_t))
      return Error(errc::bad_request,
                   fmt::format("layer {}: ipc_handle is {} bytes; a CUDA IPC memory handle (cudaIpcGetMemHandle) is {}",
                               i, h.size(), sizeof(cudaIpcMemHandle_t)));
    auto [it, fresh] = by_handle.emplace(h, state->opened.size());
    if (fresh) {
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, h.data(), sizeof handle);
      void* p = nullptr;
      if (auto e = cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
        cudaGetLastError();
        return Error(
            errc::bad_request,
            fmt::format("layer {}: {}; the handle must come from cudaIpcGetMemHandle in a live engine process "
                        "(not this server) whose memory is still allocated with cudaMalloc (not cudaMallocAsync "
                        "or cuMemCreate)",
                        i, error("cudaIpcOpenMemHandle", ordinal, e)));
      }
      state->opened.push_back(p);
      auto range = cuda::allocation_range(p);
      if (!range) return Error(range.error()).context(fmt::format("layer {}", i));
      // The handle names an allocation; p is where it was opened.
      sizes.push_back(range->base + range->size - reinterpret_cast<std::uintptr_t>(p));
    }
    const std::uint64_t size = sizes[it->second];
    const std::uint64_t off = l.layers[i].offset;
    if (off > size || size - off < blocks_span)
      return Error(
          errc::bad_request,
          fmt::format("layer {}: the layout needs {} bytes from offset {} but the shared allocation is {} bytes; "
                      "the registered shape or strides do not match the tensor",
                      i, blocks_span, off, size));
    state->layers.push_back({reinterpret_cast<std::uintptr_t>(state->opened[it->second]), size});
  }
  reg.engine_state = std::move(state);
  log::info("kvlink-server: KV cache of {} layers opened on CUDA device {} ({}), {} allocation(s)", l.num_layers,
            ordinal, cuda::uuid_string(l.device_uuid), by_handle.size());
  return {};
}

Error CudaTransferEngine::use_l1(const Registration& reg, std::byte* base, std::uint64_t bytes) {
  if (impl_->l1_base && impl_->l1_base != base)
    return Error(errc::server_error, "L1 moved after it was pinned (internal error: L1 is mapped once)");
  if (!impl_->l1_base) {
    if (auto e = cudaHostRegister(base, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped); e != cudaSuccess) {
      cudaGetLastError();
      return Error(errc::server_error, error("cudaHostRegister of L1", e) +
                                           fmt::format(" ({} bytes); lower --l1-size or raise the locked-memory limit",
                                                       bytes));
    }
    impl_->l1_base = base;
    impl_->l1_bytes = bytes;
    log::info("kvlink-server: L1 ({} bytes) pinned for CUDA copies", bytes);
  }
  auto* state = dynamic_cast<CudaRegistration*>(reg.engine_state.get());
  if (state && impl_->config.method == CudaCopyMethod::kernel)
    if (auto err = impl_->map_l1(*state->device)) return err;
  return {};
}

void CudaTransferEngine::submit(TransferJob job, TransferDone done) {
  auto fail = [&](const std::string& why) {
    log::warn("kvlink-server: {} copy of {} chunk(s) not started: {}", op_name(job.direction), job.chunks.size(), why);
    asio::post(impl_->completions, [done = std::move(done)] { done(errc::server_error); });
  };
  if (Clock::now() >= job.fence) {  // the engine may reuse the blocks already
    asio::post(impl_->completions, [done = std::move(done)] { done(errc::timed_out); });
    return;
  }
  auto* state = job.registration ? dynamic_cast<CudaRegistration*>(job.registration->engine_state.get()) : nullptr;
  if (!state) return fail("the KV cache was not opened by the CUDA engine");
  if (!impl_->l1_base) return fail("L1 is not pinned");
  Device& d = *state->device;
  if (d.fault) return fail(d.fault.message());
  if (impl_->config.method == CudaCopyMethod::kernel && !d.l1_offset_known) return fail("L1 is not mapped on the device");

  auto js = std::make_unique<JobState>();
  js->device = state->device;
  const PlanOptions options{impl_->config.method == CudaCopyMethod::kernel ? d.l1_offset : 0, impl_->merge_limit()};
  if (auto err = plan_copies(job, state->layers, options, js->plan)) return fail(err.message());
  if (js->plan.empty()) {  // e.g. a retrieve skipping every token
    asio::post(impl_->completions, [done = std::move(done)] { done({}); });
    return;
  }
  if (auto e = cudaSetDevice(d.ordinal); e != cudaSuccess) {
    d.check_context();
    return fail(error("cudaSetDevice", d.ordinal, e));
  }
  const cudaStream_t stream = d.next_stream(job.direction);
  if (!job.engine_event.empty()) {
    auto ev = state->event(job.engine_event);
    if (!ev) return fail(ev.error().message());
    if (auto e = cudaStreamWaitEvent(stream, *ev, 0); e != cudaSuccess)
      return fail(error("cudaStreamWaitEvent (the engine's event)", d.ordinal, e));
  }
  // Nothing is queued before this point, so failures above need no callback.
  if (auto err = impl_->enqueue(*js, job.direction, stream)) {
    if (js->buffer.host) d.free_buffers.push_back(js->buffer);  // nothing reads it: its copy was not queued
    d.check_context();
    return fail(err.message());
  }
  js->job = std::move(job);
  js->done = std::move(done);
  js->work = asio::prefer(impl_->completions, asio::execution::outstanding_work.tracked);
  if (auto e = cudaStreamAddCallback(stream, on_stream_done, js.get(), 0); e != cudaSuccess) {
    // Queued copies may still read the descriptor buffer: never reuse it.
    js->buffer = {};
    js->enqueue_error =
        Error(errc::server_error, error("cudaStreamAddCallback", d.ordinal, e) + "; the copy may still be running");
    std::shared_ptr<JobState> owned(std::move(js));
    asio::post(owned->work, [owned] { finish(owned); });
    return;
  }
  js.release();  // owned by on_stream_done now
}

Error CudaTransferEngine::fault(const Registration& reg) const {
  auto* state = dynamic_cast<const CudaRegistration*>(reg.engine_state.get());
  return state && state->device ? state->device->fault : Error{};
}

}  // namespace kvlink::transfer
