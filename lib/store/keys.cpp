#include "kvlink/store/keys.hpp"

#include <bit>
#include <fmt/format.h>
#include <stdexcept>
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>

namespace kvlink::store {

static_assert(sizeof(Token) == 4);

Error check_namespace(const NamespaceSpec& spec) {
  if (spec.model.empty())
    return Error(errc::bad_request, "model name is empty; pass the engine's model name (e.g. its HF repo id)");
  if (spec.world_size == 0) return Error(errc::bad_request, "world_size must be at least 1");
  if (spec.cache_salt.size() > max_salt_bytes)
    return Error(errc::bad_request,
                 fmt::format("cache salt is {} bytes; at most {} are allowed", spec.cache_salt.size(), max_salt_bytes));
  return {};
}

std::uint64_t session_id_of(std::string_view request_id) {
  const std::uint64_t id = XXH3_64bits_withSeed(request_id.data(), request_id.size(), 0x6b766c696e6b5f73);
  return id == 0 ? 1 : id;
}

std::uint64_t namespace_id(const NamespaceSpec& spec) {
  if (auto err = check_namespace(spec)) throw std::invalid_argument(err.message());
  // Length-prefixed fields so ("ab","c") and ("a","bc") differ.
  std::string buf = "kvlink-ns-v1";
  auto add_u64 = [&](std::uint64_t v) {
    for (int i = 0; i < 8; ++i) buf.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  add_u64(spec.model.size());
  buf += spec.model;
  add_u64(spec.world_size);
  add_u64(spec.cache_salt.size());
  buf += spec.cache_salt;
  std::uint64_t id = XXH3_64bits(buf.data(), buf.size());
  return id == 0 ? 1 : id;
}

Error check_chunk_size(std::uint32_t chunk_size, std::uint32_t block_size) {
  if (block_size == 0) return Error(errc::bad_request, "engine block size is 0");
  if (chunk_size == 0 || chunk_size % block_size != 0)
    return Error(errc::bad_request,
                 fmt::format("chunk size {} is not a multiple of the engine block size {}; start the server with "
                             "--chunk-size set to a multiple of {}",
                             chunk_size, block_size, block_size));
  return {};
}

ChunkHash chunk_hash(const ChunkHash& prev, std::span<const Token> chunk_tokens) {
  XXH3_state_t state;
  XXH3_128bits_reset(&state);
  const std::uint64_t prev_words[2] = {prev.lo, prev.hi};
  XXH3_128bits_update(&state, prev_words, sizeof prev_words);
  // Token ids in host order; every supported host is little-endian.
  static_assert(std::endian::native == std::endian::little);
  XXH3_128bits_update(&state, chunk_tokens.data(), chunk_tokens.size_bytes());
  const XXH128_hash_t h = XXH3_128bits_digest(&state);
  return ChunkHash{h.low64, h.high64};
}

std::vector<ChunkHash> chunk_hashes(std::span<const Token> tokens, std::uint32_t chunk_size, ChunkHash seed) {
  if (chunk_size == 0) throw std::invalid_argument("chunk_size must be positive");
  std::vector<ChunkHash> out;
  const std::size_t full = tokens.size() / chunk_size;
  out.reserve(full);
  ChunkHash prev = seed;
  for (std::size_t i = 0; i < full; ++i) {
    prev = chunk_hash(prev, tokens.subspan(i * chunk_size, chunk_size));
    out.push_back(prev);
  }
  return out;
}

std::string to_string(const ChunkHash& h) { return fmt::format("{:016x}{:016x}", h.hi, h.lo); }

}  // namespace kvlink::store
