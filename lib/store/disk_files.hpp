// The disk tier's directory: one preallocated data file per layout class
// (fixed-size slots, see store/disk_index.hpp), the journal, and a probe
// file. Slot I/O is asynchronous through io_uring: submit_*() returns at
// once, reap() returns what completed, and event_fd() becomes readable when
// something did, so a thin Asio layer can wait on it with a
// posix::stream_descriptor and call reap(). The journal is written
// synchronously (small appends). Single-threaded, like the index.
//
// Why liburing directly and not Asio's file support: Asio 1.22's
// stream/random_access_file need ASIO_HAS_IO_URING, which swaps the reactor
// of the whole program (every socket, timer and heartbeat) for io_uring.
// Whether that is a good idea is measured on its own (issue 17 item 7); the
// tier should not decide it. A private ring plus one eventfd keeps the
// tier's I/O out of the sockets' reactor whatever it is.
//
// Durability: data files use O_DIRECT (no page cache; a completed write is
// on the device, so it survives a process kill); where the filesystem
// refuses O_DIRECT (tmpfs) they fall back to buffered I/O, and direct()
// says so. The journal is appended with write(2) (in the page cache at
// once, so it survives a kill -9) and made durable against power loss by
// sync_journal() (fdatasync), which the driver calls once per batch of
// records rather than paying O_DSYNC's device flush on every record.
// Every chunk read is checked against its checksum anyway
// (verify_chunk), so bytes lost with power are detected, never served.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/store/disk_index.hpp"

namespace kvlink::store {

// An Error for a failed system call: the errno as the code
// (std::generic_category), and a detail with `what`, the errno's name and
// text, and what to do about it.
Error disk_error(int err, std::string_view what);

// Success when `bytes` are the chunk `where` describes (its checksum
// matches); otherwise server_error: corrupt, drop it (DiskIndex::drop_corrupt).
Error verify_chunk(const ChunkKey& key, const DiskLocation& where, std::span<const std::byte> bytes);

// Memory aligned for O_DIRECT (4096), zero-filled.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(std::size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<std::byte> span() const { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// The largest slot one I/O reads or writes (Linux caps one read or write
// near 2 GiB); larger chunks are refused.
inline constexpr std::uint64_t max_disk_io_bytes = std::uint64_t{1} << 30;

struct DiskFilesOptions {
  std::string dir;                 // made if missing (one level)
  std::uint32_t queue_depth = 64;  // io_uring entries: I/Os in flight at most
  // O_DIRECT where the filesystem takes it; false: buffered I/O always
  // (what a filesystem that refuses O_DIRECT gets anyway).
  bool direct = true;
  // Signal completions on this eventfd (a duplicate of it is kept) instead
  // of a new one: a tier that reopens its files keeps the descriptor the
  // server waits on. -1: a new eventfd.
  int event_fd = -1;
};

struct DiskCompletion {
  std::uint64_t tag = 0;  // what the submit_* call was given
  Error error;            // success, or why the I/O failed
};

// Test hook: the next `count` operations fail with EIO or ENOSPC, or stall
// (their completion is held until release_stalled()). Ring operations
// (slot I/O, probes) take all three; journal calls take EIO and ENOSPC.
enum class DiskFault : std::uint8_t { eio, enospc, stall };

class DiskFiles {
 public:
  // Opens (making) the directory, its journal and the ring; takes an
  // exclusive lock on the directory so two servers never share it.
  static Result<std::unique_ptr<DiskFiles>> open(const DiskFilesOptions& options);
  // Waits (up to 5 s) for I/O in flight: the kernel may still be using
  // its buffers.
  ~DiskFiles();
  DiskFiles(const DiskFiles&) = delete;
  DiskFiles& operator=(const DiskFiles&) = delete;

  const std::string& dir() const;
  // Whether every data file opened so far uses O_DIRECT (false: the
  // filesystem refused it and I/O goes through the page cache).
  bool direct() const;
  // Readable when completions are waiting (registered with the ring).
  int event_fd() const;

  // The name of class `cls`'s data file in the directory.
  static std::string data_file_name(DiskClass cls, std::uint64_t slot_bytes);
  // Opens (making) class `cls`'s data file and preallocates `slots` slots
  // of `slot_bytes` (fallocate). Returns how many slots the file already
  // held before: fewer than `slots` when it is new or was truncated, and
  // entries in slots past that are gone (DiskIndex::drop_slots_from).
  Result<std::uint32_t> open_class(DiskClass cls, std::uint64_t slot_bytes, std::uint32_t slots);

  // Whole-slot I/O: disk_slot_stride(where.bytes) bytes at where.offset.
  // The buffer must be 4096-aligned, at least that long, and alive until
  // the completion is reaped. An immediate Error (class not open, bad
  // buffer, slot over max_disk_io_bytes, ring full: limit_exceeded) means
  // nothing was submitted. A short read is not_found (the slot lies past a
  // truncated file's end); a short write is EIO.
  Error submit_write(const DiskLocation& where, std::span<const std::byte> buffer, std::uint64_t tag);
  Error submit_read(const DiskLocation& where, std::span<std::byte> buffer, std::uint64_t tag);
  // Whether the directory is still there under its name (the files stay
  // open when it is deleted or replaced): a stat, cheap.
  Error check_dir() const;
  // A health probe: check_dir(), the directory writable, has `free_bytes`
  // free (what the tier still has to preallocate), and one block written
  // through the ring completes.
  Error submit_probe(std::uint64_t tag, std::uint64_t free_bytes = 0);
  // Completions that arrived (never blocks); drains event_fd().
  std::vector<DiskCompletion> reap();
  // Like reap(), but waits up to `timeout` for the first completion.
  std::vector<DiskCompletion> wait(Duration timeout);
  // Submitted and not reaped yet (held stalls included).
  std::size_t in_flight() const;

  // The journal's bytes as they are on disk.
  Result<std::vector<std::byte>> read_journal();
  Error append_journal(std::span<const std::byte> records);
  Error sync_journal();  // fdatasync
  // The same through the ring: the io thread never waits on the device.
  Error submit_journal_sync(std::uint64_t tag);
  // Compaction: writes `records` to a new file, syncs it, renames it over
  // the journal and syncs the directory; a crash leaves the old or the new.
  Error replace_journal(std::span<const std::byte> records);

  void inject(DiskFault fault, std::uint32_t count);
  // Lets held (stalled) completions through: the next reap() returns them.
  std::size_t release_stalled();

  struct Impl;

 private:
  explicit DiskFiles(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvlink::store
