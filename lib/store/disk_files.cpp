#include "store/disk_files.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "kvlink/unique_fd.hpp"

namespace kvlink::store {

namespace {

std::string_view advice(int err) {
  switch (err) {
    case EIO: return "the device reported an I/O error: check the disk (dmesg, smartctl); the tier stays out until a probe succeeds";
    case ENOSPC: return "the filesystem is full: free space on it or lower --l2-disk-size";
    case EDQUOT: return "the disk quota is used up: raise the quota or lower --l2-disk-size";
    case EROFS: return "the filesystem is read-only (remounted after errors?): check dmesg, then remount it read-write";
    case ENOENT: return "the tier's directory or a file in it disappeared: the tier starts afresh there by itself, empty";
    case EACCES:
    case EPERM: return "permission denied: give the server's user read and write access to the directory";
    case EWOULDBLOCK: return "another kvlink-server holds this directory: give each server its own --l2-disk directory";
    default: return "check the directory and the device under it";
  }
}

}  // namespace

Error disk_error(int err, std::string_view what) {
  const char* name = strerrorname_np(err);
  return Error(std::error_code(err, std::generic_category()),
               fmt::format("{}: {} ({}): {}", what, std::strerror(err), name ? name : "?", advice(err)));
}

Error verify_chunk(const ChunkKey& key, const DiskLocation& where, std::span<const std::byte> bytes) {
  if (bytes.size() < where.bytes || chunk_checksum(key, bytes.first(where.bytes)) != where.checksum)
    return Error(errc::server_error,
                 fmt::format("chunk {} in disk tier class {} slot {} fails its checksum (corrupt or torn): dropped, "
                             "never served",
                             to_string(key.hash), where.cls, where.slot));
  return {};
}

AlignedBuffer::AlignedBuffer(std::size_t bytes) : size_(bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, disk_block_bytes, bytes == 0 ? disk_block_bytes : bytes) != 0) throw std::bad_alloc();
  data_ = static_cast<std::byte*>(p);
  std::memset(data_, 0, bytes);
}
AlignedBuffer::~AlignedBuffer() { std::free(data_); }
AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  std::swap(data_, other.data_);
  std::swap(size_, other.size_);
  return *this;
}

struct DiskFiles::Impl {
  enum class Kind : std::uint8_t { read, write, probe, sync };
  struct Op {
    std::uint64_t tag = 0;
    Kind kind = Kind::read;
    std::uint64_t len = 0;
    int fault = 0;  // injected errno: a NOP went to the ring instead of the I/O
    bool stall = false;
    std::string what;
  };
  struct ClassFile {
    UniqueFd fd;
    std::uint64_t slot_bytes = 0;
    std::uint32_t slots = 0;
    bool direct = false;
  };

  std::string dir;
  bool want_direct = true;
  UniqueFd dir_fd;
  UniqueFd journal;
  std::uint64_t journal_size = 0;  // bytes appended whole: a failed append is cut back to it
  UniqueFd probe;
  UniqueFd event;
  io_uring ring{};
  bool ring_ok = false;
  bool all_direct = true;
  std::vector<ClassFile> classes;
  AlignedBuffer probe_block{disk_block_bytes};
  std::unordered_map<std::uint64_t, Op> ops;
  std::uint64_t next_id = 1;
  std::vector<DiskCompletion> held;   // stalled completions
  std::vector<DiskCompletion> ready;  // released stalls, for the next reap
  DiskFault fault = DiskFault::eio;
  std::uint32_t faults_left = 0;

  ~Impl() {
    if (!ring_ok) return;
    // The kernel may still be writing into callers' buffers: wait (a while)
    // for what is in flight before the ring goes.
    std::vector<DiskCompletion> ignored;
    for (int i = 0; i < 50 && !ops.empty(); ++i) {
      __kernel_timespec ts{0, 100'000'000};
      io_uring_cqe* cqe = nullptr;
      (void)io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
      drain_cqes(ignored);
    }
    io_uring_queue_exit(&ring);
  }

  std::string path(std::string_view name) const { return dir + "/" + std::string(name); }

  // The injected errno for the next operation, if any (journal calls do not
  // take stalls).
  int take_fault(bool ring_op, bool& stall) {
    stall = false;
    if (faults_left == 0) return 0;
    if (fault == DiskFault::stall) {
      if (!ring_op) return 0;
      --faults_left;
      stall = true;
      return 0;
    }
    --faults_left;
    return fault == DiskFault::eio ? EIO : ENOSPC;
  }

  // Opens a data-like file with O_DIRECT, or buffered where the filesystem
  // refuses O_DIRECT (EINVAL: tmpfs).
  Result<std::pair<UniqueFd, bool>> open_direct(const std::string& p) {
    int fd = -1;
    if (want_direct) {
      fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0600);
      if (fd >= 0) return std::pair{UniqueFd(fd), true};
      if (errno != EINVAL) return disk_error(errno, "open " + p);
    }
    fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return disk_error(errno, "open " + p);
    return std::pair{UniqueFd(fd), false};
  }

  Error submit(Kind kind, int fd, void* buf, std::uint64_t len, std::uint64_t offset, std::uint64_t tag,
               std::string what) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
      io_uring_submit(&ring);
      sqe = io_uring_get_sqe(&ring);
    }
    if (!sqe)
      return Error(errc::limit_exceeded,
                   fmt::format("{}: the disk tier's ring is full ({} I/Os in flight)", what, ops.size()));
    if (len > max_disk_io_bytes)
      return Error(errc::bad_request, fmt::format("{}: {} bytes is more than one I/O carries ({})", what, len,
                                                  max_disk_io_bytes));
    Op op{tag, kind, len, 0, false, std::move(what)};
    op.fault = take_fault(true, op.stall);
    if (op.fault) io_uring_prep_nop(sqe);
    else if (kind == Kind::sync) io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    else if (kind == Kind::read) io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(len), offset);
    else io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(len), offset);
    const std::uint64_t id = next_id++;
    io_uring_sqe_set_data64(sqe, id);
    ops.emplace(id, std::move(op));
    // A failed submit (EAGAIN, EBUSY, EINTR) leaves the SQE in the ring:
    // it is submitted, and will complete, once flush() gets it through.
    flush();
    return {};
  }

  void flush() {
    if (io_uring_sq_ready(&ring) > 0) (void)io_uring_submit(&ring);
  }

  DiskCompletion complete(const Op& op, int res) {
    DiskCompletion c{op.tag, {}};
    if (op.fault) res = -op.fault;
    if (res < 0) {
      c.error = disk_error(-res, op.what);
    } else if (static_cast<std::uint64_t>(res) < op.len && op.kind != Kind::read) {
      c.error = Error(std::error_code(EIO, std::generic_category()),
                      fmt::format("{}: short write, {} of {} bytes: check the filesystem's free space and the device",
                                  op.what, res, op.len));
    } else if (static_cast<std::uint64_t>(res) < op.len) {
      c.error = Error(errc::not_found,
                      fmt::format("{}: {} of {} bytes: the slot lies past the data file's end (the file was truncated); "
                                  "the chunk is gone",
                                  op.what, res, op.len));
    }
    return c;
  }

  void drain_cqes(std::vector<DiskCompletion>& out) {
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring, &cqe) == 0 && cqe) {
      const std::uint64_t id = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      auto it = ops.find(id);
      if (it == ops.end()) continue;
      DiskCompletion c = complete(it->second, res);
      const bool stall = it->second.stall;
      ops.erase(it);
      (stall ? held : out).push_back(std::move(c));
    }
  }
};

DiskFiles::DiskFiles(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DiskFiles::~DiskFiles() = default;

Result<std::unique_ptr<DiskFiles>> DiskFiles::open(const DiskFilesOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->dir = options.dir;
  impl->want_direct = options.direct;
  if (::mkdir(options.dir.c_str(), 0700) != 0 && errno != EEXIST) return disk_error(errno, "mkdir " + options.dir);
  int fd = ::open(options.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return disk_error(errno, "open " + options.dir);
  impl->dir_fd = UniqueFd(fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) return disk_error(errno, "lock " + options.dir);

  const std::string jpath = impl->path("journal");
  fd = ::open(jpath.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return disk_error(errno, "open " + jpath);
  impl->journal = UniqueFd(fd);
  struct stat jst {};
  if (::fstat(fd, &jst) != 0) return disk_error(errno, "stat " + jpath);
  impl->journal_size = static_cast<std::uint64_t>(jst.st_size);

  auto probe = impl->open_direct(impl->path("probe"));
  if (!probe) return probe.error();
  impl->probe = std::move(probe->first);

  fd = options.event_fd >= 0 ? ::fcntl(options.event_fd, F_DUPFD_CLOEXEC, 0) : ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return disk_error(errno, "eventfd");
  impl->event = UniqueFd(fd);
  if (int rc = io_uring_queue_init(std::max(options.queue_depth, 1u), &impl->ring, 0); rc < 0)
    return disk_error(-rc, "io_uring_queue_init (is io_uring disabled: /proc/sys/kernel/io_uring_disabled, seccomp?)");
  impl->ring_ok = true;
  if (int rc = io_uring_register_eventfd(&impl->ring, impl->event.get()); rc < 0)
    return disk_error(-rc, "io_uring_register_eventfd");
  return std::unique_ptr<DiskFiles>(new DiskFiles(std::move(impl)));
}

const std::string& DiskFiles::dir() const { return impl_->dir; }
bool DiskFiles::direct() const { return impl_->all_direct; }
int DiskFiles::event_fd() const { return impl_->event.get(); }
std::size_t DiskFiles::in_flight() const { return impl_->ops.size() + impl_->held.size(); }

std::string DiskFiles::data_file_name(DiskClass cls, std::uint64_t slot_bytes) {
  return fmt::format("class-{}-{}.data", cls, slot_bytes);
}

Result<std::uint32_t> DiskFiles::open_class(DiskClass cls, std::uint64_t slot_bytes, std::uint32_t slots) {
  Impl& m = *impl_;
  const std::string p = m.path(data_file_name(cls, slot_bytes));
  auto opened = m.open_direct(p);
  if (!opened) return opened.error();
  auto [fd, direct] = std::move(*opened);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return disk_error(errno, "stat " + p);
  const std::uint64_t stride = disk_slot_stride(slot_bytes);
  const std::uint64_t want = stride * slots;
  const auto had = static_cast<std::uint32_t>(std::min<std::uint64_t>(slots, static_cast<std::uint64_t>(st.st_size) / stride));
  if (static_cast<std::uint64_t>(st.st_size) < want) {
    int rc = ::fallocate(fd.get(), 0, 0, static_cast<off_t>(want));
    // Filesystems without fallocate get a sparse file of the right size.
    if (rc != 0 && errno == EOPNOTSUPP) rc = ::ftruncate(fd.get(), static_cast<off_t>(want));
    if (rc != 0) return disk_error(errno, fmt::format("preallocate {} bytes for {}", want, p));
  }
  if (m.classes.size() <= cls) m.classes.resize(cls + 1);
  m.classes[cls] = Impl::ClassFile{std::move(fd), slot_bytes, slots, direct};
  m.all_direct = m.all_direct && direct;
  return had;
}

Error DiskFiles::submit_write(const DiskLocation& where, std::span<const std::byte> buffer, std::uint64_t tag) {
  Impl& m = *impl_;
  const std::uint64_t len = disk_slot_stride(where.bytes);
  if (where.cls >= m.classes.size() || !m.classes[where.cls].fd || m.classes[where.cls].slot_bytes != where.bytes)
    return Error(errc::bad_request, fmt::format("disk tier class {} is not open with {}-byte slots", where.cls, where.bytes));
  if (buffer.size() < len || reinterpret_cast<std::uintptr_t>(buffer.data()) % disk_block_bytes != 0)
    return Error(errc::bad_request, fmt::format("a slot write needs a 4096-aligned buffer of {} bytes", len));
  return m.submit(Impl::Kind::write, m.classes[where.cls].fd.get(), const_cast<std::byte*>(buffer.data()), len,
                  where.offset, tag, fmt::format("write class {} slot {}", where.cls, where.slot));
}

Error DiskFiles::submit_read(const DiskLocation& where, std::span<std::byte> buffer, std::uint64_t tag) {
  Impl& m = *impl_;
  const std::uint64_t len = disk_slot_stride(where.bytes);
  if (where.cls >= m.classes.size() || !m.classes[where.cls].fd || m.classes[where.cls].slot_bytes != where.bytes)
    return Error(errc::bad_request, fmt::format("disk tier class {} is not open with {}-byte slots", where.cls, where.bytes));
  if (buffer.size() < len || reinterpret_cast<std::uintptr_t>(buffer.data()) % disk_block_bytes != 0)
    return Error(errc::bad_request, fmt::format("a slot read needs a 4096-aligned buffer of {} bytes", len));
  return m.submit(Impl::Kind::read, m.classes[where.cls].fd.get(), buffer.data(), len, where.offset, tag,
                  fmt::format("read class {} slot {}", where.cls, where.slot));
}

Error DiskFiles::check_dir() const {
  const Impl& m = *impl_;
  // The open descriptors outlive a deleted directory: look at it by name,
  // and make sure the name still leads to the directory the files are in.
  struct stat named {}, opened {};
  if (::stat(m.dir.c_str(), &named) != 0) return disk_error(errno, "stat " + m.dir);
  if (::fstat(m.dir_fd.get(), &opened) != 0) return disk_error(errno, "fstat " + m.dir);
  if (named.st_ino != opened.st_ino || named.st_dev != opened.st_dev)
    return disk_error(ENOENT, m.dir + " was replaced by another directory: the tier starts afresh there once its "
                                      "old I/O is over");
  return {};
}

Error DiskFiles::submit_probe(std::uint64_t tag, std::uint64_t free_bytes) {
  Impl& m = *impl_;
  if (auto err = check_dir()) return err;
  struct statvfs vfs {};
  if (::statvfs(m.dir.c_str(), &vfs) != 0) return disk_error(errno, "probe: statvfs " + m.dir);
  if (vfs.f_flag & ST_RDONLY) return disk_error(EROFS, "probe: " + m.dir);
  if (std::uint64_t{vfs.f_bavail} * vfs.f_frsize < free_bytes)
    return disk_error(ENOSPC, fmt::format("probe: {} has {} bytes free, the tier needs {}", m.dir,
                                          std::uint64_t{vfs.f_bavail} * vfs.f_frsize, free_bytes));
  return m.submit(Impl::Kind::probe, m.probe.get(), m.probe_block.data(), disk_block_bytes, 0, tag,
                  "probe write of " + m.path("probe"));
}

Error DiskFiles::submit_journal_sync(std::uint64_t tag) {
  Impl& m = *impl_;
  return m.submit(Impl::Kind::sync, m.journal.get(), nullptr, 0, 0, tag, "fdatasync " + m.path("journal"));
}

std::vector<DiskCompletion> DiskFiles::reap() {
  Impl& m = *impl_;
  std::uint64_t count = 0;
  while (::read(m.event.get(), &count, sizeof count) > 0) {
  }
  std::vector<DiskCompletion> out = std::exchange(m.ready, {});
  m.flush();
  m.drain_cqes(out);
  return out;
}

std::vector<DiskCompletion> DiskFiles::wait(Duration timeout) {
  Impl& m = *impl_;
  m.flush();
  if (m.ready.empty() && !m.ops.empty()) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count();
    __kernel_timespec ts{ns / 1000000000, ns % 1000000000};
    io_uring_cqe* cqe = nullptr;
    (void)io_uring_wait_cqe_timeout(&m.ring, &cqe, &ts);
  }
  return reap();
}

std::size_t DiskFiles::release_stalled() {
  Impl& m = *impl_;
  const std::size_t n = m.held.size();
  for (auto& c : m.held) m.ready.push_back(std::move(c));
  m.held.clear();
  if (n > 0) {
    const std::uint64_t one = 1;  // wake whoever waits on event_fd()
    (void)!::write(m.event.get(), &one, sizeof one);
  }
  return n;
}

void DiskFiles::inject(DiskFault fault, std::uint32_t count) {
  impl_->fault = fault;
  impl_->faults_left = count;
}

Result<std::vector<std::byte>> DiskFiles::read_journal() {
  Impl& m = *impl_;
  struct stat st {};
  if (::fstat(m.journal.get(), &st) != 0) return disk_error(errno, "stat " + m.path("journal"));
  std::vector<std::byte> bytes(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pread(m.journal.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return disk_error(errno, "read " + m.path("journal"));
    if (n == 0) break;  // shrank meanwhile: what was read is the journal
    done += static_cast<std::size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

namespace {
// write(2) until done; errno on failure.
int write_all(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    bytes = bytes.subspan(static_cast<std::size_t>(n));
  }
  return 0;
}
}  // namespace

Error DiskFiles::append_journal(std::span<const std::byte> records) {
  Impl& m = *impl_;
  bool stall = false;
  if (int f = m.take_fault(false, stall)) return disk_error(f, "append to " + m.path("journal"));
  if (int err = write_all(m.journal.get(), records)) {
    // A partial record would shift every later one off the 64-byte grid
    // (each would then fail its checksum at recovery): cut it off.
    (void)!::ftruncate(m.journal.get(), static_cast<off_t>(m.journal_size));
    return disk_error(err, "append to " + m.path("journal"));
  }
  m.journal_size += records.size();
  return {};
}

Error DiskFiles::sync_journal() {
  Impl& m = *impl_;
  bool stall = false;
  if (int f = m.take_fault(false, stall)) return disk_error(f, "fdatasync " + m.path("journal"));
  if (::fdatasync(m.journal.get()) != 0) return disk_error(errno, "fdatasync " + m.path("journal"));
  return {};
}

Error DiskFiles::replace_journal(std::span<const std::byte> records) {
  Impl& m = *impl_;
  bool stall = false;
  const std::string tmp = m.path("journal.tmp");
  const std::string final_path = m.path("journal");
  if (int f = m.take_fault(false, stall)) return disk_error(f, "write " + tmp);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return disk_error(errno, "open " + tmp);
  UniqueFd out(fd);
  if (int err = write_all(fd, records)) return disk_error(err, "write " + tmp);
  if (::fdatasync(fd) != 0) return disk_error(errno, "fdatasync " + tmp);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) return disk_error(errno, "rename " + tmp);
  if (::fsync(m.dir_fd.get()) != 0) return disk_error(errno, "fsync " + m.dir);
  // Appends go to the new file from now on.
  fd = ::open(final_path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
  if (fd < 0) return disk_error(errno, "open " + final_path);
  m.journal = UniqueFd(fd);
  m.journal_size = records.size();
  return {};
}

}  // namespace kvlink::store
