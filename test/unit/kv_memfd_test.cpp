// create_kv_memfd, the engines' KV cache memory: its size, its seals (the
// kernel refuses to resize it), its mapping, its errors. No sockets.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <string>

#include "kvlink/error.hpp"
#include "kvlink/transfer/cpu_copy.hpp"
#include "kvlink/transfer/kv_memfd.hpp"

using namespace kvlink;
using namespace kvlink::transfer;

namespace {

// 2 layers, 16 blocks of 16 tokens, 2 heads x 64 x 2 bytes: 4 KiB per block
// and plane, 256 KiB in all.
wire::KvLayout layout() { return wire::paged_layout(2, 16, 16, 2, 64, 2); }

std::uint64_t size_of(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return static_cast<std::uint64_t>(st.st_size);
}

// ftruncate's errno, 0 if it succeeded (read here: doctest's own output may
// change errno before a CHECK could read it).
int resize_error(int fd, std::uint64_t bytes) {
  return ::ftruncate(fd, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
}

std::string link_of(int fd) {
  char buf[PATH_MAX] = {};
  const ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf - 1);
  REQUIRE(n > 0);
  return std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace

TEST_CASE("create_kv_memfd: region_bytes, sealed against resizing (the kernel refuses), writable through the mapping") {
  const auto l = layout();
  REQUIRE(l.region_bytes == 256 * 1024);
  auto kv = create_kv_memfd(l, {.name = "kv_memfd_test"});
  REQUIRE_MESSAGE(kv, kv.error().message());
  CHECK_FALSE(kv.error());
  REQUIRE(kv->fd);
  REQUIRE(kv->memory);
  const int fd = kv->fd.get();
  CHECK(size_of(fd) == l.region_bytes);
  CHECK(link_of(fd).find("memfd:kv_memfd_test") != std::string::npos);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);

  // The seals: shrink, grow and seal; writes stay allowed.
  const int seals = ::fcntl(fd, F_GET_SEALS);
  CHECK(seals == (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL));
  CHECK((seals & kv_memfd_required_seals) == kv_memfd_required_seals);
  CHECK_FALSE(check_memfd_seals(fd));  // what the server checks

  // The kernel refuses every size change, and further seals.
  CHECK(resize_error(fd, l.region_bytes / 2) == EPERM);
  CHECK(resize_error(fd, 0) == EPERM);
  CHECK(resize_error(fd, l.region_bytes * 2) == EPERM);
  const int add_seal = ::fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE);
  const int add_seal_errno = errno;
  CHECK(add_seal == -1);
  CHECK(add_seal_errno == EPERM);
  CHECK(size_of(fd) == l.region_bytes);

  // The mapping covers the whole region, shared with the fd both ways.
  std::byte* base = kv->memory.get();
  base[0] = std::byte{1};
  base[l.region_bytes - 1] = std::byte{2};
  std::byte b{};
  REQUIRE(::pread(fd, &b, 1, static_cast<off_t>(l.region_bytes - 1)) == 1);
  CHECK(b == std::byte{2});
  const std::byte seven{7};
  REQUIRE(::pwrite(fd, &seven, 1, 4096) == 1);
  CHECK(base[4096] == std::byte{7});
  CHECK(kv->memory.get_deleter().bytes == l.region_bytes);

  // Moved, it keeps the fd and the mapping.
  KvMemfd moved = std::move(*kv);
  CHECK(moved.fd.get() == fd);
  CHECK(moved.memory.get() == base);
  CHECK(base[0] == std::byte{1});
}

TEST_CASE("create_kv_memfd: map = false creates the sealed fd only") {
  auto kv = create_kv_memfd(layout(), {.map = false});
  REQUIRE_MESSAGE(kv, kv.error().message());
  CHECK(kv->memory == nullptr);
  REQUIRE(kv->fd);
  CHECK(size_of(kv->fd.get()) == layout().region_bytes);
  CHECK(::fcntl(kv->fd.get(), F_GET_SEALS) == kv_memfd_seals);
  CHECK(link_of(kv->fd.get()).find("memfd:kvlink-kv") != std::string::npos);  // the default name
}

TEST_CASE("create_kv_memfd: an unusable layout or a failed call gives an error code and a detail, no memfd") {
  auto l = layout();
  l.region_bytes = 0;
  auto kv = create_kv_memfd(l);
  CHECK(!kv);
  CHECK(kv.error() == errc::bad_request);
  CHECK(kv.error().message().find("region_bytes is 0") != std::string::npos);

  l = layout();
  l.backend = wire::KvBackend::cuda_ipc;
  kv = create_kv_memfd(l);
  CHECK(!kv);
  CHECK(kv.error() == errc::bad_request);
  CHECK(kv.error().message().find("cpu_memfd") != std::string::npos);

  // 1 EiB: more than any address space (ftruncate or mmap fails; which one
  // depends on the kernel's limits).
  l = layout();
  l.region_bytes = std::uint64_t{1} << 60;
  kv = create_kv_memfd(l);
  CHECK(!kv);
  CHECK(kv.error().code().category() == std::system_category());
  CHECK_MESSAGE(kv.error().message().find(" failed: ") != std::string::npos, kv.error().message());
}
