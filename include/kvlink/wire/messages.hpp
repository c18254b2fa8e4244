// Every message of the protocol, defined once. Each struct lists its fields
// in `visit`, which drives both encoding and bounds-checked decoding, so the
// two can never drift apart. Requests name their opcode and reply type.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/wire/codec.hpp"
#include "kvlink/wire/frame.hpp"

namespace kvlink::wire {

// Limits on what one message may claim, checked while decoding.
inline constexpr std::size_t max_string = 4096;
inline constexpr std::size_t max_chunks = 1u << 20;    // chunk hashes in one request
inline constexpr std::size_t max_blocks = 1u << 24;    // block ids in one request
inline constexpr std::size_t max_layers = 4096;
inline constexpr std::size_t max_handle_bytes = 1u << 20;
inline constexpr std::size_t max_stats = 4096;

enum class Role : std::uint8_t { scheduler = 1, worker = 2, admin = 3 };
const char* role_name(Role r);

// 128-bit chunk key hash (a rolling prefix hash, see store/keys).
struct ChunkHash {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  friend auto operator<=>(const ChunkHash&, const ChunkHash&) = default;
};
static_assert(sizeof(ChunkHash) == 16);

// ---- field visitors -------------------------------------------------------

class Encoder {
 public:
  explicit Encoder(Writer& w) : w_(w) {}
  template <class T>
  void num(const T& v, const char*) { w_.num(v); }
  void boolean(const bool& v, const char*) { w_.boolean(v); }
  void str(const std::string& s, const char*, std::size_t) { w_.str(s); }
  void blob(const Bytes& b, const char*, std::size_t) { w_.blob(b); }
  template <class T>
  void array(const std::vector<T>& v, const char*, std::size_t) { w_.array(v); }
  template <class T>
  void list(const std::vector<T>& v, const char*, std::size_t, std::size_t) {
    w_.num(static_cast<std::uint32_t>(v.size()));
    for (const T& e : v) const_cast<T&>(e).visit(*this);
  }
  template <class T>
  void object(const T& v) { const_cast<T&>(v).visit(*this); }

 private:
  Writer& w_;
};

class Decoder {
 public:
  explicit Decoder(Reader& r) : r_(r) {}
  template <class T>
  void num(T& v, const char* field) { r_.num(v, field); }
  void boolean(bool& v, const char* field) { r_.boolean(v, field); }
  void str(std::string& s, const char* field, std::size_t max) { r_.str(s, field, max); }
  void blob(Bytes& b, const char* field, std::size_t max) { r_.blob(b, field, max); }
  template <class T>
  void array(std::vector<T>& v, const char* field, std::size_t max) { r_.array(v, field, max); }
  template <class T>
  void list(std::vector<T>& v, const char* field, std::size_t max, std::size_t min_element_size) {
    const std::uint32_t n = r_.count(field, max, min_element_size);
    v.clear();
    v.resize(n);
    for (T& e : v) {
      if (!r_.ok()) return;
      e.visit(*this);
    }
  }
  template <class T>
  void object(T& v) { v.visit(*this); }
  void fail(const char* field, const std::string& why) { r_.fail(field, why); }

 private:
  Reader& r_;
};

// ---- handshake and liveness -------------------------------------------------

struct HelloReply {
  std::uint64_t boot_id = 0;       // random per server start
  std::uint32_t chunk_size = 0;    // tokens per chunk
  std::uint32_t max_payload = 0;   // largest frame payload the server accepts
  std::uint32_t max_in_flight = 0; // requests one connection may have outstanding
  std::uint64_t capabilities = 0;  // capability bits below
  std::string server_version;
  // 1 if the server holds a KV-cache registration of this instance (kept
  // across reconnects until UNREGISTER or the reaper); 0 otherwise.
  std::uint8_t registered = 0;
  // 1 if the server is draining for a planned restart: it takes no new
  // transfers; reconnect to its replacement.
  std::uint8_t draining = 0;
  template <class V> void visit(V& v) {
    v.num(boot_id, "boot_id");
    v.num(chunk_size, "chunk_size");
    v.num(max_payload, "max_payload");
    v.num(max_in_flight, "max_in_flight");
    v.num(capabilities, "capabilities");
    v.str(server_version, "server_version", max_string);
    v.num(registered, "registered");
    v.num(draining, "draining");
  }
};
namespace capability {
inline constexpr std::uint64_t cpu_transfer = 1;   // memfd KV caches over a unix socket
inline constexpr std::uint64_t cuda_transfer = 2;  // CUDA IPC KV caches
}  // namespace capability

inline constexpr std::size_t min_instance_secret = 16;
inline constexpr std::size_t max_instance_secret = 64;

struct HelloRequest {
  static constexpr Opcode opcode = Opcode::hello;
  using reply_type = HelloReply;
  std::uint16_t protocol_version = wire::protocol_version;
  Role role = Role::scheduler;
  std::uint64_t instance_id = 0;  // random 63-bit, never 0
  std::string auth_token;
  std::string client_name;  // for the server's logs
  // Random bytes drawn with the instance id and kept across reconnects: the
  // server binds the id to them at its first HELLO and refuses a HELLO
  // claiming the id without them (unauthorized). Empty or 16 to 64 bytes;
  // an id bound to none can be claimed by anyone (the adapters always send
  // one).
  std::string instance_secret;
  template <class V> void visit(V& v) {
    v.num(protocol_version, "protocol_version");
    v.num(role, "role");
    v.num(instance_id, "instance_id");
    v.str(auth_token, "auth_token", max_string);
    v.str(client_name, "client_name", max_string);
    v.str(instance_secret, "instance_secret", max_instance_secret);
  }
  Error check() const;
};

struct Empty {
  template <class V> void visit(V&) {}
};

struct PingReply {
  // Empty while the server can move this instance's KV data; otherwise why
  // it cannot (its registration's data path is down: the server's CUDA
  // context on that device was lost). The engine then recomputes instead of
  // sending transfers that would fail.
  std::string data_path_error;
  template <class V> void visit(V& v) { v.str(data_path_error, "data_path_error", max_string); }
};

struct PingRequest {
  static constexpr Opcode opcode = Opcode::ping;
  using reply_type = PingReply;
  template <class V> void visit(V&) {}
};

// What a server tells its clients unasked (opcode server_notice, one-way,
// request id 0).
enum class NoticeKind : std::uint8_t {
  draining = 1,  // planned restart: no new transfers; in-flight ones finish; reconnect to the replacement
};
struct ServerNotice {
  static constexpr Opcode opcode = Opcode::server_notice;
  using reply_type = void;
  NoticeKind kind = NoticeKind::draining;
  std::string message;
  template <class V> void visit(V& v) {
    v.num(kind, "kind");
    v.str(message, "message", max_string);
  }
};

struct ErrorReply {
  std::uint16_t code = 0;  // kvlink::errc value
  std::string message;
  template <class V> void visit(V& v) {
    v.num(code, "code");
    v.str(message, "message", max_string);
  }
};

// ---- KV cache registration --------------------------------------------------

enum class KvBackend : std::uint8_t { cpu_memfd = 1, cuda_ipc = 2 };

// Where one layer's KV tensor lives: an offset into the memfd (CPU), or a
// CUDA IPC memory handle (GPU, 64 bytes).
struct LayerLocation {
  std::uint64_t offset = 0;
  Bytes ipc_handle;
  template <class V> void visit(V& v) {
    v.num(offset, "layer.offset");
    v.blob(ipc_handle, "layer.ipc_handle", max_handle_bytes);
  }
};

// Paged KV layout of one worker, described by strides so that both vLLM's
// [2, num_blocks, block_size, heads, head_size] and the block-first variants
// fit. One "block" of one plane (K or V) is `block_bytes` contiguous bytes.
struct KvLayout {
  KvBackend backend = KvBackend::cpu_memfd;
  std::uint32_t num_layers = 0;
  std::uint32_t num_blocks = 0;
  std::uint32_t block_size = 0;    // tokens per block
  std::uint32_t num_planes = 2;    // 2: K and V; 1: MLA latent
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_size = 0;
  std::uint32_t dtype_size = 0;    // bytes per element
  std::uint64_t block_stride = 0;  // bytes between block b and b+1 of a plane
  std::uint64_t plane_stride = 0;  // bytes between plane 0 and 1 of a block
  std::uint64_t region_bytes = 0;  // memfd size / bytes of each layer allocation
  std::array<std::byte, 16> device_uuid{};
  std::vector<LayerLocation> layers;
  template <class V> void visit(V& v) {
    v.num(backend, "backend");
    v.num(num_layers, "num_layers");
    v.num(num_blocks, "num_blocks");
    v.num(block_size, "block_size");
    v.num(num_planes, "num_planes");
    v.num(num_kv_heads, "num_kv_heads");
    v.num(head_size, "head_size");
    v.num(dtype_size, "dtype_size");
    v.num(block_stride, "block_stride");
    v.num(plane_stride, "plane_stride");
    v.num(region_bytes, "region_bytes");
    v.num(device_uuid, "device_uuid");
    v.list(layers, "layers", max_layers, 12);
  }
  // Bytes of one block of one plane of one layer.
  std::uint64_t block_bytes() const {
    return std::uint64_t{block_size} * num_kv_heads * head_size * dtype_size;
  }
  Error check() const;
};

// Block order of each layer's paged KV tensor.
enum class PagedOrder : std::uint8_t {
  planes_first,  // vLLM's [2, num_blocks, block_size, heads, head_size]
  blocks_first,  // [num_blocks, 2, block_size, heads, head_size]
};

// The CPU layout of a paged K/V cache with every layer in one region, one
// layer after the other: strides, layer offsets and region size derived
// from the shape. What an engine registers for a memfd of region_bytes.
KvLayout paged_layout(std::uint32_t num_layers, std::uint32_t num_blocks, std::uint32_t block_size,
                      std::uint32_t num_kv_heads, std::uint32_t head_size, std::uint32_t dtype_size,
                      PagedOrder order = PagedOrder::planes_first);

struct RegisterKvCacheRequest {
  static constexpr Opcode opcode = Opcode::register_kv_cache;
  using reply_type = Empty;
  std::uint64_t ns = 0;  // namespace id (model, world size, salt)
  std::string model;
  std::uint32_t world_size = 1;
  std::uint32_t kv_rank = 0;
  KvLayout layout;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.str(model, "model", max_string);
    v.num(world_size, "world_size");
    v.num(kv_rank, "kv_rank");
    v.object(layout);
  }
  Error check() const;
};

struct UnregisterKvCacheRequest {
  static constexpr Opcode opcode = Opcode::unregister_kv_cache;
  using reply_type = Empty;
  template <class V> void visit(V&) {}
};

// ---- lookups ------------------------------------------------------------------

struct LookupAccepted {
  std::uint64_t job_id = 0;
  template <class V> void visit(V& v) { v.num(job_id, "job_id"); }
};

struct LookupRequest {
  static constexpr Opcode opcode = Opcode::lookup;
  using reply_type = LookupAccepted;
  std::uint64_t ns = 0;
  std::uint32_t world_size = 1;
  std::uint64_t session_id = 0;  // the engine's request, for END_SESSION
  std::vector<ChunkHash> hashes;  // full chunks of the prompt, in order
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(world_size, "world_size");
    v.num(session_id, "session_id");
    v.array(hashes, "hashes", max_chunks);
  }
};

enum class PrefetchState : std::uint8_t { pending = 0, done = 1 };

struct PrefetchStatus {
  PrefetchState state = PrefetchState::pending;
  std::uint32_t matched_chunks = 0;
  template <class V> void visit(V& v) {
    v.num(state, "state");
    v.num(matched_chunks, "matched_chunks");
  }
};

struct QueryPrefetchStatusRequest {
  static constexpr Opcode opcode = Opcode::query_prefetch_status;
  using reply_type = PrefetchStatus;
  std::uint64_t job_id = 0;
  template <class V> void visit(V& v) { v.num(job_id, "job_id"); }
};

struct LookupResult {
  std::uint32_t matched_chunks = 0;
  template <class V> void visit(V& v) { v.num(matched_chunks, "matched_chunks"); }
};

struct SyncLookupRequest {
  static constexpr Opcode opcode = Opcode::sync_lookup;
  using reply_type = LookupResult;
  std::uint64_t ns = 0;
  std::uint32_t world_size = 1;
  std::uint64_t session_id = 0;
  std::vector<ChunkHash> hashes;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(world_size, "world_size");
    v.num(session_id, "session_id");
    v.array(hashes, "hashes", max_chunks);
  }
};

// One-way: releases the read locks the lookups of session `session_id` (on
// this connection's instance) took on hashes[start, end).
struct FreeLookupLocksRequest {
  static constexpr Opcode opcode = Opcode::free_lookup_locks;
  using reply_type = void;
  std::uint64_t ns = 0;
  std::uint32_t world_size = 1;
  std::uint64_t session_id = 0;
  std::vector<ChunkHash> hashes;
  std::uint32_t start = 0;
  std::uint32_t end = 0;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(world_size, "world_size");
    v.num(session_id, "session_id");
    v.array(hashes, "hashes", max_chunks);
    v.num(start, "start");
    v.num(end, "end");
  }
};

// ---- data movement --------------------------------------------------------------

struct StoreResult {
  std::uint32_t stored_chunks = 0;
  std::uint32_t skipped_chunks = 0;  // present, locked, or no room
  template <class V> void visit(V& v) {
    v.num(stored_chunks, "stored_chunks");
    v.num(skipped_chunks, "skipped_chunks");
  }
};

// A transfer's fence: the steady-clock time (CLOCK_MONOTONIC nanoseconds,
// one clock for every process on the host; memfds and CUDA IPC handles only
// work on one host) after which the server must not touch the engine's
// blocks: a copy not finished by then fails with timed_out and a STORE that
// read its blocks past it is discarded, because the engine may already have
// reused them. 0: no fence.
inline TimePoint fence_from_wire(std::uint64_t fence_ns) {
  return fence_ns ? TimePoint(std::chrono::nanoseconds(fence_ns)) : TimePoint::max();
}
inline std::uint64_t fence_to_wire(TimePoint fence) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(fence.time_since_epoch()).count());
}

// Copies the engine blocks of the given chunks into the server. block_ids
// lists, chunk after chunk, the engine blocks holding each chunk's tokens.
struct StoreRequest {
  static constexpr Opcode opcode = Opcode::store;
  using reply_type = StoreResult;
  std::uint64_t ns = 0;
  std::uint32_t kv_rank = 0;
  std::vector<ChunkHash> hashes;
  std::vector<std::uint32_t> block_ids;
  Bytes engine_event;  // CUDA IPC event handle; empty on CPU
  std::uint64_t fence_ns = 0;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(kv_rank, "kv_rank");
    v.array(hashes, "hashes", max_chunks);
    v.array(block_ids, "block_ids", max_blocks);
    v.blob(engine_event, "engine_event", max_handle_bytes);
    v.num(fence_ns, "fence_ns");
  }
};

struct RetrieveResult {
  std::uint32_t retrieved_chunks = 0;
  template <class V> void visit(V& v) { v.num(retrieved_chunks, "retrieved_chunks"); }
};

// Copies chunks back into engine blocks, leaving the first
// skip_first_n_tokens tokens (already in the engine) untouched.
struct RetrieveRequest {
  static constexpr Opcode opcode = Opcode::retrieve;
  using reply_type = RetrieveResult;
  std::uint64_t ns = 0;
  std::uint32_t kv_rank = 0;
  std::vector<ChunkHash> hashes;
  std::vector<std::uint32_t> block_ids;
  std::uint32_t skip_first_n_tokens = 0;
  Bytes engine_event;
  std::uint64_t fence_ns = 0;  // see StoreRequest
  // The request's session (store::session_id_of): the read locks its
  // lookups took on these chunks are released once the copy ends, whether
  // it succeeded or not. 0: none.
  std::uint64_t session_id = 0;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(kv_rank, "kv_rank");
    v.array(hashes, "hashes", max_chunks);
    v.array(block_ids, "block_ids", max_blocks);
    v.num(skip_first_n_tokens, "skip_first_n_tokens");
    v.blob(engine_event, "engine_event", max_handle_bytes);
    v.num(fence_ns, "fence_ns");
    v.num(session_id, "session_id");
  }
};

// One-way: the request is done; refresh recency of its chunks, drop its state.
struct EndSessionRequest {
  static constexpr Opcode opcode = Opcode::end_session;
  using reply_type = void;
  std::uint64_t ns = 0;
  std::uint64_t session_id = 0;
  std::vector<ChunkHash> hashes;
  template <class V> void visit(V& v) {
    v.num(ns, "namespace");
    v.num(session_id, "session_id");
    v.array(hashes, "hashes", max_chunks);
  }
};

// One-way: the engine's block usage, for observability.
struct ReportBlockAllocationRequest {
  static constexpr Opcode opcode = Opcode::report_block_allocation;
  using reply_type = void;
  std::uint64_t session_id = 0;
  std::uint32_t allocated_blocks = 0;
  std::uint32_t total_blocks = 0;
  template <class V> void visit(V& v) {
    v.num(session_id, "session_id");
    v.num(allocated_blocks, "allocated_blocks");
    v.num(total_blocks, "total_blocks");
  }
};

// ---- admin --------------------------------------------------------------------

struct ClearResult {
  std::uint64_t dropped_entries = 0;
  template <class V> void visit(V& v) { v.num(dropped_entries, "dropped_entries"); }
};

struct ClearRequest {
  static constexpr Opcode opcode = Opcode::clear;
  using reply_type = ClearResult;
  template <class V> void visit(V&) {}
};

struct StatEntry {
  std::string name;
  std::int64_t value = 0;
  template <class V> void visit(V& v) {
    v.str(name, "stat.name", 256);
    v.num(value, "stat.value");
  }
};

struct StatsReply {
  std::vector<StatEntry> entries;
  template <class V> void visit(V& v) { v.list(entries, "entries", max_stats, 12); }
};

struct StatsRequest {
  static constexpr Opcode opcode = Opcode::stats;
  using reply_type = StatsReply;
  template <class V> void visit(V&) {}
};

// ---- encode / decode ------------------------------------------------------------

template <class M>
void encode(Writer& w, const M& m) {
  Encoder e(w);
  const_cast<M&>(m).visit(e);  // Encoder only reads
}

template <class M>
Bytes encode(const M& m) {
  Bytes out;
  Writer w(out);
  encode(w, m);
  return out;
}

// Decodes a whole payload into `out`. On failure the error names the
// message and the field that was wrong: protocol_error for malformed
// bytes, the message's own check() for well-formed but invalid values.
template <class M>
Error decode(std::span<const std::byte> payload, M& out, std::string_view what) {
  Reader r(payload, what);
  Decoder d(r);
  out.visit(d);
  r.finish();
  if (!r.ok()) return Error(errc::protocol_error, r.error());
  if constexpr (requires { out.check(); }) {
    if (Error err = out.check()) return err.context(what);
  }
  return {};
}

template <class M>
  requires requires { M::opcode; }
Error decode(std::span<const std::byte> payload, M& out) {
  return decode(payload, out, opcode_name(M::opcode));
}

}  // namespace kvlink::wire
