// Fuzzes the chunk index over an L1 shared by several layouts: every two
// bytes are one operation (reserve with one of five chunk sizes, commit,
// abort, lock, release, lookup, tick, clear). It must never crash, and every
// chunk present (the one just touched, and all of them at the end) must
// still hold the bytes written for it, in a slot of its own size inside one
// slab: no two chunks overlap, whatever slabs moved.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvlink/store/kv_store.hpp"

using namespace kvlink;
using namespace kvlink::store;

namespace {
constexpr std::array<std::uint64_t, 5> sizes{512, 1000, 1536, 3000, 4096};
constexpr std::size_t keys = 64;

ChunkKey key_of(std::size_t k) { return ChunkKey{1 + k % 2, ChunkHash{k / 2, 7}, 0}; }

struct Written {
  bool live = false;
  std::uint64_t bytes = 0;
  std::uint64_t generation = 0;
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  L1Pool pool(16 * 4096, false, 4096);
  StoreConfig cfg;
  cfg.read_lock_ttl = std::chrono::seconds(5);
  cfg.write_lock_ttl = std::chrono::seconds(8);
  KvStore store(pool, cfg);
  TimePoint now{};
  std::array<Written, keys> written{};
  std::vector<std::byte> expect(sizes.back());
  // A present chunk holds its own bytes, in a slot of its size inside one slab.
  auto check = [&](std::size_t j) {
    const auto* e = store.find(key_of(j));
    if (!e) return;
    const std::uint64_t bytes = store.slot_bytes(*e);
    if (!written[j].live || bytes != written[j].bytes) std::abort();
    if (e->slot % pool.slab_bytes() + bytes > pool.slab_bytes()) std::abort();
    std::memset(expect.data(), static_cast<int>(j + 1), bytes);
    if (std::memcmp(pool.data(e->slot), expect.data(), bytes) != 0) std::abort();
  };
  for (std::size_t i = 0; i + 1 < size; i += 2) {
    const std::uint8_t op = data[i] & 7, arg = data[i + 1];
    const std::size_t k = arg % keys;
    const Holder holder = arg >> 6u;
    const ChunkKey key = key_of(k);
    switch (op) {
      case 0:
      case 1: {
        const Writer w{sizes[(data[i] >> 3) % sizes.size()], Owner{arg & 3u}, (data[i] & 0x80) ? 6u : 0u};
        Slot slot = 0;
        std::uint64_t gen = 0;
        if (store.reserve(key, w, now, slot, gen) == KvStore::Reserve::reserved) {
          std::memset(pool.data(slot), static_cast<int>(k + 1), w.slot_bytes);
          written[k] = {true, w.slot_bytes, gen};
        }
        break;
      }
      case 2: store.commit(key, written[k].generation, now); break;
      case 3: store.abort(key, written[k].generation); break;
      case 4: store.lock(key, holder, now); break;
      case 5:
        if (arg & 0x20) store.release_all(key, holder);
        else store.release_one(key, holder);
        break;
      case 6: {
        std::vector<ChunkHash> hs;
        for (std::size_t j = 0; j < (arg & 7u); ++j) hs.push_back(key_of(2 * j).hash);
        store.lookup(1, 1, hs, now, (arg & 8) ? std::optional<Holder>(holder) : std::nullopt);
        break;
      }
      default:
        if (arg == 0xff) store.clear();
        now += std::chrono::milliseconds(arg * 40);
        store.tick(now);
        break;
    }
    if (pool.bytes_used() + pool.bytes_wasted() > std::uint64_t{pool.num_slabs()} * pool.slab_bytes()) std::abort();
    if (store.pinned_bytes() > pool.bytes_used()) std::abort();
    check(k);
  }
  for (std::size_t j = 0; j < keys; ++j) check(j);
  return 0;
}
