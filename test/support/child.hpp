// A child process (the engine simulator, or a server a test drains or
// kills) whose stdout and stderr lines are collected as they come, each
// with the time it arrived, so a test can wait for a line and time what
// happened. Killed (SIGKILL) by the destructor if still running. Used by
// tests and benches alike: failures throw.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kvlink::test {

using namespace std::chrono_literals;

class Child {
 public:
  using Clock = std::chrono::steady_clock;
  struct Line {
    Clock::time_point at;
    std::string text;
  };

  explicit Child(std::vector<std::string> argv) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed for a child process");
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ < 0) {
      ::close(fds[0]);
      ::close(fds[1]);
      throw std::runtime_error("fork failed for a child process");
    }
    if (pid_ == 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] { read_lines(fd); });
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGCONT);
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (reader_.joinable()) reader_.join();
  }

  pid_t pid() const { return pid_; }
  void signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  // The first line from index `from` on that `match` accepts, waiting up to
  // `timeout` for it; nothing when none came (or the process ended first).
  template <class Pred>
    requires std::predicate<Pred&, const std::string&>
  std::optional<Line> wait_for(Pred match, std::chrono::milliseconds timeout, std::size_t from = 0) {
    std::unique_lock lock(m_);
    std::optional<Line> found;
    cv_.wait_for(lock, timeout, [&] {
      for (std::size_t i = from; i < lines_.size(); ++i)
        if (match(lines_[i].text)) {
          found = lines_[i];
          return true;
        }
      from = lines_.size();
      return eof_;
    });
    return found;
  }
  std::optional<Line> wait_for(const std::string& needle, std::chrono::milliseconds timeout, std::size_t from = 0) {
    return wait_for([&](const std::string& l) { return l.find(needle) != std::string::npos; }, timeout, from);
  }
  std::size_t line_count() {
    std::lock_guard lock(m_);
    return lines_.size();
  }
  std::string output() {
    std::lock_guard lock(m_);
    std::string all;
    for (const auto& l : lines_) all += l.text + "\n";
    return all;
  }

  // Waits up to `timeout` for the process to exit; its exit status, or -1
  // (killed by a signal, or still running at the timeout: then killed).
  int wait_exit(std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return -1;
    int status = 0;
    const auto end = Clock::now() + timeout;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > end) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        status = -1;
        break;
      }
      std::this_thread::sleep_for(2ms);  // polling a child's exit; waitpid has no timeout
    }
    pid_ = -1;
    if (reader_.joinable()) reader_.join();
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  void read_lines(int fd) {
    std::string partial;
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      partial.append(buf, static_cast<std::size_t>(n));
      const auto now = Clock::now();
      std::lock_guard lock(m_);
      for (auto nl = partial.find('\n'); nl != std::string::npos; nl = partial.find('\n')) {
        lines_.push_back({now, partial.substr(0, nl)});
        partial.erase(0, nl + 1);
      }
      cv_.notify_all();
    }
    ::close(fd);
    std::lock_guard lock(m_);
    if (!partial.empty()) lines_.push_back({Clock::now(), partial});
    eof_ = true;
    cv_.notify_all();
  }

  pid_t pid_ = -1;
  std::thread reader_;
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<Line> lines_;
  bool eof_ = false;
};

}  // namespace kvlink::test
