// The engine simulator's workload as pure logic (no Asio, no sockets): the
// request generator (prompts with shared prefixes), the per-token KV pattern
// that fills and verifies paged blocks, and the engine's block allocator.
// kvlink-engine-sim drives the adapters with it; test/unit/sim_workload_test
// checks it on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvlink/store/keys.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::sim {

using store::Token;

// ---- requests ----------------------------------------------------------------

struct WorkloadConfig {
  std::uint64_t seed = 1;
  // Distinct shared prefixes ("system prompts", documents) requests draw from.
  std::uint32_t prefixes = 8;
  // Tokens of a shared prefix (a prompt shorter than this is all prefix).
  std::uint32_t prefix_tokens = 1024;
  // Prompt length, uniform in [min_prompt_tokens, max_prompt_tokens].
  std::uint32_t min_prompt_tokens = 1024;
  std::uint32_t max_prompt_tokens = 2048;
  // Fraction of requests that start with a shared prefix; the others are
  // unique from their first token.
  double share_ratio = 0.8;
  // Token ids are drawn below this.
  std::uint32_t vocab = 32000;
};

struct Request {
  std::string id;       // "req-<n>"
  std::uint64_t number = 0;
  int prefix = -1;      // the shared prefix it starts with, or -1
  std::vector<Token> tokens;
};

// "" when the config is usable, else what is wrong (naming the flag).
Error check(const WorkloadConfig& c);

// Deterministic for a seed: the n-th request is always the same.
class RequestGenerator {
 public:
  explicit RequestGenerator(WorkloadConfig c);
  Request next();
  const WorkloadConfig& config() const { return config_; }

 private:
  WorkloadConfig config_;
  std::mt19937_64 rng_;
  std::uint64_t count_ = 0;
};

// ---- KV pattern -----------------------------------------------------------------

// Where one token's K or V of one layer lives in the engine's paged memory:
// layer offset + plane x plane_stride + block x block_stride + slot x
// token_bytes, `token_bytes` (heads x head_size x dtype) contiguous bytes.
class KvView {
 public:
  KvView(std::byte* base, const wire::KvLayout& layout);
  std::uint64_t token_bytes() const { return token_bytes_; }
  std::byte* token(std::uint32_t layer, std::uint32_t plane, std::uint32_t block, std::uint32_t slot) const;
  const wire::KvLayout& layout() const { return layout_; }

 private:
  std::byte* base_;
  wire::KvLayout layout_;
  std::uint64_t token_bytes_;
};

// The bytes of one token's K or V at one layer: derived from (token id,
// position, layer, plane), so a block copied to the wrong place, a wrong
// offset inside a block, or another layer's or plane's data all mismatch.
void fill_token(std::span<std::byte> out, Token id, std::uint32_t position, std::uint32_t layer,
                std::uint32_t plane);
bool token_matches(std::span<const std::byte> in, Token id, std::uint32_t position, std::uint32_t layer,
                   std::uint32_t plane);

// The request's tokens live block after block: token i in
// blocks[i / block_size], slot i % block_size.

// "Computes" tokens [first, last): writes their pattern at every layer/plane.
void fill_tokens(const KvView& kv, std::span<const Token> tokens, std::span<const std::uint32_t> blocks,
                 std::uint32_t first, std::uint32_t last);

// Overwrites the given blocks (all layers, both planes) with a byte that no
// pattern is likely to produce in a whole token, so a block a RETRIEVE
// claimed to fill but did not is caught.
void poison_blocks(const KvView& kv, std::span<const std::uint32_t> blocks);

struct Mismatch {
  std::uint32_t position = 0;  // token position in the request
  std::uint32_t block = 0;     // engine block id
  std::uint32_t layer = 0;
  std::uint32_t plane = 0;
};

// Checks tokens [first, last); returns every mismatching (token, layer,
// plane), at most `max_reported` of them, and counts all in `*count`.
std::vector<Mismatch> verify_tokens(const KvView& kv, std::span<const Token> tokens,
                                    std::span<const std::uint32_t> blocks, std::uint32_t first, std::uint32_t last,
                                    std::size_t max_reported, std::uint64_t* count);

// ---- blocks -----------------------------------------------------------------------

// The engine's pool of KV blocks. Hands blocks out in a scrambled order, so
// a request's blocks are not contiguous and an off-by-one block is caught.
class BlockAllocator {
 public:
  BlockAllocator(std::uint32_t num_blocks, std::uint64_t seed);
  // `n` blocks, or nothing when fewer are free.
  std::optional<std::vector<std::uint32_t>> allocate(std::uint32_t n);
  // Gives blocks back; throws std::logic_error on a block not allocated.
  void release(std::span<const std::uint32_t> blocks);
  std::uint32_t free_blocks() const { return static_cast<std::uint32_t>(free_.size()); }
  std::uint32_t num_blocks() const { return static_cast<std::uint32_t>(used_.size()); }

 private:
  std::vector<std::uint32_t> free_;
  std::vector<bool> used_;
  std::mt19937_64 rng_;
};

// Blocks a request of `tokens` tokens needs.
inline std::uint32_t blocks_for(std::size_t tokens, std::uint32_t block_size) {
  return static_cast<std::uint32_t>((tokens + block_size - 1) / block_size);
}

}  // namespace kvlink::sim
