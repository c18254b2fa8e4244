// The disk tier's files (lib/store/disk_files.hpp) in a temporary directory:
// io_uring slot I/O byte-exact, the journal across a reopen (torn tail
// included), corruption and truncation detected, injected faults reported.
// Driven by the index (store/disk_index.hpp) as the server will drive it.
#include <doctest/doctest.h>

#include <poll.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <linux/magic.h>

#include "kvlink/store/disk_index.hpp"
#include "kvlink/store/tier_health.hpp"
#include "store/disk_files.hpp"

using namespace kvlink;
using namespace kvlink::store;
using namespace std::chrono_literals;

namespace {

constexpr std::uint64_t kChunk = 6000;  // a partial last block: the slot is 8192 bytes

ChunkKey key(std::uint64_t i) { return ChunkKey{9, ChunkHash{i * 104729 + 3, i}, 0}; }

std::string fs_name(long type) {
  switch (type) {
    case TMPFS_MAGIC: return "tmpfs";
    case OVERLAYFS_SUPER_MAGIC: return "overlay";
    case EXT4_SUPER_MAGIC: return "ext4";
    case XFS_SUPER_MAGIC: return "xfs";
    case BTRFS_SUPER_MAGIC: return "btrfs";
    default: return "another filesystem";
  }
}

// A fresh directory under `base` (mkdtemp), removed at the end.
struct TempDir {
  std::string path;
  long fs_type = 0;
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/kvlink-disk-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
    struct statfs st {};
    REQUIRE(::statfs(path.c_str(), &st) == 0);
    fs_type = static_cast<long>(st.f_type);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string tier() const { return path + "/tier"; }
};

std::unique_ptr<DiskFiles> open_files(const std::string& dir) {
  auto files = DiskFiles::open(DiskFilesOptions{dir, 16});
  REQUIRE_MESSAGE(files, files.error().message());
  return std::move(*files);
}

// The chunk bytes of key i: a pattern that differs per key and per byte.
AlignedBuffer chunk(std::uint64_t i) {
  AlignedBuffer b(disk_slot_stride(kChunk));
  for (std::size_t j = 0; j < kChunk; ++j) b.data()[j] = static_cast<std::byte>((j * 31 + i * 7) & 0xff);
  return b;
}

// One completion, waited for.
DiskCompletion one(DiskFiles& files) {
  auto done = files.wait(5s);
  REQUIRE(done.size() == 1);
  return std::move(done[0]);
}

// Writes key i through the index and the files, as the server will:
// begin_write, submit, completion, commit, journal.
DiskLocation write_chunk(DiskIndex& idx, DiskFiles& files, std::uint64_t i) {
  AlignedBuffer data = chunk(i);
  auto grant = idx.begin_write(key(i), 0, chunk_checksum(key(i), data.span().first(kChunk)));
  REQUIRE(grant);
  REQUIRE_FALSE(files.submit_write(grant->where, data.span(), i));
  const DiskCompletion c = one(files);
  CHECK(c.tag == i);
  REQUIRE_MESSAGE(!c.error, c.error.message());
  REQUIRE_FALSE(idx.commit_write(key(i)));
  REQUIRE_FALSE(files.append_journal(idx.take_journal()));
  return grant->where;
}

// Reads key i back through the index; the checksum verdict.
Error read_chunk(DiskIndex& idx, DiskFiles& files, std::uint64_t i, AlignedBuffer& out) {
  auto pin = idx.pin_read(key(i));
  if (!pin) return pin.error();
  Error err = files.submit_read(pin->where, out.span(), 1000 + i);
  if (!err) {
    DiskCompletion c = one(files);
    err = c.error ? c.error : verify_chunk(key(i), pin->where, out.span());
  }
  idx.unpin(*pin);
  return err;
}

DiskIndexConfig config() {
  DiskIndexConfig c;
  c.capacity_bytes = 64 << 20;
  return c;
}

void report_mode(const TempDir& dir, const DiskFiles& files) {
  MESSAGE("disk tier test directory " << dir.path << " on " << fs_name(dir.fs_type) << ": "
                                      << std::string(files.direct() ? "O_DIRECT" : "buffered (the filesystem refused O_DIRECT)"));
}

void corrupt_byte(const std::string& file, std::uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x5a));
}

}  // namespace

TEST_CASE("disk files: slots written through io_uring read back byte-exact") {
  TempDir dir;
  auto files = open_files(dir.tier());
  DiskIndex idx(config());
  auto cls = idx.add_class(kChunk, 8);
  REQUIRE(cls);
  auto had = files->open_class(*cls, kChunk, 8);
  REQUIRE(had);
  CHECK(*had == 0);  // a new file
  CHECK(std::filesystem::file_size(dir.tier() + "/class-0-6000.data") == 8 * 8192);
  report_mode(dir, *files);
  if (dir.fs_type != TMPFS_MAGIC) CHECK(files->direct());

  for (std::uint64_t i = 1; i <= 5; ++i) write_chunk(idx, *files, i);
  AlignedBuffer out(disk_slot_stride(kChunk));
  for (std::uint64_t i = 1; i <= 5; ++i) {
    REQUIRE_FALSE(read_chunk(idx, *files, i, out));
    const AlignedBuffer want = chunk(i);
    CHECK(std::memcmp(out.data(), want.data(), kChunk) == 0);
  }
  CHECK(files->in_flight() == 0);

  // Several in flight at once, reaped together.
  std::vector<AlignedBuffer> bufs;
  for (std::uint64_t i = 1; i <= 5; ++i) {
    bufs.emplace_back(disk_slot_stride(kChunk));
    auto pin = idx.pin_read(key(i));
    REQUIRE(pin);
    REQUIRE_FALSE(files->submit_read(pin->where, bufs.back().span(), i));
  }
  std::size_t done = 0;
  while (done < 5) {
    auto batch = files->wait(5s);
    REQUIRE_FALSE(batch.empty());
    for (auto& c : batch) CHECK_FALSE(c.error);
    done += batch.size();
  }

  // Refused at once: a misaligned buffer, a class that is not open.
  AlignedBuffer big(3 * 8192);
  auto pin = idx.pin_read(key(1));
  REQUIRE(pin);
  CHECK(files->submit_read(pin->where, big.span().subspan(512, 8192), 1) == errc::bad_request);
  DiskLocation nowhere = pin->where;
  nowhere.cls = 3;
  CHECK(files->submit_read(nowhere, big.span(), 1) == errc::bad_request);
}

TEST_CASE("disk files: the event fd says when completions wait") {
  TempDir dir;
  auto files = open_files(dir.tier());
  REQUIRE(files->open_class(0, kChunk, 2));
  pollfd p{files->event_fd(), POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 0);
  AlignedBuffer data = chunk(1);
  REQUIRE_FALSE(files->submit_write(DiskLocation{0, 1, 8192, kChunk, 0}, data.span(), 5));
  CHECK(::poll(&p, 1, 5000) == 1);  // what an Asio stream_descriptor would wait for
  std::vector<DiskCompletion> got;
  while (got.empty()) got = files->reap();
  CHECK(got[0].tag == 5);
  CHECK(::poll(&p, 1, 0) == 0);  // reap() drained it
}

TEST_CASE("disk files: a warm reopen recovers the index from the journal, torn tail and all") {
  TempDir dir;
  {
    auto files = open_files(dir.tier());
    DiskIndex idx(config());
    REQUIRE(idx.add_class(kChunk, 4));
    REQUIRE(files->open_class(0, kChunk, 4));
    for (std::uint64_t i = 1; i <= 6; ++i) write_chunk(idx, *files, i);  // keys 1 and 2 evicted
    // A write that was in flight when the process died: its put is journaled.
    AlignedBuffer data = chunk(7);
    auto grant = idx.begin_write(key(7), 0, chunk_checksum(key(7), data.span().first(kChunk)));
    REQUIRE(grant);
    REQUIRE_FALSE(files->append_journal(idx.take_journal()));
    // And half a record: the crash hit mid-append.
    const auto torn = idx.compact();
    REQUIRE_FALSE(files->append_journal(std::span(torn).first(40)));
    REQUIRE_FALSE(files->sync_journal());
  }
  auto files = open_files(dir.tier());
  auto journal = files->read_journal();
  REQUIRE(journal);
  auto rec = DiskIndex::recover(config(), *journal);
  REQUIRE(rec);
  CHECK(rec->stats.torn_bytes == 40);
  CHECK(rec->stats.incomplete_writes == 1);  // key 7 never committed: its slot (key 3's) is dropped too
  CHECK(rec->stats.entries == 3);
  DiskIndex& idx = rec->index;
  auto had = files->open_class(0, idx.slot_bytes(0), idx.slots(0));
  REQUIRE(had);
  CHECK(*had == 4);
  AlignedBuffer out(disk_slot_stride(kChunk));
  for (std::uint64_t i : {4, 5, 6}) {
    REQUIRE_FALSE(read_chunk(idx, *files, i, out));
    CHECK(std::memcmp(out.data(), chunk(i).data(), kChunk) == 0);
  }
  for (std::uint64_t i : {1, 2, 3, 7}) CHECK_FALSE(idx.contains(key(i)));

  // Compaction replaces the journal; what follows appends to the new one.
  const auto compacted = idx.compact();
  REQUIRE_FALSE(files->replace_journal(compacted));
  write_chunk(idx, *files, 8);
  auto again = files->read_journal();
  REQUIRE(again);
  CHECK(again->size() == compacted.size() + 2 * journal_record_bytes);
  auto rec2 = DiskIndex::recover(config(), *again);
  REQUIRE(rec2);
  CHECK(rec2->stats.entries == 4);
  CHECK(rec2->stats.corrupt_records + rec2->stats.torn_bytes + rec2->stats.incomplete_writes == 0);
  CHECK_FALSE(std::filesystem::exists(dir.tier() + "/journal.tmp"));
}

TEST_CASE("disk files: flipped bytes in a chunk fail its checksum and it is dropped, never served") {
  TempDir dir;
  auto files = open_files(dir.tier());
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  REQUIRE(files->open_class(0, kChunk, 4));
  write_chunk(idx, *files, 1);
  const DiskLocation where = write_chunk(idx, *files, 2);
  files.reset();  // what a crash leaves; a disk that rots does the same under a running server
  corrupt_byte(dir.tier() + "/class-0-6000.data", where.offset + 1234);
  files = open_files(dir.tier());
  REQUIRE(files->open_class(0, kChunk, 4));

  AlignedBuffer out(disk_slot_stride(kChunk));
  REQUIRE_FALSE(read_chunk(idx, *files, 1, out));
  Error bad = read_chunk(idx, *files, 2, out);
  CHECK(bad == errc::server_error);
  CHECK(bad.message().find("fails its checksum") != std::string::npos);
  CHECK_FALSE(is_tier_failure(bad));  // one chunk, not the tier
  REQUIRE_FALSE(idx.drop_corrupt(key(2)));
  CHECK(idx.stats().corrupt_dropped == 1);
  CHECK(idx.pin_read(key(2)).error() == errc::not_found);
}

TEST_CASE("disk files: a truncated data file is detected") {
  TempDir dir;
  auto files = open_files(dir.tier());
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  REQUIRE(files->open_class(0, kChunk, 4));
  for (std::uint64_t i = 1; i <= 4; ++i) write_chunk(idx, *files, i);
  const std::string data = dir.tier() + "/class-0-6000.data";

  // Under a running tier: a read past the new end is short.
  std::filesystem::resize_file(data, 2 * 8192 + 100);
  AlignedBuffer out(disk_slot_stride(kChunk));
  Error err = read_chunk(idx, *files, 4, out);
  CHECK(err == errc::not_found);
  CHECK(err.message().find("truncated") != std::string::npos);
  // Slot 2 lost most of its bytes: short too.
  CHECK(read_chunk(idx, *files, 3, out) == errc::not_found);

  // At a reopen: open_class says how many slots survived.
  files.reset();
  files = open_files(dir.tier());
  auto had = files->open_class(0, kChunk, 4);
  REQUIRE(had);
  CHECK(*had == 2);
  CHECK(idx.drop_slots_from(0, *had) == 2);
  CHECK(std::filesystem::file_size(data) == 4 * 8192);  // preallocated again
  REQUIRE_FALSE(read_chunk(idx, *files, 1, out));
  REQUIRE_FALSE(read_chunk(idx, *files, 2, out));
}

TEST_CASE("disk files: injected EIO and ENOSPC come back as errors with the errno and what to do") {
  TempDir dir;
  auto files = open_files(dir.tier());
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 4));
  REQUIRE(files->open_class(0, kChunk, 4));
  TierHealth health(TierHealthConfig{}, "disk tier " + dir.tier(), 1);

  AlignedBuffer data = chunk(1);
  auto grant = idx.begin_write(key(1), 0, chunk_checksum(key(1), data.span().first(kChunk)));
  REQUIRE(grant);
  files->inject(DiskFault::eio, 1);
  const auto op = health.op_started(TimePoint{}, "write class 0 slot 0");
  REQUIRE_FALSE(files->submit_write(grant->where, data.span(), 1));
  DiskCompletion c = one(*files);
  CHECK(c.error.code() == std::error_code(EIO, std::generic_category()));
  CHECK(c.error.message().find("write class 0 slot 0: Input/output error (EIO): the device reported an I/O error") !=
        std::string::npos);
  REQUIRE_FALSE(idx.abort_write(key(1)));
  auto a = health.op_finished(op, TimePoint{}, c.error);
  REQUIRE(a.transition);
  MESSAGE(a.transition->line);
  CHECK_FALSE(health.accepting());

  // The fault was for one operation: the next write works.
  write_chunk(idx, *files, 1);

  files->inject(DiskFault::enospc, 2);
  Error j = files->append_journal(idx.take_journal());
  CHECK(j.code() == std::error_code(ENOSPC, std::generic_category()));
  CHECK(j.message().find("ENOSPC") != std::string::npos);
  CHECK(j.message().find("free space") != std::string::npos);
  Error s = files->sync_journal();
  CHECK(s.code().value() == ENOSPC);
  CHECK_FALSE(files->sync_journal());
}

TEST_CASE("disk files: an injected stall holds the completion until released") {
  TempDir dir;
  auto files = open_files(dir.tier());
  REQUIRE(files->open_class(0, kChunk, 2));
  TierHealthConfig hc;
  hc.op_deadline = 50ms;
  TierHealth health(hc, "disk tier", 1);
  AlignedBuffer data = chunk(1);
  files->inject(DiskFault::stall, 1);
  health.op_started(TimePoint{}, "write class 0 slot 0");
  REQUIRE_FALSE(files->submit_write(DiskLocation{0, 0, 0, kChunk, 0}, data.span(), 11));
  CHECK(files->wait(100ms).empty());  // the write is done, its completion held
  CHECK(files->in_flight() == 1);
  auto a = health.tick(TimePoint{} + 50ms);
  REQUIRE(a.transition);
  CHECK(a.transition->line.find("stalled") != std::string::npos);

  CHECK(files->release_stalled() == 1);
  pollfd p{files->event_fd(), POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 1);
  auto got = files->reap();
  REQUIRE(got.size() == 1);
  CHECK(got[0].tag == 11);
  CHECK_FALSE(got[0].error);
  CHECK(files->in_flight() == 0);
}

TEST_CASE("disk files: probes, a vanished directory, and one server per directory") {
  TempDir dir;
  auto files = open_files(dir.tier());
  REQUIRE_FALSE(files->submit_probe(1));
  auto c = one(*files);
  CHECK(c.tag == 1);
  CHECK_FALSE(c.error);

  auto second = DiskFiles::open(DiskFilesOptions{dir.tier(), 4});
  REQUIRE_FALSE(second);
  CHECK(second.error().code().value() == EWOULDBLOCK);
  CHECK(second.error().message().find("another kvlink-server") != std::string::npos);

  std::filesystem::remove_all(dir.tier());
  Error gone = files->submit_probe(2);
  CHECK(gone.code() == std::error_code(ENOENT, std::generic_category()));
  CHECK(gone.message().find("starts afresh there by itself") != std::string::npos);
  CHECK(is_tier_failure(gone));
}

TEST_CASE("disk files: buffered I/O, as on a filesystem that refuses O_DIRECT, works the same") {
  // Linux 6.6+ tmpfs takes O_DIRECT, so the refusal is not always there to
  // meet: this case asks for buffered I/O, the refusal's fallback.
  struct statfs st {};
  const bool shm = ::statfs("/dev/shm", &st) == 0 && static_cast<long>(st.f_type) == TMPFS_MAGIC;
  TempDir dir(shm ? "/dev/shm" : "/tmp");
  {
    auto probe = open_files(dir.path + "/probe-direct");
    REQUIRE(probe->open_class(0, kChunk, 1));
    report_mode(dir, *probe);
  }
  auto files = DiskFiles::open(DiskFilesOptions{dir.tier(), 8, false});
  REQUIRE(files);
  DiskIndex idx(config());
  REQUIRE(idx.add_class(kChunk, 2));
  REQUIRE((*files)->open_class(0, kChunk, 2));
  CHECK_FALSE((*files)->direct());
  write_chunk(idx, **files, 1);
  AlignedBuffer out(disk_slot_stride(kChunk));
  REQUIRE_FALSE(read_chunk(idx, **files, 1, out));
  CHECK(std::memcmp(out.data(), chunk(1).data(), kChunk) == 0);
}
