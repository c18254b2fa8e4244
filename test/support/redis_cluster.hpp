// A Redis Cluster on loopback for tests: N masters with R replicas each,
// redis-server processes on free ports in a temporary directory, joined
// with `redis-cli --cluster create`; waits until the cluster says ok.
// Nodes can be stopped (SIGSTOP), resumed and killed like any process.
// Throws std::runtime_error when the cluster cannot be made (tests report
// it as a failure; bench-cluster uses it too).
#pragma once

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "child.hpp"
#include "server_process.hpp"

namespace kvlink::test {

// Whether redis-server and redis-cli are installed (tests skip otherwise).
inline bool have_redis() {
  return ::access("/usr/bin/redis-server", X_OK) == 0 && ::access("/usr/bin/redis-cli", X_OK) == 0;
}

// The stdout of `cmd` (a shell command) and its exit status.
inline int shell(const std::string& cmd, std::string& out) {
  out.clear();
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  return ::pclose(p);
}

class RedisCluster {
 public:
  struct Node {
    std::uint16_t port = 0;
    std::unique_ptr<Child> proc;
    std::string address() const { return "127.0.0.1:" + std::to_string(port); }
  };

  // `node_timeout_ms`: cluster-node-timeout, how long before a silent
  // master is failed over.
  explicit RedisCluster(int masters = 3, int replicas_each = 1, int node_timeout_ms = 1000)
      : node_timeout_ms_(node_timeout_ms) {
    std::mt19937 rng(std::random_device{}());
    const int n = masters * (1 + replicas_each);
    for (int i = 0; i < n; ++i) nodes_.push_back(start_node(rng));
    std::string cmd = "/usr/bin/redis-cli --cluster create";
    for (auto& node : nodes_) cmd += " " + node.address();
    cmd += " --cluster-replicas " + std::to_string(replicas_each) + " --cluster-yes";
    std::string out;
    if (shell(cmd, out) != 0) throw std::runtime_error("redis-cli --cluster create failed: " + out);
    if (!wait_ok(std::chrono::seconds(20)))
      throw std::runtime_error("the redis cluster did not report cluster_state:ok within 20 s");
    // A replica that never finished its first sync does not fail over: a
    // fault injected before then would find no replica to promote.
    if (!wait_synced(std::chrono::seconds(20)))
      throw std::runtime_error("the redis cluster's replicas did not finish their first sync within 20 s");
  }

  std::vector<Node>& nodes() { return nodes_; }
  std::string seeds() const {
    std::string s;
    for (const auto& n : nodes_) s += (s.empty() ? "" : ",") + n.address();
    return s;
  }
  int node_timeout_ms() const { return node_timeout_ms_; }

  // `redis-cli -p PORT ARGS` on a running node: its output.
  std::string cli(std::uint16_t port, const std::string& args) {
    std::string out;
    shell("/usr/bin/redis-cli -p " + std::to_string(port) + " " + args, out);
    return out;
  }
  // Until every running node reports cluster_state:ok (or `limit`).
  bool wait_ok(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      bool ok = true;
      for (auto& n : nodes_)
        if (n.proc && cli(n.port, "cluster info").find("cluster_state:ok") == std::string::npos) ok = false;
      if (ok) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // Until every running replica is linked to its master and synced.
  bool wait_synced(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      bool synced = true;
      for (auto& n : nodes_) {
        if (!n.proc) continue;
        const std::string info = cli(n.port, "info replication");
        if (info.find("role:slave") != std::string::npos &&
            (info.find("master_link_status:up") == std::string::npos ||
             info.find("master_sync_in_progress:0") == std::string::npos))
          synced = false;
      }
      if (synced) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // The port of the master serving `slot` as node `asked` sees it.
  std::uint16_t master_of(std::uint16_t slot, std::uint16_t asked) {
    const std::string out = cli(asked, "cluster slots");
    // Lines: start, end, host, port, id, (replicas...) per range.
    std::vector<std::string> lines;
    std::size_t at = 0;
    while (at < out.size()) {
      const auto nl = out.find('\n', at);
      lines.push_back(out.substr(at, nl == std::string::npos ? std::string::npos : nl - at));
      at = nl == std::string::npos ? out.size() : nl + 1;
    }
    for (std::size_t i = 0; i + 3 < lines.size(); ++i) {
      char* end = nullptr;
      const long first = std::strtol(lines[i].c_str(), &end, 10);
      if (end == lines[i].c_str() || *end != '\0') continue;
      const long last = std::strtol(lines[i + 1].c_str(), &end, 10);
      if (*end != '\0' || lines[i + 2].find('.') == std::string::npos) continue;
      if (first <= slot && slot <= last) return static_cast<std::uint16_t>(std::stoul(lines[i + 3]));
    }
    return 0;
  }
  Node* node(std::uint16_t port) {
    for (auto& n : nodes_)
      if (n.port == port) return &n;
    return nullptr;
  }

 private:
  Node start_node(std::mt19937& rng) {
    for (int attempt = 0; attempt < 20; ++attempt) {
      Node n;
      n.port = static_cast<std::uint16_t>(20000 + rng() % 20000);  // the cluster bus takes port + 10000
      std::vector<std::string> argv{"/usr/bin/redis-server", "--port", std::to_string(n.port), "--bind", "127.0.0.1",
                                    "--cluster-enabled", "yes", "--cluster-config-file",
                                    dir_.path() + "/nodes-" + std::to_string(n.port) + ".conf",
                                    "--cluster-node-timeout", std::to_string(node_timeout_ms_), "--dir", dir_.path(),
                                    "--save", "", "--appendonly", "no",
                                    // replicas sync at once (the default waits 5 s for more of them)
                                    "--repl-diskless-sync-delay", "0"};
      n.proc = std::make_unique<Child>(argv);
      if (n.proc->wait_for("Ready to accept connections", std::chrono::seconds(10))) return n;
    }
    throw std::runtime_error("no redis-server could start (20 ports tried)");
  }

  TempDir dir_;
  int node_timeout_ms_;
  std::vector<Node> nodes_;
};

}  // namespace kvlink::test
