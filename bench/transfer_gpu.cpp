// bench-transfer-gpu: the GPU KV data path (PERF.md "KV data path", GPU
// rows). Two processes, as in production: a child forked before any CUDA
// call plays the engine (paged KV tensors from cudaMalloc, exported with
// CUDA IPC, and a compute kernel loop on demand); this process plays the
// server side and drives transfer::CudaTransferEngine directly (attach,
// pinned L1, submit; completions on an io_context run here), so figures
// are the engine's, without sockets.
//
// Reference, measured in the same run: the copy ceiling C, one 128 MiB
// cudaMemcpyAsync between the same pinned L1 and device memory, each way.
// Figures: store (device to host) and retrieve (host to device) GB/s for
// 32 KiB fragments (32 layers x K,V x 16-token blocks of 8 heads x 128 x 2
// bytes) and 8 KiB fragments (2 heads: a tensor-parallel shard), with
// scattered block ids (no two neighbours merge), 4 chunks (128 / 32 MiB)
// per job and 4 jobs in flight; stores and retrieves together against
// C_d2h + C_h2d; and the engine process's compute loop slowed by copies
// running meanwhile. Each figure for both copy methods (one
// cudaMemcpyBatchAsync, or one kernel launch per job). The bidirectional
// ceiling (one such copy each way at once) is reported beside 2 x C.
//
// --sweep instead prints each figure for engine settings around the
// defaults (streams, the batch call's hints, kernel blocks): how the
// defaults were chosen.
//
// Without a usable CUDA device it prints why and exits 0.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <asio/io_context.hpp>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../test/gpu/gpu_kernels.hpp"
#include "kvlink/log.hpp"
#include "kvlink/transfer/cuda_engine.hpp"
#include "kvlink/transfer/cuda_export.hpp"

namespace {

namespace wire = kvlink::wire;
namespace transfer = kvlink::transfer;
using kvlink::errc;
using kvlink::Error;
using kvlink::Result;
using Clock = std::chrono::steady_clock;

constexpr std::uint32_t layers = 32, block_size = 16, head_size = 128, dtype = 2;
constexpr std::uint32_t chunk_tokens = 256, blocks_per_chunk = chunk_tokens / block_size;
constexpr std::uint32_t chunks_per_job = 4, jobs_in_flight = 4;
constexpr std::uint32_t num_blocks = blocks_per_chunk * chunks_per_job * jobs_in_flight * 2;  // stores + retrieves
constexpr std::uint64_t ceiling_bytes = 128ull << 20;

std::uint64_t block_bytes(std::uint32_t heads) { return std::uint64_t{block_size} * heads * head_size * dtype; }
std::uint64_t chunk_bytes(std::uint32_t heads) { return std::uint64_t{layers} * 2 * blocks_per_chunk * block_bytes(heads); }

// ---- the engine process ------------------------------------------------------------

std::string to_hex(const wire::Bytes& b) {
  std::string s;
  for (std::byte x : b) s += fmt::format("{:02x}", static_cast<unsigned>(x));
  return s;
}

bool from_hex(const std::string& s, wire::Bytes& out) {
  if (s.size() % 2) return false;
  out.resize(s.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::byte>(std::stoul(s.substr(2 * i, 2), nullptr, 16));
  return true;
}

bool read_line(int fd, std::string& line) {
  line.clear();
  char c = 0;
  while (::read(fd, &c, 1) == 1) {
    if (c == '\n') return true;
    line += c;
  }
  return false;
}

void write_line(int fd, const std::string& line) {
  const std::string s = line + "\n";
  std::size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n <= 0) return;
    done += static_cast<std::size_t>(n);
  }
}

// First line: "ok HEX32 HEX8" (the two exported layouts) or "nogpu WHY".
// Then "compute MS" runs the compute loop (its launch count fixed by the
// first call to take about MS) and answers "ms ELAPSED"; EOF ends it.
int engine_process(int in, int out) {
  if (auto count = transfer::cuda_device_count(); !count) {
    write_line(out, "nogpu " + count.error().message());
    return 0;
  }
  std::vector<void*> allocations;
  auto make = [&](std::uint32_t heads) -> Result<wire::KvLayout> {
    transfer::cuda::PagedKvCache c;
    for (std::uint32_t l = 0; l < layers; ++l) {
      void* p = nullptr;
      if (auto e = cudaMalloc(&p, 2 * block_bytes(heads) * num_blocks); e != cudaSuccess)
        return Error(errc::server_error, fmt::format("cudaMalloc: {}", cudaGetErrorString(e)));
      cudaMemset(p, 0x11, 2 * block_bytes(heads) * num_blocks);
      allocations.push_back(p);
      c.layers.push_back(p);
    }
    c.num_blocks = num_blocks;
    c.block_size = block_size;
    c.num_kv_heads = heads;
    c.head_size = head_size;
    c.dtype_size = dtype;
    return transfer::cuda::export_kv_cache(c);
  };
  auto l32 = make(8);
  if (!l32) {
    write_line(out, "nogpu engine process: " + l32.error().message());
    return 1;
  }
  auto l8 = make(2);
  if (!l8) {
    write_line(out, "nogpu engine process: " + l8.error().message());
    return 1;
  }
  if (cudaDeviceSynchronize() != cudaSuccess) return 1;
  write_line(out, "ok " + to_hex(wire::encode(*l32)) + " " + to_hex(wire::encode(*l8)));

  constexpr std::size_t n = 1u << 22;
  void* buffer = nullptr;
  cudaStream_t stream = nullptr;
  if (cudaMalloc(&buffer, n * sizeof(float)) != cudaSuccess || cudaStreamCreate(&stream) != cudaSuccess) return 1;
  auto* data = static_cast<float*>(buffer);
  cudaMemset(data, 0, n * sizeof(float));
  int launches = 0;
  std::string line;
  while (read_line(in, line)) {
    if (line.rfind("compute ", 0) != 0) continue;
    const double target_ms = std::stod(line.substr(8));
    if (launches == 0) {  // calibrate once: the same work every time after
      const auto t0 = Clock::now();
      for (int i = 0; i < 10; ++i) kvlink::gpu_test::launch_compute(data, n, 256, stream);
      cudaStreamSynchronize(stream);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / 10;
      launches = std::max(10, static_cast<int>(target_ms / std::max(ms, 1e-3)));
    }
    const auto t0 = Clock::now();
    for (int i = 0; i < launches; ++i) kvlink::gpu_test::launch_compute(data, n, 256, stream);
    const cudaError_t e = cudaStreamSynchronize(stream);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    write_line(out, e == cudaSuccess ? fmt::format("ms {} launches {}", ms, launches)
                                     : fmt::format("error {}", cudaGetErrorString(e)));
  }
  for (void* p : allocations) cudaFree(p);
  return 0;
}

struct Child {
  pid_t pid = -1;
  int to = -1, from = -1;
};
Child g_child;

// ---- the server side -----------------------------------------------------------------

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Figures {
  std::map<std::string, double> gbps;  // name -> GB/s, median run
  std::map<std::string, double> slowdown;
};
Figures g_fig;

struct Server {
  wire::KvLayout layout32, layout8;
  std::byte* l1 = nullptr;
  std::uint64_t l1_bytes = 0;
  void* device_buffer = nullptr;  // for the ceilings: 2 x ceiling_bytes
  cudaStream_t stream = nullptr, stream2 = nullptr;
  asio::io_context io;
  std::unique_ptr<transfer::CudaTransferEngine> engine;
  transfer::CudaEngineConfig config;
  std::shared_ptr<transfer::Registration> reg32, reg8;
  std::vector<std::uint32_t> shuffled;  // block ids in a scattered order
  std::string error;

  ~Server() {
    reg32.reset();
    reg8.reset();
    engine.reset();
    if (device_buffer) cudaFree(device_buffer);
    if (stream) cudaStreamDestroy(stream);
    if (stream2) cudaStreamDestroy(stream2);
    if (l1) ::munmap(l1, l1_bytes);
  }

  std::shared_ptr<transfer::Registration> attach(const wire::KvLayout& l) {
    auto r = std::make_shared<transfer::Registration>();
    r->layout = l;
    r->blocks_per_chunk = blocks_per_chunk;
    r->slot_bytes = std::uint64_t{layers} * 2 * blocks_per_chunk * l.block_bytes();
    if (auto err = engine->attach(*r, {})) error = err.message();
    else if (auto err2 = engine->use_l1(*r, l1, l1_bytes)) error = err2.message();
    return r;
  }

  // The engine for `c` (one at a time: each opens the IPC handles itself).
  bool use(const transfer::CudaEngineConfig& c) {
    if (engine && same(config, c)) return error.empty();
    reg32.reset();
    reg8.reset();
    engine.reset();
    error.clear();
    auto created = transfer::CudaTransferEngine::create(io.get_executor(), c);
    if (!created) {
      error = created.error().message();
      return false;
    }
    engine = std::move(*created);
    config = c;
    reg32 = attach(layout32);
    if (error.empty()) reg8 = attach(layout8);
    return error.empty();
  }
  bool use(transfer::CudaCopyMethod m) {
    transfer::CudaEngineConfig c;
    c.method = m;
    return use(c);
  }
  static bool same(const transfer::CudaEngineConfig& a, const transfer::CudaEngineConfig& b) {
    return a.method == b.method && a.streams_per_direction == b.streams_per_direction &&
           a.kernel_blocks == b.kernel_blocks && a.kernel_threads == b.kernel_threads &&
           a.merge_limit == b.merge_limit && a.batch_overlap_hint == b.batch_overlap_hint &&
           a.batch_retrieve_any_order == b.batch_retrieve_any_order &&
           a.batch_location_hints == b.batch_location_hints;
  }

  transfer::TransferJob job(transfer::Direction d, const std::shared_ptr<transfer::Registration>& reg,
                            std::uint32_t index) const {
    // Job `index` of a direction: its own L1 slots and its own blocks.
    const std::uint32_t side = d == transfer::Direction::store ? 0 : 1;
    const std::uint32_t first_chunk = (side * jobs_in_flight + index % jobs_in_flight) * chunks_per_job;
    transfer::TransferJob j;
    j.direction = d;
    j.registration = reg;
    for (std::uint32_t c = 0; c < chunks_per_job; ++c) {
      transfer::ChunkCopy cc;
      cc.slot = l1 + std::uint64_t{first_chunk + c} * reg->slot_bytes;
      for (std::uint32_t b = 0; b < blocks_per_chunk; ++b)
        cc.block_ids.push_back(shuffled[(first_chunk + c) * blocks_per_chunk + b]);
      j.chunks.push_back(std::move(cc));
    }
    return j;
  }

  // Runs `total` jobs per listed direction, `jobs_in_flight` at a time each;
  // `keep_going` (if set) keeps submitting until it returns false. Returns
  // the seconds taken, or -1 on a failed copy (error set).
  double run(const std::vector<transfer::Direction>& dirs, const std::shared_ptr<transfer::Registration>& reg,
             std::uint32_t total, std::uint64_t* bytes = nullptr, const std::function<bool()>& keep_going = {}) {
    std::uint32_t submitted = 0, completed = 0;
    bool failed = false;
    std::function<void(transfer::Direction, std::uint32_t)> submit = [&](transfer::Direction d, std::uint32_t i) {
      ++submitted;
      engine->submit(job(d, reg, i), [&, d, i](std::error_code ec) {
        ++completed;
        if (ec) failed = true;
        const bool more = keep_going ? keep_going() : submitted < total * dirs.size();
        if (!failed && more) submit(d, i + jobs_in_flight);
      });
    };
    const auto t0 = Clock::now();
    for (auto d : dirs)
      for (std::uint32_t i = 0; i < jobs_in_flight; ++i) submit(d, i);
    io.restart();
    io.run();  // returns once no copy is in flight (each holds work on io)
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (bytes) *bytes = std::uint64_t{completed} * chunks_per_job * reg->slot_bytes;
    if (failed) {
      error = "a copy failed (see the log above)";
      return -1;
    }
    return s;
  }
};
Server* g_server = nullptr;

void BM_copy_ceiling(benchmark::State& state) {
  auto& s = *g_server;
  const bool d2h = state.range(0) == 0;
  std::vector<double> rates;
  cudaMemcpy(s.device_buffer, s.l1, ceiling_bytes, cudaMemcpyHostToDevice);  // untimed first
  for (auto _ : state) {
    const auto t0 = Clock::now();
    const auto e = d2h ? cudaMemcpyAsync(s.l1, s.device_buffer, ceiling_bytes, cudaMemcpyDeviceToHost, s.stream)
                       : cudaMemcpyAsync(s.device_buffer, s.l1, ceiling_bytes, cudaMemcpyHostToDevice, s.stream);
    if (e != cudaSuccess || cudaStreamSynchronize(s.stream) != cudaSuccess) {
      state.SkipWithError("cudaMemcpyAsync failed");
      return;
    }
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(sec);
    rates.push_back(static_cast<double>(ceiling_bytes) / sec / 1e9);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ceiling_bytes));
  g_fig.gbps[d2h ? "C_d2h" : "C_h2d"] = median(rates);
}

// range(0): method (0 batch, 1 kernel); range(1): 0 store, 1 retrieve, 2 both;
// range(2): kv heads (8: 32 KiB fragments, 2: 8 KiB).
void BM_transfer(benchmark::State& state) {
  auto& s = *g_server;
  const auto method = state.range(0) == 0 ? transfer::CudaCopyMethod::batch : transfer::CudaCopyMethod::kernel;
  if (!s.use(method)) {
    state.SkipWithError(s.error.c_str());
    return;
  }
  const auto& reg = state.range(2) == 8 ? s.reg32 : s.reg8;
  std::vector<transfer::Direction> dirs;
  if (state.range(1) != 1) dirs.push_back(transfer::Direction::store);
  if (state.range(1) != 0) dirs.push_back(transfer::Direction::retrieve);
  std::vector<double> rates;
  std::uint64_t total = 0;
  // Untimed first, so no figure includes first-touch costs (IOMMU and
  // page-table set-up of the pinned L1 and the opened IPC memory).
  if (s.run(dirs, reg, jobs_in_flight) < 0) {
    state.SkipWithError(s.error.c_str());
    return;
  }
  for (auto _ : state) {
    std::uint64_t bytes = 0;
    const double sec = s.run(dirs, reg, 4 * jobs_in_flight, &bytes);
    if (sec < 0) {
      state.SkipWithError(s.error.c_str());
      return;
    }
    state.SetIterationTime(sec);
    total += bytes;
    rates.push_back(static_cast<double>(bytes) / sec / 1e9);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(total));
  const char* what = state.range(1) == 0 ? "store" : state.range(1) == 1 ? "retrieve" : "bidirectional";
  g_fig.gbps[fmt::format("{} {} {}K", transfer::copy_method_name(method), what,
                         block_bytes(static_cast<std::uint32_t>(state.range(2))) >> 10)] = median(rates);
}

// The engine process's compute loop, alone (`with_copies` false) or with
// stores and retrieves running until it finishes: its time in ms, or -1.
double compute_ms(Server& s, bool with_copies) {
  write_line(g_child.to, "compute 1000");
  if (with_copies) {
    const double sec = s.run({transfer::Direction::store, transfer::Direction::retrieve}, s.reg32, 0, nullptr, [&] {
      pollfd p{g_child.from, POLLIN, 0};
      return ::poll(&p, 1, 0) == 0;  // until the engine answers
    });
    if (sec < 0) return -1;
  }
  std::string line;
  if (!read_line(g_child.from, line) || line.rfind("ms ", 0) != 0) return -1;
  return std::stod(line.substr(3));
}

// range(0): method.
void BM_overlap(benchmark::State& state) {
  auto& s = *g_server;
  const auto method = state.range(0) == 0 ? transfer::CudaCopyMethod::batch : transfer::CudaCopyMethod::kernel;
  if (!s.use(method)) {
    state.SkipWithError(s.error.c_str());
    return;
  }
  double alone = 1e30, together = 1e30;
  for (auto _ : state) {
    const double a = compute_ms(s, false), t = compute_ms(s, true);
    if (a < 0 || t < 0) {
      state.SkipWithError("the engine process's compute loop failed");
      return;
    }
    alone = std::min(alone, a);
    together = std::min(together, t);
    state.SetIterationTime((a + t) / 1e3);
  }
  state.counters["compute_alone_ms"] = alone;
  state.counters["compute_with_copies_ms"] = together;
  g_fig.slowdown[transfer::copy_method_name(method)] = together / alone - 1;
}

// Both ways at once, one ceiling_bytes copy each on its own stream: the
// bidirectional ceiling of this bus, reported beside 2 x C.
void BM_copy_ceiling_both(benchmark::State& state) {
  auto& s = *g_server;
  auto* device = static_cast<std::byte*>(s.device_buffer);
  std::vector<double> rates;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    const auto e1 = cudaMemcpyAsync(s.l1, device, ceiling_bytes, cudaMemcpyDeviceToHost, s.stream);
    const auto e2 = cudaMemcpyAsync(device + ceiling_bytes, s.l1 + ceiling_bytes, ceiling_bytes,
                                    cudaMemcpyHostToDevice, s.stream2);
    if (e1 != cudaSuccess || e2 != cudaSuccess || cudaStreamSynchronize(s.stream) != cudaSuccess ||
        cudaStreamSynchronize(s.stream2) != cudaSuccess) {
      state.SkipWithError("cudaMemcpyAsync failed");
      return;
    }
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(sec);
    rates.push_back(2.0 * static_cast<double>(ceiling_bytes) / sec / 1e9);
  }
  g_fig.gbps["C_both"] = median(rates);
}

// CPU time of this process (the server side: the CUDA driver calls and
// completions; the engine process is not counted).
double process_cpu_seconds() {
  timespec t{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

// --sweep: each figure for engine settings around the defaults (median of
// 5 runs; one compute-slowdown measurement each), to choose the defaults.
void sweep(Server& s) {
  struct Variant {
    std::string name;
    transfer::CudaEngineConfig config;
  };
  std::vector<Variant> variants;
  for (unsigned streams : {1u, 2u, 4u, 8u}) {
    transfer::CudaEngineConfig c;
    c.streams_per_direction = streams;
    variants.push_back({fmt::format("batch, {} streams", streams), c});
  }
  {
    transfer::CudaEngineConfig c;
    c.batch_overlap_hint = false;
    variants.push_back({"batch, no overlap hint", c});
    c = {};
    c.batch_retrieve_any_order = true;
    variants.push_back({"batch, retrieve any order", c});
    c = {};
    c.batch_location_hints = true;
    variants.push_back({"batch, location hints", c});
    c.batch_retrieve_any_order = true;
    variants.push_back({"batch, location hints, retrieve any order", c});
  }
  for (unsigned blocks : {0u, 32u, 16u, 8u, 4u}) {
    transfer::CudaEngineConfig c;
    c.method = transfer::CudaCopyMethod::kernel;
    c.kernel_blocks = blocks;
    variants.push_back({blocks ? fmt::format("kernel, {} blocks", blocks) : std::string("kernel, 1 block per SM"), c});
  }
  std::printf("\n| variant | store 32K | retrieve 32K | store 8K | retrieve 8K | both 32K | compute slowdown | "
              "server-side CPU, retrieve 8K |\n|---|---|---|---|---|---|---|---|\n");
  for (const auto& v : variants) {
    if (!s.use(v.config)) {
      std::printf("| %s | %s |\n", v.name.c_str(), s.error.c_str());
      continue;
    }
    s.run({transfer::Direction::store, transfer::Direction::retrieve}, s.reg32, jobs_in_flight);  // untimed first
    std::string row = "| " + v.name;
    struct Figure {
      std::vector<transfer::Direction> dirs;
      bool small;
    };
    const Figure figures[] = {{{transfer::Direction::store}, false},
                              {{transfer::Direction::retrieve}, false},
                              {{transfer::Direction::store}, true},
                              {{transfer::Direction::retrieve}, true},
                              {{transfer::Direction::store, transfer::Direction::retrieve}, false}};
    double cpu_share = 0;  // of the last figure measured with one direction: retrieve 8K
    for (const auto& f : figures) {
      std::vector<double> rates;
      double cpu = 0, wall = 0;
      for (int i = 0; i < 5; ++i) {
        std::uint64_t bytes = 0;
        const double cpu0 = process_cpu_seconds();
        const double sec = s.run(f.dirs, f.small ? s.reg8 : s.reg32, 4 * jobs_in_flight, &bytes);
        cpu += process_cpu_seconds() - cpu0;
        wall += sec;
        if (sec > 0) rates.push_back(static_cast<double>(bytes) / sec / 1e9);
      }
      if (f.small && f.dirs.front() == transfer::Direction::retrieve) cpu_share = cpu / wall;
      row += fmt::format(" | {:.2f}", median(rates));
    }
    const double a = compute_ms(s, false), t = compute_ms(s, true);
    row += a > 0 && t > 0 ? fmt::format(" | {:+.1f} %", (t / a - 1) * 100) : std::string(" | failed");
    row += fmt::format(" | {:.0f} % of a core |", cpu_share * 100);
    std::printf("%s\n", row.c_str());
    std::fflush(stdout);
  }
}

void print_summary(const std::string& device) {
  const double cd = g_fig.gbps["C_d2h"], ch = g_fig.gbps["C_h2d"];
  std::printf("\nGPU data path on %s: %u layers, %u-token blocks, %u chunks per job, %u jobs in flight per "
              "direction, scattered block ids\n",
              device.c_str(), layers, block_size, chunks_per_job, jobs_in_flight);
  std::printf("copy ceiling C (one %llu MiB cudaMemcpyAsync, pinned L1): d2h %.2f GB/s, h2d %.2f GB/s\n",
              static_cast<unsigned long long>(ceiling_bytes >> 20), cd, ch);
  if (g_fig.gbps.count("C_both"))
    std::printf("both ways at once (one such copy each way, two streams): %.2f GB/s = %.3f x (C_d2h + C_h2d)\n",
                g_fig.gbps["C_both"], g_fig.gbps["C_both"] / (cd + ch));
  std::printf("| method | figure | GB/s | reference | ratio | target | result |\n|---|---|---|---|---|---|---|\n");
  for (const char* m : {"batch", "kernel"}) {
    struct Row {
      const char* figure;
      std::string key;
      double ref;
      const char* ref_name;
      double target;
    };
    const Row rows[] = {
        {"gpu_store 32 KiB", fmt::format("{} store 32K", m), cd, "C_d2h", 0.95},
        {"gpu_retrieve 32 KiB", fmt::format("{} retrieve 32K", m), ch, "C_h2d", 0.95},
        {"gpu_small_fragments store 8 KiB", fmt::format("{} store 8K", m), cd, "C_d2h", 0.9},
        {"gpu_small_fragments retrieve 8 KiB", fmt::format("{} retrieve 8K", m), ch, "C_h2d", 0.9},
        {"gpu_bidirectional 32 KiB", fmt::format("{} bidirectional 32K", m), cd + ch, "C_d2h + C_h2d", 0.85},
    };
    for (const auto& r : rows) {
      auto it = g_fig.gbps.find(r.key);
      if (it == g_fig.gbps.end() || r.ref <= 0) continue;
      const double ratio = it->second / r.ref;
      std::printf("| %s | %s | %.2f | %s %.2f | %.3fx | >= %.2fx | %s |\n", m, r.figure, it->second, r.ref_name, r.ref,
                  ratio, r.target, ratio >= r.target ? "pass" : "FAIL");
    }
    if (auto it = g_fig.slowdown.find(m); it != g_fig.slowdown.end())
      std::printf("| %s | gpu_overlap (compute slowdown) | | compute alone | %+.1f %% | <= 2 %% | %s |\n", m,
                  it->second * 100, it->second <= 0.02 ? "pass" : "FAIL");
  }
}

}  // namespace

int main(int argc, char** argv) {
  // The engine process first, before this process touches CUDA.
  int down[2], up[2];
  if (::pipe(down) != 0 || ::pipe(up) != 0) return 1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(down[1]);
    ::close(up[0]);
    ::_exit(engine_process(down[0], up[1]));
  }
  ::close(down[0]);
  ::close(up[1]);
  g_child = {pid, down[1], up[0]};
  auto finish_child = [&] {
    ::close(g_child.to);
    int status = 0;
    ::waitpid(pid, &status, 0);
  };

  std::string line;
  if (!read_line(g_child.from, line) || line.rfind("ok ", 0) != 0) {
    std::printf("bench-transfer-gpu: skipped: %s\n",
                line.rfind("nogpu ", 0) == 0 ? line.substr(6).c_str() : "the engine process did not start");
    finish_child();
    return 0;
  }
  kvlink::log::set_level(kvlink::log::Level::warn);
  auto server = std::make_unique<Server>();
  {
    const auto space = line.find(' ', 3);
    wire::Bytes b32, b8;
    if (space == std::string::npos || !from_hex(line.substr(3, space - 3), b32) || !from_hex(line.substr(space + 1), b8) ||
        wire::decode(b32, server->layout32, "layout") || wire::decode(b8, server->layout8, "layout")) {
      std::printf("bench-transfer-gpu: the engine process sent a malformed layout\n");
      finish_child();
      return 1;
    }
  }
  // L1: room for both directions' jobs in flight, pinned by the engine.
  server->l1_bytes = chunk_bytes(8) * chunks_per_job * jobs_in_flight * 2;
  void* p = ::mmap(nullptr, server->l1_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 1;
  std::memset(p, 0x22, server->l1_bytes);
  server->l1 = static_cast<std::byte*>(p);
  server->shuffled.resize(num_blocks);
  std::iota(server->shuffled.begin(), server->shuffled.end(), 0u);
  std::shuffle(server->shuffled.begin(), server->shuffled.end(), std::mt19937(42));
  if (!server->use(transfer::CudaCopyMethod::batch) || cudaMalloc(&server->device_buffer, 2 * ceiling_bytes) != cudaSuccess ||
      cudaStreamCreateWithFlags(&server->stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaStreamCreateWithFlags(&server->stream2, cudaStreamNonBlocking) != cudaSuccess) {
    std::printf("bench-transfer-gpu: set-up failed: %s\n", server->error.c_str());
    finish_child();
    return 1;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  g_server = server.get();

  benchmark::RegisterBenchmark("BM_copy_ceiling/d2h", BM_copy_ceiling)->Arg(0)->UseManualTime()->Iterations(20)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_copy_ceiling/h2d", BM_copy_ceiling)->Arg(1)->UseManualTime()->Iterations(20)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("BM_copy_ceiling/both", BM_copy_ceiling_both)->UseManualTime()->Iterations(20)->Unit(benchmark::kMillisecond);
  for (int m : {0, 1})
    for (int dir : {0, 1, 2})
      for (int heads : {8, 2}) {
        if (dir == 2 && heads == 2) continue;
        benchmark::RegisterBenchmark(fmt::format("BM_transfer/{}/{}/{}K", m ? "kernel" : "batch",
                                                 dir == 0 ? "store" : dir == 1 ? "retrieve" : "bidirectional",
                                                 block_bytes(static_cast<std::uint32_t>(heads)) >> 10)
                                         .c_str(),
                                     BM_transfer)
            ->Args({m, dir, heads})
            ->UseManualTime()
            ->Iterations(10)
            ->Unit(benchmark::kMillisecond);
      }
  for (int m : {0, 1})
    benchmark::RegisterBenchmark(fmt::format("BM_overlap/{}", m ? "kernel" : "batch").c_str(), BM_overlap)
        ->Arg(m)
        ->UseManualTime()
        ->Iterations(3)
        ->Unit(benchmark::kMillisecond);

  if (argc > 1 && std::string(argv[1]) == "--sweep") {
    std::printf("bench-transfer-gpu --sweep on %s\n", prop.name);
    sweep(*server);
    g_server = nullptr;
    server.reset();
    finish_child();
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_summary(prop.name);
  g_server = nullptr;
  server.reset();
  finish_child();
  return 0;
}
