// What the three examples share: an engine's KV cache in a memfd (what the
// worker registers), a prompt, and a check that retrieved blocks hold the
// bytes that were stored. Nothing kvlink-specific beyond wire::KvLayout and
// transfer::create_kv_memfd (the sealed memfd the server requires).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvlink/adapter/worker.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/wire/messages.hpp"

namespace example {

// 2 layers, 64 blocks of 16 tokens, K and V, 2 heads x 64 x 2 bytes: 4 KiB
// per block and plane. With the server's default 256-token chunks, a
// 512-token prompt is 2 chunks in 32 blocks.
inline kvlink::wire::KvLayout layout() { return kvlink::wire::paged_layout(2, 64, 16, 2, 64, 2); }
inline constexpr std::uint32_t prompt_tokens = 512;
inline constexpr std::uint32_t blocks_per_prompt = prompt_tokens / 16;

inline std::vector<kvlink::store::Token> prompt(std::uint32_t seed) {
  std::vector<kvlink::store::Token> t(prompt_tokens);
  std::iota(t.begin(), t.end(), seed * 100000);
  return t;
}

inline std::vector<std::uint32_t> block_range(std::uint32_t first, std::uint32_t n = blocks_per_prompt) {
  std::vector<std::uint32_t> b(n);
  std::iota(b.begin(), b.end(), first);
  return b;
}

// The engine's KV memory: a sealed memfd (its size is fixed) the server maps too.
class KvCache {
 public:
  KvCache() : layout_(layout()), kv_(kvlink::transfer::create_kv_memfd(layout_, {.name = "example-kv"})) {
    if (!kv_) throw std::runtime_error("cannot create the KV cache memfd: " + kv_.error().message());
  }
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int fd() const { return kv_->fd.get(); }
  const kvlink::wire::KvLayout& kv_layout() const { return layout_; }

  // "Prefill": writes a pattern derived from `seed` into `blocks`.
  void fill(const std::vector<std::uint32_t>& blocks, std::uint32_t seed) { visit(blocks, seed, true); }
  // True if `blocks` hold what fill(…, seed) wrote (wherever it was written).
  bool holds(const std::vector<std::uint32_t>& blocks, std::uint32_t seed) { return visit(blocks, seed, false); }

 private:
  bool visit(const std::vector<std::uint32_t>& blocks, std::uint32_t seed, bool write) {
    const auto& l = layout_;
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
      for (std::uint32_t plane = 0; plane < l.num_planes; ++plane)
        for (std::uint32_t j = 0; j < blocks.size(); ++j) {
          std::byte* b = kv_->memory.get() + l.layers[layer].offset + plane * l.plane_stride + blocks[j] * l.block_stride;
          for (std::size_t i = 0; i < l.block_bytes(); ++i) {
            const auto want = static_cast<std::byte>((seed * 31 + layer * 7 + plane * 3 + j * 5 + i) % 251);
            if (write) b[i] = want;
            else if (b[i] != want) return false;
          }
        }
    return true;
  }

  kvlink::wire::KvLayout layout_;
  kvlink::Result<kvlink::transfer::KvMemfd> kv_;
};

inline kvlink::adapter::TransferSpec spec(std::string request_id, std::uint32_t seed, std::uint32_t first_block) {
  kvlink::adapter::TransferSpec s;
  s.request_id = std::move(request_id);
  s.tokens = prompt(seed);
  s.block_ids = block_range(first_block);
  return s;
}

// Every check the examples make: prints what failed and exits non-zero.
inline void check(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  std::exit(1);
}

inline std::string endpoint_from(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s ENDPOINT   (e.g. unix:/tmp/kvlink.sock of a running kvlink-server)\n", argv[0]);
    std::exit(2);
  }
  return argv[1];
}

}  // namespace example
