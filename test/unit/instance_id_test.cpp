// net::random_instance_id() across fork: every process draws its own id.
// A per-process generator seeded once would hand forked children (vLLM's
// workers) the parent's next id, and the server would take them for one.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <set>
#include <vector>

#include "kvlink/net/connection.hpp"

namespace {
constexpr std::uint64_t top_bit = std::uint64_t{1} << 63;

bool valid(std::uint64_t id) { return id != 0 && (id & top_bit) == 0; }
}  // namespace

TEST_CASE("instance id: forked children draw ids distinct from the parent's and each other's") {
  // Drawn first, so any per-process generator state exists before the fork.
  const std::uint64_t parent = kvlink::net::random_instance_id();
  constexpr int children = 8;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  std::vector<pid_t> pids;
  for (int i = 0; i < children; ++i) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The child: no doctest, no destructors, just the id.
      ::close(fds[0]);
      std::uint64_t id = 0;
      try {
        id = kvlink::net::random_instance_id();
      } catch (...) {
        ::_exit(2);
      }
      const bool ok = ::write(fds[1], &id, sizeof id) == static_cast<ssize_t>(sizeof id);
      ::_exit(ok ? 0 : 1);
    }
    pids.push_back(pid);
  }
  ::close(fds[1]);
  std::vector<std::uint64_t> ids{parent};
  std::uint64_t id = 0;
  // Each write of 8 bytes to a pipe is atomic (below PIPE_BUF).
  while (::read(fds[0], &id, sizeof id) == static_cast<ssize_t>(sizeof id)) ids.push_back(id);
  ::close(fds[0]);
  for (pid_t pid : pids) {
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  REQUIRE(ids.size() == children + 1);
  for (auto v : ids) CHECK(valid(v));
  CHECK(std::set<std::uint64_t>(ids.begin(), ids.end()).size() == ids.size());
}

TEST_CASE("instance id: 10,000 draws in one process are distinct, non-zero, 63-bit") {
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 10'000; ++i) {
    const std::uint64_t id = kvlink::net::random_instance_id();
    REQUIRE(valid(id));
    seen.insert(id);
  }
  CHECK(seen.size() == 10'000);
}
