#include "kvlink/transfer/kv_memfd.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>
#include <limits>

#include "kvlink/error.hpp"

namespace kvlink::transfer {

void Unmap::operator()(std::byte* base) const noexcept {
  if (base && bytes > 0) ::munmap(base, bytes);
}

namespace {
// `what` failed with `error` (its errno, read before `what` was formatted).
Error failed_call(int error, const std::string& what) {
  return Error(std::error_code(error, std::system_category()), fmt::format("{} failed: {}", what, std::strerror(error)));
}
}  // namespace

Result<KvMemfd> create_kv_memfd(const wire::KvLayout& layout, const KvMemfdOptions& options) {
  if (layout.backend != wire::KvBackend::cpu_memfd)
    return Error(errc::bad_request, "create_kv_memfd is for cpu_memfd layouts; this one is a cuda_ipc layout");
  const std::uint64_t bytes = layout.region_bytes;
  if (bytes == 0) return Error(errc::bad_request, "the layout's region_bytes is 0: nothing to create");
  if (bytes > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()) ||
      bytes > std::numeric_limits<std::size_t>::max() / 2)
    return Error(errc::bad_request, fmt::format("the layout's region_bytes {} is too large for a memfd", bytes));

  KvMemfd r;
  r.fd = UniqueFd(::memfd_create(options.name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!r.fd) {
    const int e = errno;
    return failed_call(e, fmt::format("memfd_create of '{}'", options.name));
  }
  if (::ftruncate(r.fd.get(), static_cast<off_t>(bytes)) != 0) {
    const int e = errno;
    return failed_call(e, fmt::format("ftruncate of the KV memfd to {} bytes (region_bytes)", bytes));
  }
  if (::fcntl(r.fd.get(), F_ADD_SEALS, kv_memfd_seals) != 0) {
    const int e = errno;
    return failed_call(e, "fcntl(F_ADD_SEALS, F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL) on the KV memfd");
  }
  if (options.map) {
    void* p = ::mmap(nullptr, static_cast<std::size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, r.fd.get(), 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      return failed_call(e, fmt::format("mmap of the {} bytes of the KV memfd", bytes));
    }
    r.memory = std::unique_ptr<std::byte, Unmap>(static_cast<std::byte*>(p), Unmap{static_cast<std::size_t>(bytes)});
  }
  return r;
}

}  // namespace kvlink::transfer
