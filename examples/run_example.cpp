// Test harness for the examples: starts the real kvlink-server (path in
// $KVLINK_SERVER) on a unix socket in a fresh directory, runs the example
// with that endpoint, and exits with the example's status. Usage:
// run-example EXAMPLE_BINARY
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <string>

#include "server_process.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s EXAMPLE_BINARY (with KVLINK_SERVER set)\n", argv[0]);
    return 2;
  }
  try {
    kvlink::test::TempDir dir;
    kvlink::test::ServerProcess server(
        {"--listen", dir.socket(), "--l1-size", "64MiB", "--no-huge-pages", "--log-level", "warn"});
    server.start();
    const pid_t pid = ::fork();
    if (pid == 0) {
      const std::string endpoint = server.endpoint();
      ::execl(argv[1], argv[1], endpoint.c_str(), static_cast<char*>(nullptr));
      std::perror("exec");
      ::_exit(127);
    }
    int status = 0;
    if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return 2;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    std::fprintf(stderr, "%s: killed by signal %d\n", argv[1], WTERMSIG(status));
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "run-example: %s\n", e.what());
    return 2;
  }
}
