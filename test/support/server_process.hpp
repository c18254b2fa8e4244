// Starts the real kvlink-server binary for integration tests, waits for its
// "ready" line (with a deadline), and lets tests kill, stop and restart it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace kvlink::test {

// A fresh temporary directory, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string socket(const std::string& name = "kvlink.sock") const { return "unix:" + path_ + "/" + name; }

 private:
  std::string path_;
};

class ServerProcess {
 public:
  // `args` are passed to kvlink-server (e.g. {"--listen", "unix:/tmp/x"}).
  explicit ServerProcess(std::vector<std::string> args);
  ~ServerProcess();  // SIGKILLs and reaps the process if it still runs

  // Both apply from the next start(). An environment variable for the
  // process (e.g. NOTIFY_SOCKET), on top of this process's environment.
  void set_env(std::string name, std::string value);
  // The process's stderr goes to this file (appended) instead of the pipe
  // read for the ready line, which then gets stdout only.
  void set_stderr_file(std::string path) { stderr_file_ = std::move(path); }

  // Starts the process and waits up to `timeout` for its ready line.
  // Throws std::runtime_error with the server's output on failure.
  void start(std::chrono::milliseconds timeout = std::chrono::seconds(10));
  void kill();       // SIGKILL + reap
  void stop();       // SIGSTOP
  void resume();     // SIGCONT
  // SIGTERM and wait up to `timeout`; returns the exit status (or -1).
  int terminate(std::chrono::milliseconds timeout = std::chrono::seconds(10));
  void restart() { kill(); start(); }

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  // Endpoints from the ready line (tcp port 0 resolved).
  const std::vector<std::string>& endpoints() const { return endpoints_; }
  const std::string& endpoint(std::size_t i = 0) const { return endpoints_.at(i); }
  std::string ready_line() const { return ready_line_; }
  // http://HOST:PORT of the admin listener (--http); "" without.
  const std::string& admin_url() const { return admin_url_; }

  // Path of a binary from the environment variable (set by meson test).
  static std::string binary(const char* env_var);

 private:
  void reap();

  std::vector<std::string> args_;
  std::vector<std::string> env_;  // NAME=value
  std::string stderr_file_;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::vector<std::string> endpoints_;
  std::string ready_line_;
  std::string admin_url_;
};

}  // namespace kvlink::test
