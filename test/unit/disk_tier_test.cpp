// The disk tier as the server drives it (lib/store/disk_tier.hpp), on real
// files in a temporary directory: chunks written and read back byte-exact,
// found again after a reopen, corruption, truncation and unfinished writes
// dropped and counted (never served), injected EIO, ENOSPC and stalls
// making the tier degraded and probes bringing it back, the in-flight and
// layout bounds.
#include <doctest/doctest.h>

#include <poll.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "store/disk_tier.hpp"

using namespace kvlink;
using namespace kvlink::store;
using namespace std::chrono_literals;

namespace {

constexpr std::uint64_t kChunk = 6000;  // a partial last block

ChunkKey key(std::uint64_t i) { return ChunkKey{5, ChunkHash{i * 7919 + 1, i}, 0}; }

std::vector<std::byte> bytes_of(std::uint64_t i, std::uint64_t size = kChunk) {
  std::vector<std::byte> b(size);
  for (std::size_t j = 0; j < b.size(); ++j) b[j] = static_cast<std::byte>((j * 13 + i * 5) & 0xff);
  return b;
}

struct Dir {
  std::string path;
  Dir() {
    std::string tmpl = "/tmp/kvlink-tier-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~Dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string data_file() const { return path + "/" + DiskFiles::data_file_name(0, kChunk); }
};

DiskTierConfig config_for(const Dir& dir) {
  DiskTierConfig c;
  c.dir = dir.path;
  c.capacity_bytes = 16 * disk_slot_stride(kChunk);
  c.health.probe_initial = 10ms;
  c.health.probe_jitter = 0;
  c.health.op_deadline = 200ms;
  return c;
}

struct Tier {
  std::unique_ptr<DiskTier> tier;
  TimePoint now = Clock::now();
  explicit Tier(const DiskTierConfig& c) {
    auto t = DiskTier::open(c, 1, now);
    REQUIRE_MESSAGE(t, t.error().message());
    tier = std::move(*t);
  }
  DiskTier* operator->() { return tier.get(); }
  // Runs completions until nothing is in flight (or 5 s).
  void settle() {
    for (int i = 0; i < 100; ++i) {
      pollfd p{tier->event_fd(), POLLIN, 0};
      (void)::poll(&p, 1, tier->files().in_flight() > 0 ? 50 : 0);
      tier->on_ready(now);  // released stalls are not in flight, but still to reap
      if (tier->files().in_flight() == 0) break;
    }
    REQUIRE(tier->files().in_flight() == 0);
  }
  // Reads key i: the error, and the bytes.
  std::pair<Error, std::vector<std::byte>> read(std::uint64_t i) {
    std::pair<Error, std::vector<std::byte>> got{Error(errc::timed_out, "no completion"), {}};
    auto err = tier->get(key(i), now, [&](const Error& e, std::span<const std::byte> b) {
      got = {e, std::vector<std::byte>(b.begin(), b.end())};
    });
    if (err) return {err, {}};
    settle();
    return got;
  }
  void write(std::uint64_t i) {
    REQUIRE(tier->put(key(i), bytes_of(i), now));
    settle();
  }
};

}  // namespace

TEST_CASE("disk tier: a chunk put is read back byte-exact, and only once it is complete") {
  Dir dir;
  Tier t(config_for(dir));
  REQUIRE(t->put(key(1), bytes_of(1), t.now));
  CHECK_FALSE(t->holds(key(1)));  // being written: no lookup may count on it
  t.settle();
  CHECK(t->holds(key(1)) == kChunk);
  auto [err, got] = t.read(1);
  REQUIRE_MESSAGE(!err, err.message());
  CHECK(got == bytes_of(1));
  const auto s = t->stats();
  CHECK(s.writes == 1);
  CHECK(s.write_bytes == kChunk);
  CHECK(s.reads == 1);
  CHECK(s.chunks == 1);
  CHECK(t.read(2).first == errc::not_found);
}

TEST_CASE("disk tier: full, it evicts its least recently used chunk") {
  Dir dir;
  Tier t(config_for(dir));
  for (std::uint64_t i = 0; i < 17; ++i) t.write(i);
  CHECK_FALSE(t->holds(key(0)));
  CHECK(t->holds(key(16)));
  CHECK(t->stats().evictions == 1);
  CHECK(t->stats().chunks == 16);
}

TEST_CASE("disk tier: a reopen (a restart) finds the chunks again, byte-exact") {
  Dir dir;
  {
    Tier t(config_for(dir));
    for (std::uint64_t i = 0; i < 5; ++i) t.write(i);
  }
  Tier t(config_for(dir));
  CHECK(t->stats().recovered_chunks == 5);
  for (std::uint64_t i = 0; i < 5; ++i) {
    auto [err, got] = t.read(i);
    REQUIRE_MESSAGE(!err, err.message());
    CHECK(got == bytes_of(i));
  }
}

TEST_CASE("disk tier: flipped bytes are found by the checksum, dropped and counted, never served") {
  Dir dir;
  { Tier t(config_for(dir)); t.write(0); t.write(1); }
  {
    std::fstream f(dir.data_file(), std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(f);
    f.seekp(100);  // inside slot 0's chunk
    f.put('\x5a');
  }
  Tier t(config_for(dir));
  auto [err, got] = t.read(0);
  CHECK(err);
  CHECK(got.empty());
  CHECK_FALSE(t->holds(key(0)));
  CHECK(t->stats().corrupt_dropped == 1);
  CHECK(t.read(1).second == bytes_of(1));
}

TEST_CASE("disk tier: a truncated data file drops the chunks past its end at start") {
  Dir dir;
  { Tier t(config_for(dir)); for (std::uint64_t i = 0; i < 4; ++i) t.write(i); }
  std::filesystem::resize_file(dir.data_file(), 2 * disk_slot_stride(kChunk));
  Tier t(config_for(dir));
  CHECK(t->stats().recovered_chunks == 2);
  CHECK(t->stats().corrupt_dropped == 2);
  CHECK(t.read(1).second == bytes_of(1));
  CHECK(t.read(3).first == errc::not_found);
}

TEST_CASE("disk tier: a write that never completed (a crash mid-write) is dropped at start") {
  Dir dir;
  {
    Tier t(config_for(dir));
    t.write(0);
    t->files().inject(DiskFault::stall, 1);  // its completion never reaches the index
    REQUIRE(t->put(key(1), bytes_of(1), t.now));
  }
  Tier t(config_for(dir));
  CHECK(t->startup().recovery.incomplete_writes == 1);
  CHECK_FALSE(t->holds(key(1)));
  CHECK(t.read(0).second == bytes_of(0));
}

TEST_CASE("disk tier: EIO makes it degraded (nothing goes to it), probes bring it back") {
  Dir dir;
  Tier t(config_for(dir));
  t.write(0);
  t->files().inject(DiskFault::eio, 1);  // the next put's journal record
  CHECK_FALSE(t->put(key(1), bytes_of(1), t.now));
  CHECK_FALSE(t->accepting());
  CHECK(t->state() == TierState::degraded);
  CHECK_FALSE(t->holds(key(1)));
  CHECK(t->index().writing() == 0);  // not half-recorded
  CHECK_FALSE(t->put(key(2), bytes_of(2), t.now));  // skipped, not queued
  CHECK(t->stats().writes_skipped == 2);
  CHECK(t.read(0).first == errc::not_connected);  // lookups do not wait on it
  t->files().inject(DiskFault::eio, 1);  // the first probe fails too
  t.now += 50ms;
  t->tick(t.now);
  t.settle();
  CHECK_FALSE(t->accepting());
  t.now += 1s;
  t->tick(t.now);  // the next probe succeeds
  t.settle();
  CHECK(t->accepting());
  CHECK(t->stats().transitions == 2);
  CHECK(t->stats().io_errors == 1);  // the failed probe counts as a probe
  CHECK(t.read(0).second == bytes_of(0));
  t.write(1);
  CHECK(t.read(1).second == bytes_of(1));
}

TEST_CASE("disk tier: ENOSPC on the journal makes it degraded; the chunk is not half-recorded") {
  Dir dir;
  Tier t(config_for(dir));
  t.write(0);
  t->files().inject(DiskFault::enospc, 1);
  CHECK_FALSE(t->put(key(1), bytes_of(1), t.now));
  CHECK_FALSE(t->accepting());
  CHECK_FALSE(t->holds(key(1)));
  CHECK(t->index().writing() == 0);
}

TEST_CASE("disk tier: an I/O stalled past its deadline makes it degraded; it recovers once the disk answers") {
  Dir dir;
  Tier t(config_for(dir));
  t->files().inject(DiskFault::stall, 1);
  REQUIRE(t->put(key(0), bytes_of(0), t.now));
  pollfd p{t->event_fd(), POLLIN, 0};
  (void)::poll(&p, 1, 100);
  t->on_ready(t.now);  // the completion is held back: the "disk" does not answer
  t.now += 199ms;
  t->tick(t.now);
  CHECK(t->accepting());
  t.now += 1ms;
  t->tick(t.now);
  CHECK_FALSE(t->accepting());
  CHECK(t->stats().stalls == 1);
  t->files().release_stalled();
  t.settle();
  CHECK(t->holds(key(0)));  // it did complete, late: it stands
  t.now += 50ms;
  t->tick(t.now);
  t.settle();
  CHECK(t->accepting());
}

TEST_CASE("disk tier: writes past the in-flight bound and chunks of a further layout are skipped") {
  Dir dir;
  auto c = config_for(dir);
  c.max_write_bytes_in_flight = 2 * disk_slot_stride(kChunk);
  Tier t(c);
  CHECK(t->put(key(0), bytes_of(0), t.now));
  CHECK(t->put(key(1), bytes_of(1), t.now));
  CHECK_FALSE(t->put(key(2), bytes_of(2), t.now));
  t.settle();
  CHECK(t->put(key(2), bytes_of(2), t.now));
  t.settle();
  CHECK_FALSE(t->put(key(3), bytes_of(3, 2 * kChunk), t.now));  // one layout only (layouts = 1)
  CHECK(t->stats().writes_skipped == 2);
  CHECK(t->stats().writes == 3);
}

TEST_CASE("disk tier: its directory deleted or replaced under it -> degraded at once (no writes into files nobody "
          "will find), then it starts afresh there by itself") {
  Dir dir;
  auto c = config_for(dir);
  c.dir = dir.path + "/tier";
  Tier t(c);
  t.write(0);
  const int event_fd = t->event_fd();
  std::filesystem::remove_all(c.dir);
  t.now += 1s;
  t->tick(t.now);
  CHECK_FALSE(t->accepting());
  CHECK_FALSE(t->put(key(1), bytes_of(1), t.now));
  // Probes (with backoff; one waits for I/O of the old files still in
  // flight): the directory is made again, empty.
  const auto probe_until_healthy = [&] {
    for (int i = 0; i < 20 && !t->accepting(); ++i) {
      t.now += 1s;
      t->tick(t.now);
      t.settle();
    }
  };
  probe_until_healthy();
  CHECK(t->accepting());
  CHECK(std::filesystem::is_directory(c.dir));
  CHECK(t->event_fd() == event_fd);  // what the server waits on stays
  CHECK_FALSE(t->holds(key(0)));      // gone with the old files
  t.write(1);
  CHECK(t.read(1).second == bytes_of(1));
  // Replaced by another directory under the same name: the same.
  std::filesystem::rename(c.dir, dir.path + "/old");
  std::filesystem::create_directory(c.dir);
  t.now += 2s;
  t->tick(t.now);
  CHECK_FALSE(t->accepting());
  probe_until_healthy();
  CHECK(t->accepting());
  t.write(2);
  CHECK(t.read(2).second == bytes_of(2));
  CHECK(t->stats().transitions == 4);
  // And a restart on the directory finds what was written after.
  t.tier.reset();
  Tier again(c);
  CHECK(again.read(2).second == bytes_of(2));
}
