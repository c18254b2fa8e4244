// Chunk keys: a rolling prefix hash over full chunks of token ids, plus the
// namespace (model, world size, cache salt) and the KV rank. Shared by the
// adapters (which compute keys on the engine side) and the server.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvlink/error.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::store {

using Token = std::uint32_t;        // token id
using wire::ChunkHash;

inline constexpr std::size_t max_salt_bytes = 256;

// What separates caches: different models, tensor-parallel sizes or tenants
// (salts) never share chunks.
struct NamespaceSpec {
  std::string model;
  std::uint32_t world_size = 1;
  std::string cache_salt;
};

// Success when valid, otherwise what is wrong and what to do (bad_request).
Error check_namespace(const NamespaceSpec& spec);
// The 64-bit namespace id (never 0). Call check_namespace first; throws
// std::invalid_argument with its message otherwise.
std::uint64_t namespace_id(const NamespaceSpec& spec);

// The session id of an engine request: what the scheduler's LOOKUP locks
// under and the worker's RETRIEVE names, so the server releases exactly that
// request's locks. Stable across processes and languages (XXH3-64 of the
// id's bytes); never 0.
std::uint64_t session_id_of(std::string_view request_id);

// Success when chunk_size is a positive multiple of the engine's block size.
Error check_chunk_size(std::uint32_t chunk_size, std::uint32_t block_size);

// hash(chunk i) = XXH3-128(hash(chunk i-1) || tokens of chunk i), with
// hash(chunk -1) = `seed`. Only full chunks are hashed; a partial tail chunk
// is never keyed. Tokens are hashed as little-endian uint32.
ChunkHash chunk_hash(const ChunkHash& prev, std::span<const Token> chunk_tokens);
std::vector<ChunkHash> chunk_hashes(std::span<const Token> tokens, std::uint32_t chunk_size, ChunkHash seed = {});

// A stored chunk: one KV rank's share of one chunk of one namespace.
struct ChunkKey {
  std::uint64_t ns = 0;
  ChunkHash hash;
  std::uint32_t rank = 0;
  friend bool operator==(const ChunkKey&, const ChunkKey&) = default;
};

struct ChunkKeyHasher {
  std::size_t operator()(const ChunkKey& k) const noexcept {
    // The chunk hash is already uniformly distributed; mix in ns and rank.
    std::uint64_t h = k.hash.lo ^ (k.ns * 0x9E3779B97F4A7C15ull) ^ (std::uint64_t{k.rank} << 47);
    return static_cast<std::size_t>(h ^ (h >> 29));
  }
};

std::string to_string(const ChunkHash& h);  // 32 hex digits

}  // namespace kvlink::store
