// The copy between engine KV blocks and L1 chunk slots, behind an
// interface: the server's request handling decides what to copy, an engine
// copies it. CpuTransferEngine (cpu_engine.hpp: memfd + thread pool) and
// CudaTransferEngine (cuda_engine.hpp: CUDA IPC + stream pool) do it for
// kvlink-server, behind RoutingTransferEngine (routing_engine.hpp);
// NullTransferEngine serves the unit tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::transfer {

// The engine's KV memory mapped into the server (MAP_SHARED of the memfd);
// unmapped when the last Registration / job holding it lets go.
class Mapping {
 public:
  Mapping(std::byte* base, std::size_t size) : base_(base), size_(size) {}
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  std::byte* base() const { return base_; }
  std::size_t size() const { return size_; }

 private:
  std::byte* base_;
  std::size_t size_;
};

// Success if `fd` is sealed against shrinking and growing
// (kv_memfd_required_seals, kv_memfd.hpp), else a bad_request saying why
// not and how to fix it.
Error check_memfd_seals(int fd);

// Maps `fd` (a memfd of at least region_bytes, sealed per
// check_memfd_seals, so that it can never shrink under the mapping and
// fault the server's copies with SIGBUS) read-write and shared, or says
// why not ("memfd is N bytes, layout needs M", "... not sealed ...": a
// bad_request; a failed fstat or mmap: its errno). The fd is closed either
// way (the mapping keeps the memory).
Result<std::shared_ptr<const Mapping>> map_memfd(UniqueFd fd, std::uint64_t region_bytes);

// What an engine keeps per registration besides a memfd mapping (the CUDA
// engine: the opened IPC memory handles and events). Released, like the
// Mapping, when the last Registration / job holding it lets go.
struct EngineState {
  virtual ~EngineState() = default;
};

// A worker's registered KV cache: its namespace, rank and memory layout,
// and the engine's memory once an engine attached it.
struct Registration {
  std::uint64_t instance_id = 0;
  std::uint64_t ns = 0;
  std::string model;
  std::uint32_t world_size = 1;
  std::uint32_t kv_rank = 0;
  wire::KvLayout layout;
  std::uint32_t blocks_per_chunk = 0;  // chunk_size / layout.block_size
  std::uint64_t slot_bytes = 0;        // bytes of one chunk of this rank
  std::shared_ptr<const Mapping> memory;  // CPU engine: the mapped memfd
  std::shared_ptr<EngineState> engine_state;  // CUDA engine: see EngineState
};

enum class Direction : std::uint8_t { store, retrieve };

// One chunk: its L1 slot and the engine blocks holding its tokens.
struct ChunkCopy {
  std::byte* slot = nullptr;
  std::vector<std::uint32_t> block_ids;  // blocks_per_chunk ids
};

struct TransferJob {
  Direction direction = Direction::store;
  std::shared_ptr<const Registration> registration;  // outlives an UNREGISTER during the copy
  std::vector<ChunkCopy> chunks;
  std::uint32_t skip_first_n_tokens = 0;  // retrieve: leave these engine tokens untouched
  wire::Bytes engine_event;  // CUDA: the engine's IPC event the copy waits on; empty on CPU
  // The request's fence (wire::StoreRequest): engines touch no engine block
  // at or after it; they fail the job with errc::timed_out instead, and a
  // store whose copy ends past it fails too (its bytes may be reused ones).
  TimePoint fence = TimePoint::max();
};

// Completion: an empty error_code on success. Engines must invoke it on the
// thread that runs the server's request handling (post it there).
using TransferDone = std::function<void(std::error_code)>;

class TransferEngine {
 public:
  virtual ~TransferEngine() = default;
  // Attaches the engine's memory to a new registration (called on the
  // request-handling thread before the registration is used). `fd` is the
  // memfd received with REGISTER_KV_CACHE, or empty. On failure says why
  // the registration is refused. The fd is closed either way. The default
  // accepts every registration and needs no memory.
  virtual Error attach(Registration& reg, UniqueFd fd) {
    (void)reg;
    fd.reset();
    return {};
  }
  virtual void submit(TransferJob job, TransferDone done) = 0;
  // Called after `reg` was attached and L1 [base, base + bytes) mapped for
  // it, on every registration: the CUDA engine pins L1 here, once. On
  // failure says why the registration is refused.
  virtual Error use_l1(const Registration& reg, std::byte* base, std::uint64_t bytes) {
    (void)reg, (void)base, (void)bytes;
    return {};
  }
  // wire::capability bits announced in HELLO.
  virtual std::uint64_t capabilities() const { return 0; }
  // Success while copies for `reg` can work; otherwise why they cannot, for
  // good (a device fault lost the server's CUDA context on its device).
  // The server then refuses its transfers at once and says so in STATS
  // and in the answers to its engine's PINGs.
  virtual Error fault(const Registration& reg) const {
    (void)reg;
    return {};
  }
};

// For tests and control-plane benchmarks: completes every job at once, inside submit(),
// and copies nothing. The server's bookkeeping (locks, slots, replies) runs
// exactly as with a real engine; the data does not move.
class NullTransferEngine final : public TransferEngine {
 public:
  // Accepts any registration, with or without an fd (which it closes).
  Error attach(Registration&, UniqueFd fd) override {
    if (fd) ++fds_;
    return {};
  }
  void submit(TransferJob job, TransferDone done) override {
    ++jobs_;
    chunks_ += job.chunks.size();
    done(fail_next_ ? std::exchange(fail_next_, {}) : std::error_code{});
  }
  // Makes the next job fail with `ec` (fault injection for tests).
  void fail_next(std::error_code ec) { fail_next_ = ec; }
  // Makes the data path of every registration down (a failure), or up (success).
  void set_fault(Error fault) { fault_ = std::move(fault); }
  Error fault(const Registration&) const override { return fault_; }
  std::uint64_t jobs() const { return jobs_; }
  std::uint64_t chunks() const { return chunks_; }
  std::uint64_t fds() const { return fds_; }  // fds received by attach()

 private:
  std::uint64_t fds_ = 0;
  std::uint64_t jobs_ = 0;
  std::uint64_t chunks_ = 0;
  std::error_code fail_next_;
  Error fault_;
};

}  // namespace kvlink::transfer

namespace kvlink::store {
using transfer::TransferEngine;
}  // namespace kvlink::store
