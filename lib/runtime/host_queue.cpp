#include "kvlink/runtime/host_queue.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <system_error>

namespace kvlink::runtime {

HostQueue::HostQueue(asio::execution_context& context)
    : context_(context), fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (!fd_) throw std::system_error(errno, std::generic_category(), "kvlink: eventfd for the host queue");
}

HostQueue::~HostQueue() = default;

void HostQueue::push(std::unique_ptr<TaskBase> task) {
  bool was_empty = false;
  {
    std::lock_guard lock(mutex_);
    was_empty = queue_.empty();
    queue_.push_back(std::move(task));
  }
  // One write per empty -> non-empty transition: the fd is readable until
  // poll() resets it, so later pushes need no syscall.
  if (was_empty) {
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto n = ::write(fd_.get(), &one, sizeof one);
  }
}

std::size_t HostQueue::poll() {
  // Reset the fd before taking the queue: a push after the swap finds the
  // queue empty and signals again, so no handler is ever left unsignalled.
  std::uint64_t count = 0;
  [[maybe_unused]] const auto n = ::read(fd_.get(), &count, sizeof count);
  std::vector<std::unique_ptr<TaskBase>> batch;
  {
    std::lock_guard lock(mutex_);
    batch.swap(queue_);
  }
  const auto previous = polling_thread_.exchange(std::this_thread::get_id());
  std::size_t ran = 0;
  try {
    for (; ran < batch.size(); ++ran) batch[ran]->run();
  } catch (...) {
    // Like io_context::poll(): the exception leaves poll(); the handlers
    // not run yet stay queued, in order, for the next poll().
    polling_thread_.store(previous);
    bool was_empty = false;
    {
      std::lock_guard lock(mutex_);
      was_empty = queue_.empty();
      queue_.insert(queue_.begin(), std::make_move_iterator(batch.begin() + static_cast<std::ptrdiff_t>(ran) + 1),
                    std::make_move_iterator(batch.end()));
    }
    if (was_empty && ran + 1 < batch.size()) {
      const std::uint64_t one = 1;
      [[maybe_unused]] const auto w = ::write(fd_.get(), &one, sizeof one);
    }
    throw;
  }
  polling_thread_.store(previous);
  return ran;
}

}  // namespace kvlink::runtime
