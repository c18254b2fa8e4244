// The CPU engine's gather/scatter math (both vLLM layouts, skipped tokens,
// out-of-range ids), memfd mapping errors, and CpuTransferEngine's thread
// pool posting completions to the io_context. No sockets.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <asio/io_context.hpp>
#include <cstring>
#include <thread>

#include "kvlink/error.hpp"
#include "kvlink/transfer/cpu_copy.hpp"
#include "kvlink/transfer/cpu_engine.hpp"
#include "kvlink/transfer/kv_memfd.hpp"

using namespace kvlink;
using namespace kvlink::transfer;

namespace {

// 3 layers, 8 blocks of 4 tokens, 1 head x 2 x 2 bytes: 4 bytes per token,
// 16 per block; a chunk is 2 blocks (8 tokens).
wire::KvLayout small_layout(bool block_first) {
  wire::KvLayout l = wire::paged_layout(3, 8, 4, 1, 2, 2, block_first ? wire::PagedOrder::blocks_first : wire::PagedOrder::planes_first);
  REQUIRE_FALSE(l.check());
  return l;
}

std::shared_ptr<const Mapping> anonymous(std::size_t size) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  return std::make_shared<const Mapping>(static_cast<std::byte*>(p), size);
}

std::shared_ptr<Registration> make_reg(bool block_first) {
  auto r = std::make_shared<Registration>();
  r->layout = small_layout(block_first);
  r->blocks_per_chunk = 2;
  r->slot_bytes = std::uint64_t{r->layout.num_layers} * 2 * 2 * r->layout.block_bytes();
  r->memory = anonymous(r->layout.region_bytes);
  return r;
}

// A byte that names its place: layer, plane, block id, byte in block.
std::byte pattern(std::uint32_t layer, std::uint32_t plane, std::uint32_t block, std::uint64_t i) {
  return static_cast<std::byte>((layer * 61 + plane * 31 + block * 7 + i * 3 + 1) & 0xff);
}

void fill(const Registration& r) {
  const auto& l = r.layout;
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane)
      for (std::uint32_t b = 0; b < l.num_blocks; ++b)
        for (std::uint64_t i = 0; i < l.block_bytes(); ++i)
          r.memory->base()[engine_offset(l, layer, plane, b) + i] = pattern(layer, plane, b, i);
}

std::byte engine_byte(const Registration& r, std::uint32_t layer, std::uint32_t plane, std::uint32_t b,
                      std::uint64_t i) {
  return r.memory->base()[engine_offset(r.layout, layer, plane, b) + i];
}

}  // namespace

TEST_CASE("slot layout is [layer][plane][block] and both vLLM layouts gather and scatter") {
  for (bool block_first : {false, true}) {
    CAPTURE(block_first);
    auto reg = make_reg(block_first);
    const auto& l = reg->layout;
    fill(*reg);
    std::vector<std::byte> slot(reg->slot_bytes);
    ChunkCopy c{slot.data(), {5, 2}};
    REQUIRE_FALSE(copy_chunk(Direction::store, *reg, *reg->memory, c, 0));
    CHECK(slot_offset(l, 2, 2, 1, 1) + l.block_bytes() == reg->slot_bytes);  // the last block ends the slot
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
      for (std::uint32_t plane = 0; plane < 2; ++plane)
        for (std::uint32_t j = 0; j < 2; ++j)
          for (std::uint64_t i = 0; i < l.block_bytes(); ++i)
            REQUIRE(slot[slot_offset(l, 2, layer, plane, j) + i] == pattern(layer, plane, c.block_ids[j], i));

    // Scatter into other blocks of zeroed memory: exactly those blocks change.
    std::memset(reg->memory->base(), 0, reg->memory->size());
    ChunkCopy back{slot.data(), {1, 7}};
    REQUIRE_FALSE(copy_chunk(Direction::retrieve, *reg, *reg->memory, back, 0));
    std::size_t nonzero = 0;
    for (std::size_t i = 0; i < reg->memory->size(); ++i) nonzero += reg->memory->base()[i] != std::byte{0};
    for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
      for (std::uint32_t plane = 0; plane < 2; ++plane)
        for (std::uint64_t i = 0; i < l.block_bytes(); ++i) {
          REQUIRE(engine_byte(*reg, layer, plane, 1, i) == pattern(layer, plane, 5, i));
          REQUIRE(engine_byte(*reg, layer, plane, 7, i) == pattern(layer, plane, 2, i));
        }
    CHECK(nonzero == 2 * 2 * l.num_layers * l.block_bytes());  // nothing else was written
  }
}

TEST_CASE("retrieve leaves the first skip_first_n_tokens untouched: whole blocks and the head of a partial one") {
  auto reg = make_reg(false);
  const auto& l = reg->layout;
  fill(*reg);
  // Two chunks (16 tokens) stored from blocks 0,1 and 2,3.
  std::vector<std::byte> s0(reg->slot_bytes), s1(reg->slot_bytes);
  TransferJob store;
  store.direction = Direction::store;
  store.registration = reg;
  store.chunks = {{s0.data(), {0, 1}}, {s1.data(), {2, 3}}};
  REQUIRE_FALSE(copy_chunks(store, 0, 2));
  std::memset(reg->memory->base(), 0, reg->memory->size());
  // Retrieve into 4,5,6,7 skipping 10 tokens: chunk 0 entirely (8), then 2
  // tokens (8 bytes) of block 6.
  TransferJob ret;
  ret.direction = Direction::retrieve;
  ret.registration = reg;
  ret.skip_first_n_tokens = 10;
  ret.chunks = {{s0.data(), {4, 5}}, {s1.data(), {6, 7}}};
  REQUIRE_FALSE(copy_chunks(ret, 0, 2));
  for (std::uint32_t layer = 0; layer < l.num_layers; ++layer)
    for (std::uint32_t plane = 0; plane < 2; ++plane)
      for (std::uint64_t i = 0; i < l.block_bytes(); ++i) {
        CHECK(engine_byte(*reg, layer, plane, 4, i) == std::byte{0});
        CHECK(engine_byte(*reg, layer, plane, 5, i) == std::byte{0});
        CHECK(engine_byte(*reg, layer, plane, 6, i) == (i < 8 ? std::byte{0} : pattern(layer, plane, 2, i)));
        CHECK(engine_byte(*reg, layer, plane, 7, i) == pattern(layer, plane, 3, i));
      }
  // Splitting a job by chunk gives the same bytes as one part.
  std::memset(reg->memory->base(), 0, reg->memory->size());
  REQUIRE_FALSE(copy_chunks(ret, 1, 2));
  CHECK(engine_byte(*reg, 0, 0, 6, 7) == std::byte{0});
  CHECK(engine_byte(*reg, 0, 0, 6, 8) == pattern(0, 0, 2, 8));
}

TEST_CASE("out-of-range block ids and missing memory fail before anything is written") {
  auto reg = make_reg(true);
  std::vector<std::byte> slot(reg->slot_bytes, std::byte{0x5a});
  ChunkCopy bad{slot.data(), {1, 8}};
  auto why = copy_chunk(Direction::retrieve, *reg, *reg->memory, bad, 0).message();
  CHECK(why.find("block id 8 is not below the registered num_blocks 8") != std::string::npos);
  for (std::size_t i = 0; i < reg->memory->size(); ++i) REQUIRE(reg->memory->base()[i] == std::byte{0});
  // A mapping smaller than the layout claims: refused, not overrun.
  auto small = anonymous(reg->layout.region_bytes / 2);
  ChunkCopy last{slot.data(), {6, 7}};
  why = copy_chunk(Direction::retrieve, *reg, *small, last, 0).message();
  CHECK(why.find("outside the") != std::string::npos);
  ChunkCopy wrong_count{slot.data(), {1}};
  CHECK(copy_chunk(Direction::store, *reg, *reg->memory, wrong_count, 0) == errc::bad_request);
  TransferJob job;
  job.registration = std::make_shared<Registration>(Registration{});
  job.chunks = {{slot.data(), {0, 1}}};
  CHECK(copy_chunks(job, 0, 1).message().find("no mapped memory") != std::string::npos);
}

namespace {
// A memfd of `bytes` sealed by create_kv_memfd, as an engine registers it.
UniqueFd sealed_memfd(std::uint64_t bytes) {
  wire::KvLayout l;
  l.region_bytes = bytes;
  auto kv = create_kv_memfd(l, {.name = "kvlink-test", .map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  return std::move(kv->fd);
}
}  // namespace

TEST_CASE("map_memfd: maps a sealed, large-enough memfd shared, refuses a small one or none, closes the fd") {
  CHECK(map_memfd(UniqueFd{}, 4096).error().message() == "no memfd received with REGISTER_KV_CACHE");
  UniqueFd fd = sealed_memfd(4096);
  REQUIRE(fd);
  const int raw = fd.get();
  auto small = map_memfd(duplicate_fd(raw), 8192);
  CHECK_FALSE(small);
  CHECK(small.error() == errc::bad_request);
  CHECK(small.error().message() ==
        "memfd is 4096 bytes, layout needs 8192 (region_bytes); a sealed memfd cannot grow: create it at "
        "region_bytes, e.g. with kvlink::transfer::create_kv_memfd(layout)");
  UniqueFd dup2 = duplicate_fd(raw);
  const int dup2_raw = dup2.get();
  auto mapped = map_memfd(std::move(dup2), 4096);
  REQUIRE_MESSAGE(mapped, mapped.error().message());
  CHECK(::fcntl(dup2_raw, F_GETFD) == -1);  // closed; the mapping keeps the memory
  const std::shared_ptr<const Mapping> m = *mapped;
  REQUIRE(m);
  m->base()[100] = std::byte{42};
  std::byte b{};
  REQUIRE(::pread(raw, &b, 1, 100) == 1);
  CHECK(b == std::byte{42});  // MAP_SHARED: the engine sees the server's writes
}

TEST_CASE("map_memfd: refuses an fd whose size is not sealed, naming the missing seals and the fix") {
  // These memfds are made by hand on purpose: unsealed, half sealed, and
  // not sealable at all.
  UniqueFd unsealed(::memfd_create("kvlink-test-unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(unsealed);
  REQUIRE(::ftruncate(unsealed.get(), 8192) == 0);
  std::string why = map_memfd(duplicate_fd(unsealed.get()), 4096).error().message();
  CHECK_MESSAGE(why.find("not sealed against resizing (it lacks F_SEAL_SHRINK and F_SEAL_GROW)") != std::string::npos,
                why);
  CHECK(why.find("seal the memfd with F_SEAL_SHRINK|F_SEAL_GROW, e.g. with kvlink::transfer::create_kv_memfd") !=
        std::string::npos);
  REQUIRE(::fcntl(unsealed.get(), F_ADD_SEALS, F_SEAL_SHRINK) == 0);
  why = map_memfd(duplicate_fd(unsealed.get()), 4096).error().message();
  CHECK_MESSAGE(why.find("(it lacks F_SEAL_GROW)") != std::string::npos, why);
  REQUIRE(::fcntl(unsealed.get(), F_ADD_SEALS, F_SEAL_GROW) == 0);
  CHECK_FALSE(check_memfd_seals(unsealed.get()));  // both: accepted, F_SEAL_SEAL or not

  // Created without MFD_ALLOW_SEALING: it can never take the seals.
  UniqueFd unsealable(::memfd_create("kvlink-test-unsealable", MFD_CLOEXEC));
  REQUIRE(unsealable);
  REQUIRE(::ftruncate(unsealable.get(), 4096) == 0);
  why = map_memfd(duplicate_fd(unsealable.get()), 4096).error().message();
  CHECK(why.find("lacks F_SEAL_SHRINK and F_SEAL_GROW") != std::string::npos);
  CHECK(why.find("MFD_ALLOW_SEALING") != std::string::npos);

  // Not a memfd (a regular file, a device): F_GET_SEALS fails.
  UniqueFd device(::open("/dev/null", O_RDWR | O_CLOEXEC));
  REQUIRE(device);
  auto not_memfd = map_memfd(duplicate_fd(device.get()), 4096);
  CHECK_FALSE(not_memfd);
  why = not_memfd.error().message();
  CHECK_MESSAGE(why.find("cannot be sealed") != std::string::npos, why);
  CHECK(why.find("a regular file") != std::string::npos);
  CHECK(why.find("create_kv_memfd") != std::string::npos);
}

TEST_CASE("CpuTransferEngine: refuses a REGISTER without memfd, splits jobs, completes on the io thread") {
  asio::io_context io;
  CpuTransferEngine engine(io.get_executor(), 2);
  CHECK(engine.threads() == 2);
  Registration r;
  r.layout = small_layout(false);
  CHECK(engine.attach(r, UniqueFd{}).message().find("no memfd received with REGISTER_KV_CACHE") == 0);
  r.layout.backend = wire::KvBackend::cuda_ipc;
  CHECK(engine.attach(r, UniqueFd{}).message().find("cpu_memfd") != std::string::npos);

  auto reg = make_reg(false);
  fill(*reg);
  std::vector<std::vector<std::byte>> slots(4, std::vector<std::byte>(reg->slot_bytes));
  TransferJob job;
  job.direction = Direction::store;
  job.registration = reg;
  for (std::uint32_t i = 0; i < 4; ++i) job.chunks.push_back({slots[i].data(), {2 * i, 2 * i + 1}});
  std::error_code result = kvlink::errc::timed_out;
  std::thread::id ran_on;
  int calls = 0;
  engine.submit(std::move(job), [&](std::error_code ec) {
    result = ec;
    ran_on = std::this_thread::get_id();
    ++calls;
  });
  TransferJob bad;
  bad.direction = Direction::retrieve;
  bad.registration = reg;
  bad.chunks = {{slots[0].data(), {0, 99}}};
  std::error_code bad_result;
  engine.submit(std::move(bad), [&](std::error_code ec) {
    bad_result = ec;
    ++calls;
  });
  engine.submit(TransferJob{}, [&](std::error_code) { ++calls; });  // nothing to copy
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (calls < 3 && std::chrono::steady_clock::now() < deadline) {
    io.restart();  // ran out of work before the pool posted
    io.run_one_for(std::chrono::milliseconds(10));
  }
  REQUIRE(calls == 3);
  CHECK(!result);
  CHECK(ran_on == std::this_thread::get_id());
  CHECK(bad_result == kvlink::errc::bad_request);
  for (std::uint32_t i = 0; i < 4; ++i)
    CHECK(slots[i][slot_offset(reg->layout, 2, 2, 1, 1)] == pattern(2, 1, 2 * i + 1, 0));
}

TEST_CASE("CpuTransferEngine: a copy in flight is outstanding work, so io_context::run waits for its completion") {
  asio::io_context io;
  CpuTransferEngine engine(io.get_executor(), 1);
  auto reg = make_reg(false);
  std::vector<std::byte> slot(reg->slot_bytes);
  int done = 0;
  for (int i = 0; i < 8; ++i) {
    TransferJob job;
    job.direction = Direction::store;
    job.registration = reg;
    job.chunks = {{slot.data(), {0, 1}}};
    engine.submit(std::move(job), [&](std::error_code ec) {
      CHECK(!ec);
      ++done;
    });
  }
  io.run();  // returns once nothing is outstanding
  CHECK(done == 8);
}

TEST_CASE("a job past its fence copies nothing and says so") {
  auto reg = make_reg(false);
  fill(*reg);
  std::vector<std::byte> slot(reg->slot_bytes, std::byte{0x5a});
  TransferJob store;
  store.direction = Direction::store;
  store.registration = reg;
  store.chunks = {{slot.data(), {0, 1}}};
  store.fence = kvlink::Clock::now() - std::chrono::milliseconds(1);
  CHECK(copy_chunks(store, 0, 1) == errc::timed_out);
  CHECK(std::all_of(slot.begin(), slot.end(), [](std::byte b) { return b == std::byte{0x5a}; }));
  TransferJob ret = store;
  ret.direction = Direction::retrieve;
  std::memset(reg->memory->base(), 0x11, reg->memory->size());
  CHECK(copy_chunks(ret, 0, 1) == errc::timed_out);
  const auto* m = reg->memory->base();
  CHECK(std::all_of(m, m + reg->memory->size(), [](std::byte b) { return b == std::byte{0x11}; }));
  // A fence in the future does not stop it.
  ret.fence = kvlink::Clock::now() + std::chrono::seconds(60);
  CHECK_FALSE(copy_chunks(ret, 0, 1));
  CHECK(engine_byte(*reg, 0, 0, 0, 0) == std::byte{0x5a});
}
