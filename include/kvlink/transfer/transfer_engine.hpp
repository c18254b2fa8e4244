// The copy between engine KV blocks and L1 chunk slots, behind an
// interface: the server's request handling decides what to copy, an engine
// copies it. The CPU engine (memfd + thread pool) is issue 5, the CUDA one
// issue 6; until then the server runs NullTransferEngine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "kvlink/wire/messages.hpp"

namespace kvlink::transfer {

// A worker's registered KV cache: its namespace, rank and memory layout.
// (The memfd / CUDA IPC mapping is attached here by the real engines.)
struct Registration {
  std::uint64_t instance_id = 0;
  std::uint64_t ns = 0;
  std::string model;
  std::uint32_t world_size = 1;
  std::uint32_t kv_rank = 0;
  wire::KvLayout layout;
  std::uint32_t blocks_per_chunk = 0;  // chunk_size / layout.block_size
  std::uint64_t slot_bytes = 0;        // bytes of one chunk of this rank
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
};

// Completion: an empty error_code on success. Engines must invoke it on the
// thread that runs the server's request handling (post it there).
using TransferDone = std::function<void(std::error_code)>;

class TransferEngine {
 public:
  virtual ~TransferEngine() = default;
  virtual void submit(TransferJob job, TransferDone done) = 0;
};

// FOR TESTS AND UNTIL ISSUE 5: completes every job at once, inside submit(),
// and copies nothing. The server's bookkeeping (locks, slots, replies) runs
// exactly as with a real engine; the data does not move.
class NullTransferEngine final : public TransferEngine {
 public:
  void submit(TransferJob job, TransferDone done) override {
    ++jobs_;
    chunks_ += job.chunks.size();
    done(fail_next_ ? std::exchange(fail_next_, {}) : std::error_code{});
  }
  // Makes the next job fail with `ec` (fault injection for tests).
  void fail_next(std::error_code ec) { fail_next_ = ec; }
  std::uint64_t jobs() const { return jobs_; }
  std::uint64_t chunks() const { return chunks_; }

 private:
  std::uint64_t jobs_ = 0;
  std::uint64_t chunks_ = 0;
  std::error_code fail_next_;
};

}  // namespace kvlink::transfer

namespace kvlink::store {
using transfer::TransferEngine;
}  // namespace kvlink::store
