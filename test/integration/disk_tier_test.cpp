// The disk tier (--l2-disk) end to end: the real kvlink-server, both
// adapters, every retrieved byte checked. Evictions written back and hit
// again from disk, a warm restart after SIGKILL, flipped bytes and a
// truncated file, a full filesystem (a tmpfs the test mounts). Runs in the
// plain build only (test/meson.build): the sanitizer builds run the rest.
#include <doctest/doctest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "e2e_fixture.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using namespace kvlink::test::e2e;
using kvlink::test::TempDir;
using kvlink::test::eventually;

namespace {
// Whether this process may mount a tmpfs (root, outside a locked-down
// container): the full-filesystem test needs one.
bool can_mount_tmpfs() {
  char tmpl[] = "/tmp/kvlink-mount-XXXXXX";
  if (!::mkdtemp(tmpl)) return false;
  const bool ok = ::mount("tmpfs", tmpl, "tmpfs", 0, "size=64k") == 0;
  if (ok) ::umount(tmpl);
  ::rmdir(tmpl);
  return ok;
}
const bool no_tmpfs = !can_mount_tmpfs();

}  // namespace

TEST_CASE("e2e: disk tier: chunks L1 evicted are written back and come back as hits from disk, byte-exact") {
  TempDir disk;
  Fixture f("131072", {"--l2-disk", disk.path() + "/tier", "--l2-disk-size", "4MiB"});  // L1: 16 chunks
  f.server.start();
  f.make();
  const auto prompts = store_prompts(f, 6);  // 24 chunks
  CHECK(f.stat("evictions") >= 8);
  REQUIRE(eventually([&] { return f.stat("disk_writes") >= 8; }));
  CHECK(f.stat("disk_writes_skipped") == 0);
  // The first prompts left L1: their lookups find them on disk.
  CHECK(hit_and_verify(f, "again-0", prompts[0]) == 4 * chunk);
  CHECK(hit_and_verify(f, "again-1", prompts[1]) == 4 * chunk);
  CHECK(f.stat("tier_lookup_hits") >= 8);
  CHECK(f.stat("disk_reads") >= 8);
  CHECK(f.stat("disk_corrupt_dropped") == 0);
  // Two-phase lookups (a pending job while the disk reads) hit the same way.
  f.make(LookupMode::two_phase);
  CHECK(hit_and_verify(f, "again-2", prompts[2]) == 4 * chunk);
}

TEST_CASE("e2e: disk tier: after SIGKILL and a restart on the same directory the chunks are hits again") {
  TempDir disk;
  Fixture f("64MiB", {"--l2-disk", disk.path() + "/tier", "--l2-disk-size", "4MiB", "--l2-write-through"});
  f.server.start();
  f.make();
  const auto prompts = store_prompts(f, 3);
  REQUIRE(eventually([&] { return f.stat("disk_writes") == 12; }));
  f.server.kill();
  f.server.start();
  reconnected(f);
  CHECK(f.stat("disk_recovered_chunks") == 12);
  CHECK(f.stat("stores_committed") == 0);  // L1 starts empty: every hit below comes from disk
  for (int p = 0; p < 3; ++p) CHECK(hit_and_verify(f, "warm-" + std::to_string(p), prompts[p]) == 4 * chunk);
  CHECK(f.stat("tier_lookup_hits") == 12);
}

TEST_CASE("e2e: disk tier: flipped bytes and a truncated file are dropped and counted, never served") {
  TempDir disk;
  const std::string dir = disk.path() + "/tier";
  Fixture f("64MiB", {"--l2-disk", dir, "--l2-disk-size", "4MiB", "--l2-write-through"});
  f.server.start();
  f.make();
  const auto prompts = store_prompts(f, 3);
  REQUIRE(eventually([&] { return f.stat("disk_writes") == 12; }));
  f.server.kill();
  // Flip a byte in every one of the first 4 slots, and cut the file after 8 slots.
  const std::string data = dir + "/class-0-8192.data";
  {
    std::fstream file(data, std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(file);
    for (int slot = 0; slot < 4; ++slot) {
      file.seekp(slot * 8192 + 1000);
      file.put('\x33');
    }
  }
  std::filesystem::resize_file(data, 8 * 8192);
  f.server.start();
  reconnected(f);
  CHECK(f.stat("disk_recovered_chunks") == 8);
  std::uint32_t hits = 0;
  for (int p = 0; p < 3; ++p) hits += hit_and_verify(f, "after-" + std::to_string(p), prompts[p]);
  MESSAGE("tokens hit after the damage: " << hits << " of " << 12 * chunk);
  CHECK(hits <= 4 * chunk);  // at most the 4 intact slots' chunks
  CHECK(f.stat("disk_corrupt_dropped") >= 4 + 1);  // 4 cut off, and at least one flipped that a lookup read
  CHECK(f.stat("disk_healthy") == 1);  // a bad chunk is the chunk's problem, not the disk's
}

TEST_CASE("e2e: disk tier: a full filesystem makes the tier degraded, L1 keeps serving, and it recovers "
          "once there is room" * doctest::skip(no_tmpfs)) {
  TempDir disk;
  const std::string mnt = disk.path() + "/small";
  REQUIRE(std::filesystem::create_directory(mnt));
  REQUIRE(::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") == 0);
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  Fixture f("131072", {"--l2-disk", mnt + "/tier", "--l2-disk-size", "4MiB", "--l2-io-deadline-ms", "500"});
  f.server.start();
  f.make();
  // The tier's data file cannot be preallocated: degraded, and the engine
  // never notices (every store and retrieve succeeds from L1).
  const auto prompts = store_prompts(f, 6);
  REQUIRE(eventually([&] { return f.stat("disk_healthy") == 0; }));
  CHECK(f.stat("disk_io_errors") >= 1);
  std::this_thread::sleep_for(1s);  // probes run meanwhile: they see no room and it stays degraded, no flapping
  CHECK(f.stat("disk_transitions") == 1);
  CHECK(hit_and_verify(f, "l1-only", prompts[5]) == 4 * chunk);
  CHECK(f.state_is(health::State::healthy));
  // Room again: a probe finds it and the tier takes work again.
  REQUIRE(::mount("tmpfs", mnt.c_str(), "tmpfs", MS_REMOUNT, "size=16m") == 0);
  REQUIRE(eventually([&] { return f.stat("disk_healthy") == 1; }, 10s));
  const auto more = store_prompts(f, 6, 48);
  REQUIRE(eventually([&] { return f.stat("disk_writes") >= 8; }));
  (void)more;
}
