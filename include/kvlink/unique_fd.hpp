// An owned file descriptor: closed by the destructor. Used for the memfds a
// worker passes to the server with SCM_RIGHTS, so that every error path
// closes them (no fd leaks in a long-running server).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <utility>

namespace kvlink {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// An owned close-on-exec duplicate of `fd` (empty for fd < 0 or on failure).
inline UniqueFd duplicate_fd(int fd) { return UniqueFd(fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1); }

}  // namespace kvlink
