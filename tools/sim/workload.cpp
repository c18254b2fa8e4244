#include "sim/workload.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace kvlink::sim {

namespace {

std::uint64_t mix(std::uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr std::uint64_t golden = 0x9E3779B97F4A7C15ull;

std::uint64_t token_seed(Token id, std::uint32_t position, std::uint32_t layer, std::uint32_t plane) {
  std::uint64_t s = mix(std::uint64_t{id} + golden);
  s = mix(s ^ (std::uint64_t{position} << 1));
  return mix(s ^ ((std::uint64_t{layer} << 8) | plane));
}

// Calls f(word index, word) for the words of one token's bytes.
template <class F>
void for_each_word(std::size_t bytes, std::uint64_t seed, F f) {
  const std::size_t words = (bytes + 7) / 8;
  for (std::size_t i = 0; i < words; ++i) f(i, mix(seed + (i + 1) * golden));
}

constexpr std::byte poison_byte{0xA5};

}  // namespace

Error check(const WorkloadConfig& c) {
  if (c.prefixes == 0 && c.share_ratio > 0)
    return Error(errc::bad_request,
                 "--prefixes is 0 but --share-ratio is above 0: give at least one prefix, or --share-ratio 0");
  if (c.min_prompt_tokens == 0) return Error(errc::bad_request, "--min-prompt-tokens must be at least 1");
  if (c.max_prompt_tokens < c.min_prompt_tokens)
    return Error(errc::bad_request, fmt::format("--max-prompt-tokens {} is below --min-prompt-tokens {}",
                                                c.max_prompt_tokens, c.min_prompt_tokens));
  if (c.share_ratio < 0 || c.share_ratio > 1)
    return Error(errc::bad_request, fmt::format("--share-ratio {} is not between 0 and 1", c.share_ratio));
  if (c.vocab < 2) return Error(errc::bad_request, "the vocabulary needs at least 2 token ids");
  return {};
}

RequestGenerator::RequestGenerator(WorkloadConfig c) : config_(std::move(c)), rng_(mix(config_.seed)) {
  if (auto err = check(config_)) throw std::invalid_argument(err.message());
}

Request RequestGenerator::next() {
  Request r;
  r.number = count_++;
  r.id = fmt::format("req-{}", r.number);
  std::uniform_int_distribution<std::uint32_t> len(config_.min_prompt_tokens, config_.max_prompt_tokens);
  const std::uint32_t n = len(rng_);
  std::bernoulli_distribution shared(config_.share_ratio);
  if (config_.prefixes > 0 && shared(rng_))
    r.prefix = static_cast<int>(std::uniform_int_distribution<std::uint32_t>(0, config_.prefixes - 1)(rng_));
  r.tokens.resize(n);
  const std::uint32_t shared_len = r.prefix >= 0 ? std::min(n, config_.prefix_tokens) : 0;
  // Prefix tokens depend on (seed, prefix, position) only, so every request
  // with that prefix has the same ones; the rest on (seed, request, position).
  const std::uint64_t prefix_base = mix(config_.seed ^ mix(0x5052454649580000ull + static_cast<std::uint64_t>(r.prefix)));
  const std::uint64_t own_base = mix(config_.seed ^ mix(0x5441494c00000000ull + r.number));
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint64_t base = i < shared_len ? prefix_base : own_base;
    r.tokens[i] = static_cast<Token>(mix(base + (i + 1) * golden) % config_.vocab);
  }
  return r;
}

KvView::KvView(std::byte* base, const wire::KvLayout& layout)
    : base_(base),
      layout_(layout),
      token_bytes_(std::uint64_t{layout.num_kv_heads} * layout.head_size * layout.dtype_size) {}

std::byte* KvView::token(std::uint32_t layer, std::uint32_t plane, std::uint32_t block, std::uint32_t slot) const {
  return base_ + layout_.layers[layer].offset + plane * layout_.plane_stride + block * layout_.block_stride +
         slot * token_bytes_;
}

void fill_token(std::span<std::byte> out, Token id, std::uint32_t position, std::uint32_t layer,
                std::uint32_t plane) {
  for_each_word(out.size(), token_seed(id, position, layer, plane), [&](std::size_t i, std::uint64_t w) {
    std::memcpy(out.data() + i * 8, &w, std::min<std::size_t>(8, out.size() - i * 8));
  });
}

bool token_matches(std::span<const std::byte> in, Token id, std::uint32_t position, std::uint32_t layer,
                   std::uint32_t plane) {
  bool ok = true;
  for_each_word(in.size(), token_seed(id, position, layer, plane), [&](std::size_t i, std::uint64_t w) {
    if (ok) ok = std::memcmp(in.data() + i * 8, &w, std::min<std::size_t>(8, in.size() - i * 8)) == 0;
  });
  return ok;
}

void fill_tokens(const KvView& kv, std::span<const Token> tokens, std::span<const std::uint32_t> blocks,
                 std::uint32_t first, std::uint32_t last) {
  const auto& l = kv.layout();
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < l.num_planes; ++plane)
      for (std::uint32_t t = first; t < last; ++t)
        fill_token({kv.token(layer, plane, blocks[t / l.block_size], t % l.block_size), kv.token_bytes()}, tokens[t],
                   t, layer, plane);
}

void poison_blocks(const KvView& kv, std::span<const std::uint32_t> blocks) {
  const auto& l = kv.layout();
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < l.num_planes; ++plane)
      for (auto b : blocks) std::memset(kv.token(layer, plane, b, 0), static_cast<int>(poison_byte), l.block_bytes());
}

std::vector<Mismatch> verify_tokens(const KvView& kv, std::span<const Token> tokens,
                                    std::span<const std::uint32_t> blocks, std::uint32_t first, std::uint32_t last,
                                    std::size_t max_reported, std::uint64_t* count) {
  const auto& l = kv.layout();
  std::vector<Mismatch> out;
  std::uint64_t n = 0;
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < l.num_planes; ++plane)
      for (std::uint32_t t = first; t < last; ++t) {
        const std::uint32_t block = blocks[t / l.block_size];
        if (token_matches({kv.token(layer, plane, block, t % l.block_size), kv.token_bytes()}, tokens[t], t, layer,
                          plane))
          continue;
        ++n;
        if (out.size() < max_reported) out.push_back({t, block, layer, plane});
      }
  if (count) *count = n;
  return out;
}

BlockAllocator::BlockAllocator(std::uint32_t num_blocks, std::uint64_t seed)
    : free_(num_blocks), used_(num_blocks, false), rng_(mix(seed ^ 0xB10C)) {
  for (std::uint32_t i = 0; i < num_blocks; ++i) free_[i] = i;
  std::shuffle(free_.begin(), free_.end(), rng_);
}

std::optional<std::vector<std::uint32_t>> BlockAllocator::allocate(std::uint32_t n) {
  if (n > free_.size()) return std::nullopt;
  std::vector<std::uint32_t> out(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  for (auto b : out) used_[b] = true;
  return out;
}

void BlockAllocator::release(std::span<const std::uint32_t> blocks) {
  for (auto b : blocks) {
    if (b >= used_.size() || !used_[b]) throw std::logic_error(fmt::format("block {} released but not allocated", b));
    used_[b] = false;
    free_.push_back(b);
  }
  // Keep the order scrambled: a freed block is not simply handed out next.
  if (free_.size() > 1) {
    std::uniform_int_distribution<std::size_t> pick(0, free_.size() - 1);
    for (std::size_t i = free_.size() - blocks.size(); i < free_.size(); ++i) std::swap(free_[i], free_[pick(rng_)]);
  }
}

}  // namespace kvlink::sim
