#include "server_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>

namespace kvlink::test {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "kvlink-test-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ServerProcess::binary(const char* env_var) {
  const char* p = std::getenv(env_var);
  if (p == nullptr || *p == '\0')
    throw std::runtime_error(std::string(env_var) + " is not set; run the tests through meson test (scripts/test)");
  return p;
}

ServerProcess::ServerProcess(std::vector<std::string> args) : args_(std::move(args)) {}

void ServerProcess::set_env(std::string name, std::string value) {
  const std::string prefix = name + "=";
  std::erase_if(env_, [&](const std::string& e) { return e.starts_with(prefix); });
  env_.push_back(prefix + value);
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGCONT);
    kill();
  }
}

void ServerProcess::start(std::chrono::milliseconds timeout) {
  if (pid_ > 0) throw std::runtime_error("server already running");
  const std::string exe = binary("KVLINK_SERVER");
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(exe.c_str()));
  for (auto& a : args_) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The environment, built before fork (the child only calls async-signal-
  // safe functions): this process's, with env_ replacing or adding entries.
  std::vector<std::string> env_strings = env_;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('=') + 1);
    if (std::none_of(env_.begin(), env_.end(), [&](const std::string& o) { return o.starts_with(name); }))
      env_strings.push_back(entry);
  }
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  int err_fd = fds[1];
  if (!stderr_file_.empty()) {
    err_fd = ::open(stderr_file_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (err_fd < 0) {
      ::close(fds[0]);
      ::close(fds[1]);
      throw std::runtime_error("cannot open " + stderr_file_);
    }
  }
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    // A test or benchmark that crashes leaves no server behind.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);  // errors end up in the test failure message (or stderr_file_)
    ::execve(exe.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  if (err_fd != fds[1]) ::close(err_fd);
  stdout_fd_ = fds[0];

  // Read stdout until the ready line, within the deadline.
  std::string output;      // not yet split into lines
  std::string everything;  // for the error message
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto pos = output.find('\n');
    while (pos != std::string::npos) {
      std::string line = output.substr(0, pos);
      output.erase(0, pos + 1);
      if (line.starts_with("kvlink-server ready")) {
        ready_line_ = line;
        endpoints_.clear();
        auto at = line.find("listening on ");
        if (at != std::string::npos) {
          std::istringstream in(line.substr(at + 13));
          for (std::string ep; in >> ep;) {
            if (ep == "admin") {  // then the HTTP admin listener's URL (--http)
              in >> admin_url_;
              break;
            }
            endpoints_.push_back(ep);
          }
        }
        return;  // leave the pipe open: the server may print more
      }
      pos = output.find('\n');
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd pfd{stdout_fd_, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) break;
    char buf[4096];
    ssize_t n = ::read(stdout_fd_, buf, sizeof buf);
    if (n <= 0) break;
    output.append(buf, static_cast<std::size_t>(n));
    everything.append(buf, static_cast<std::size_t>(n));
  }
  kill();
  throw std::runtime_error("kvlink-server did not print its ready line; output so far: " + everything);
}

void ServerProcess::reap() {
  if (pid_ <= 0) return;
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  if (stdout_fd_ >= 0) ::close(stdout_fd_);
  stdout_fd_ = -1;
}

void ServerProcess::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  reap();
}

void ServerProcess::stop() {
  if (pid_ > 0) ::kill(pid_, SIGSTOP);
}

void ServerProcess::resume() {
  if (pid_ > 0) ::kill(pid_, SIGCONT);
}

int ServerProcess::terminate(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (stdout_fd_ >= 0) ::close(stdout_fd_);
      stdout_fd_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    ::usleep(2000);  // polling a child's exit; waitpid has no timeout
  }
  kill();
  return -1;
}

}  // namespace kvlink::test
