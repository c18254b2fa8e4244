// A Redis Cluster node watched the way an engine watches its kvlink-server
// (health/policy.hpp: the same states, thresholds, timeouts and reconnect
// backoff): PINGs on a connection of its own, so a node that hangs or dies
// is known within about a ping timeout, and the cluster tier turns its
// slots into misses at once instead of waiting on it. One log line per
// transition. Single-threaded, on the io_context.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/steady_timer.hpp>
#include <functional>
#include <memory>
#include <string>

#include "kvlink/health/policy.hpp"
#include "kvlink/store/cluster_keys.hpp"
#include "store/redis_connection.hpp"

namespace kvlink::store {

class NodeMonitor : public std::enable_shared_from_this<NodeMonitor> {
 public:
  using OnTransition = std::function<void(const ClusterNode&, const health::Transition&)>;
  static std::shared_ptr<NodeMonitor> create(asio::any_io_executor ex, ClusterNode node, std::string password,
                                             const health::Config& config, std::uint64_t seed,
                                             OnTransition on_transition = {});
  NodeMonitor(const NodeMonitor&) = delete;
  NodeMonitor& operator=(const NodeMonitor&) = delete;

  void start();
  void stop();  // idempotent; no callback after it
  health::State state() const { return policy_.state(); }
  const ClusterNode& node() const { return node_; }
  health::Counters counters() const { return policy_.counters(Clock::now()); }

 private:
  NodeMonitor(asio::any_io_executor ex, ClusterNode node, std::string password, const health::Config& config,
              std::uint64_t seed, OnTransition on_transition);
  void apply(health::Actions a);
  void arm();
  void do_connect();
  void do_ping();

  asio::any_io_executor ex_;
  ClusterNode node_;
  std::string password_;
  health::Policy policy_;
  OnTransition on_transition_;
  asio::steady_timer timer_;
  std::shared_ptr<RedisConnection> conn_;
  std::uint64_t conn_gen_ = 0;  // answers of an older connection are ignored
  bool stopped_ = false;
};

}  // namespace kvlink::store
