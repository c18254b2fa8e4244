// The engine's KV cache memory for a cpu_memfd layout: a memfd sized to the
// layout and sealed so that its size can never change again. kvlink-server
// maps the memfd and copies from and to it; a memfd that shrank under that
// mapping would kill the server with SIGBUS, so the server refuses every
// memfd that is not sealed against shrinking and growing. Writes stay
// allowed: the engine and the server both write the KV blocks.
//
//   auto kv = kvlink::transfer::create_kv_memfd(layout);
//   if (!kv) fail(kv.error().message());
//   worker->register_kv_caches(layout, kv->fd.get());  // kv->memory.get(): the blocks
#pragma once

#include <fcntl.h>

#include <cstddef>
#include <memory>
#include <string>
#include <system_error>

#include "kvlink/error.hpp"
#include "kvlink/unique_fd.hpp"
#include "kvlink/wire/messages.hpp"

namespace kvlink::transfer {

// The seals kvlink-server requires on a registered memfd (F_GET_SEALS must
// include both): its size is fixed.
inline constexpr int kv_memfd_required_seals = F_SEAL_SHRINK | F_SEAL_GROW;
// The seals create_kv_memfd sets: the required ones, and F_SEAL_SEAL so
// that nobody adds a seal later (F_SEAL_WRITE would stop the copies).
inline constexpr int kv_memfd_seals = kv_memfd_required_seals | F_SEAL_SEAL;

struct KvMemfdOptions {
  // The memfd's name, shown in /proc/PID/fd and /proc/PID/maps.
  std::string name = "kvlink-kv";
  // Also map the memfd here (MAP_SHARED, read-write): the engine's pointer
  // to its KV blocks. Off: only the fd is created.
  bool map = true;
};

// Unmaps a KvMemfd's mapping of `bytes` bytes.
struct Unmap {
  std::size_t bytes = 0;
  void operator()(std::byte* base) const noexcept;
};

// The sealed memfd and (with KvMemfdOptions::map) its mapping.
struct KvMemfd {
  UniqueFd fd;  // pass fd.get() to REGISTER_KV_CACHE; closed with this
  std::unique_ptr<std::byte, Unmap> memory;  // layout.region_bytes bytes, unmapped with this
};

// Creates the memfd of a cpu_memfd layout: memfd_create(MFD_CLOEXEC |
// MFD_ALLOW_SEALING), ftruncate to layout.region_bytes, seals it with
// kv_memfd_seals, and maps it unless options.map is false. On failure the
// error is the errno of the call that failed (or bad_request for an
// unusable layout) with what failed.
Result<KvMemfd> create_kv_memfd(const wire::KvLayout& layout, const KvMemfdOptions& options = {});

}  // namespace kvlink::transfer
