// The CUDA engine's copy plan (transfer/cuda_plan): checked on the CPU by
// applying its copies with memcpy to host memory standing in for device
// memory, against cpu_copy's gather/scatter of the same job. No GPU.
#include <doctest/doctest.h>
#include <sys/mman.h>

#include <cstring>
#include <random>

#include "kvlink/transfer/cpu_copy.hpp"
#include "kvlink/transfer/cuda_plan.hpp"

using namespace kvlink;
using namespace kvlink::transfer;

namespace {

std::shared_ptr<const Mapping> anonymous(std::size_t size) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  return std::make_shared<const Mapping>(static_cast<std::byte*>(p), size);
}

// 3 layers, 8 blocks of 4 tokens, 1 head x 2 x 2 bytes (16 bytes per block),
// chunks of 2 blocks, in one region (every layer's "allocation" is it).
std::shared_ptr<Registration> make_reg(wire::PagedOrder order) {
  auto r = std::make_shared<Registration>();
  r->layout = wire::paged_layout(3, 8, 4, 1, 2, 2, order);
  REQUIRE_FALSE(r->layout.check());
  r->blocks_per_chunk = 2;
  r->slot_bytes = std::uint64_t{r->layout.num_layers} * 2 * 2 * r->layout.block_bytes();
  r->memory = anonymous(r->layout.region_bytes);
  return r;
}

std::vector<DeviceAllocation> allocations(const Registration& r) {
  const auto base = reinterpret_cast<std::uintptr_t>(r.memory->base());
  return std::vector<DeviceAllocation>(r.layout.num_layers, DeviceAllocation{base, r.memory->size()});
}

void apply(const std::vector<CopySegment>& plan) {
  for (const auto& s : plan)
    std::memcpy(reinterpret_cast<void*>(s.dst), reinterpret_cast<const void*>(s.src), s.bytes);
}

void randomize(std::byte* p, std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>(rng());
}

struct Case {
  wire::PagedOrder order;
  Direction direction;
  std::vector<std::vector<std::uint32_t>> chunks;
  std::uint32_t skip = 0;
};

// Runs `c` once through the plan and once through copy_chunks on identical
// copies of engine memory and slots; both results must be byte-identical.
void same_as_cpu_copy(const Case& c, std::uint64_t merge_limit) {
  auto plan_reg = make_reg(c.order), cpu_reg = make_reg(c.order);
  const std::size_t region = plan_reg->memory->size();
  randomize(plan_reg->memory->base(), region, 1);
  std::memcpy(cpu_reg->memory->base(), plan_reg->memory->base(), region);
  std::vector<std::byte> plan_slots(c.chunks.size() * plan_reg->slot_bytes), cpu_slots(plan_slots.size());
  randomize(plan_slots.data(), plan_slots.size(), 2);
  cpu_slots = plan_slots;

  TransferJob plan_job{c.direction, plan_reg, {}, c.skip, {}}, cpu_job{c.direction, cpu_reg, {}, c.skip, {}};
  for (std::size_t i = 0; i < c.chunks.size(); ++i) {
    plan_job.chunks.push_back({plan_slots.data() + i * plan_reg->slot_bytes, c.chunks[i]});
    cpu_job.chunks.push_back({cpu_slots.data() + i * cpu_reg->slot_bytes, c.chunks[i]});
  }
  std::vector<CopySegment> plan;
  REQUIRE_FALSE(plan_copies(plan_job, allocations(*plan_reg), PlanOptions{0, merge_limit}, plan));
  apply(plan);
  REQUIRE_FALSE(copy_chunks(cpu_job, 0, cpu_job.chunks.size()));
  CHECK(std::memcmp(plan_reg->memory->base(), cpu_reg->memory->base(), region) == 0);
  CHECK(plan_slots == cpu_slots);
  for (const auto& s : plan) CHECK((merge_limit == 0 ? s.bytes <= 16 : s.bytes <= std::max<std::uint64_t>(merge_limit, 16)));
}

}  // namespace

TEST_CASE("cuda plan: the same bytes as cpu_copy for both vLLM layouts, stores and retrieves, every skip") {
  for (auto order : {wire::PagedOrder::planes_first, wire::PagedOrder::blocks_first}) {
    for (auto direction : {Direction::store, Direction::retrieve}) {
      // Two chunks of two blocks each (16 tokens): skip every token count.
      for (std::uint32_t skip = 0; skip <= 16; ++skip) {
        for (std::uint64_t merge : {0, 64, 1 << 20}) {
          CAPTURE(static_cast<int>(order));
          CAPTURE(static_cast<int>(direction));
          CAPTURE(skip);
          CAPTURE(merge);
          same_as_cpu_copy({order, direction, {{5, 2}, {3, 4}}, skip}, merge);
        }
      }
    }
  }
}

TEST_CASE("cuda plan: skip applies at token granularity on retrieve and never on store") {
  auto reg = make_reg(wire::PagedOrder::planes_first);
  const auto layers = allocations(*reg);
  std::vector<std::byte> slot(reg->slot_bytes);
  TransferJob job{Direction::retrieve, reg, {{slot.data(), {6, 7}}}, 5, {}};
  std::vector<CopySegment> plan;
  REQUIRE_FALSE(plan_copies(job, layers, {}, plan));
  // Block 0 of the chunk (tokens 0-3) is skipped whole; block 1 from token 1
  // (4 bytes per token): 12 bytes per layer and plane, 3 layers x 2 planes.
  REQUIRE(plan.size() == 6);
  const auto base = reinterpret_cast<std::uintptr_t>(reg->memory->base());
  const auto slot_base = reinterpret_cast<std::uintptr_t>(slot.data());
  for (const auto& s : plan) CHECK(s.bytes == 12);
  CHECK(plan[0].dst == base + engine_offset(reg->layout, 0, 0, 7) + 4);
  CHECK(plan[0].src == slot_base + slot_offset(reg->layout, 2, 0, 0, 1) + 4);

  job.direction = Direction::store;
  plan.clear();
  REQUIRE_FALSE(plan_copies(job, layers, {}, plan));
  CHECK(plan.size() == 12);
  CHECK(plan_bytes(plan) == reg->slot_bytes);

  job.direction = Direction::retrieve;
  job.skip_first_n_tokens = 8;  // the whole chunk: nothing to copy
  plan.clear();
  REQUIRE_FALSE(plan_copies(job, layers, {}, plan));
  CHECK(plan.empty());
}

TEST_CASE("cuda plan: contiguous blocks merge up to the limit; host_offset moves the host side") {
  auto reg = make_reg(wire::PagedOrder::planes_first);  // blocks of a plane are adjacent
  const auto layers = allocations(*reg);
  std::vector<std::byte> slot(reg->slot_bytes);
  TransferJob job{Direction::store, reg, {{slot.data(), {2, 3}}}, 0, {}};
  std::vector<CopySegment> plan;
  REQUIRE_FALSE(plan_copies(job, layers, PlanOptions{1000, 32}, plan));
  // Blocks 2 and 3 are adjacent in the engine and in the slot: one copy per
  // layer and plane.
  REQUIRE(plan.size() == 6);
  const auto slot_base = reinterpret_cast<std::uintptr_t>(slot.data());
  CHECK(plan[0] == CopySegment{slot_base + 1000, reinterpret_cast<std::uintptr_t>(reg->memory->base()) +
                                                     engine_offset(reg->layout, 0, 0, 2), 32});
  plan.clear();
  REQUIRE_FALSE(plan_copies(job, layers, PlanOptions{0, 16}, plan));
  CHECK(plan.size() == 12);  // the limit forbids merging
  job.chunks[0].block_ids = {3, 2};  // not in order: nothing merges
  plan.clear();
  REQUIRE_FALSE(plan_copies(job, layers, PlanOptions{0, 1 << 20}, plan));
  CHECK(plan.size() == 12);
}

TEST_CASE("cuda plan: bad block ids and short allocations are refused before anything is planned") {
  auto reg = make_reg(wire::PagedOrder::blocks_first);
  auto layers = allocations(*reg);
  std::vector<std::byte> slot(reg->slot_bytes * 2);
  std::vector<CopySegment> plan{{1, 2, 3}};
  TransferJob job{Direction::store, reg, {{slot.data(), {0, 1}}, {slot.data() + reg->slot_bytes, {1, 8}}}, 0, {}};
  std::string why = plan_copies(job, layers, {}, plan).message();
  CHECK(why.find("chunk 1") != std::string::npos);
  CHECK(why.find("block id 8 is not below the registered num_blocks 8") != std::string::npos);
  CHECK(plan.size() == 1);  // untouched

  job.chunks[1].block_ids = {1};
  CHECK(plan_copies(job, layers, {}, plan).message().find("1 block ids for a chunk of 2 blocks") != std::string::npos);

  job.chunks[1].block_ids = {1, 7};
  layers[2].size = reg->layout.layers[2].offset + 7 * reg->layout.block_stride;  // block 7 of layer 2 is cut off
  why = plan_copies(job, layers, {}, plan).message();
  CHECK(why.find("block id 7 of layer 2 lies outside") != std::string::npos);

  layers.pop_back();
  CHECK(plan_copies(job, layers, {}, plan).message().find("2 opened allocations") != std::string::npos);
  CHECK(plan.size() == 1);
  job.registration = nullptr;
  const Error err = plan_copies(job, layers, {}, plan);
  CHECK(err == errc::bad_request);
  CHECK(err.message() == "the job has no registration");
}
