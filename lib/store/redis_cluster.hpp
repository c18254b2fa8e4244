// A Redis Cluster client on the io_context, for the cluster tier (issue
// 18): the slot map read with CLUSTER SLOTS from any reachable node,
// commands sent to the master of their key's slot over one pipelined
// connection per node (made on first use), MOVED followed (the map is
// corrected at once and read again soon after), ASK followed once
// (ASKING, then the command, on the node named).
//
// Every master is watched by a NodeMonitor (health::Policy, as an engine
// watches its server): while one is degraded its slots fail at once with
// not_connected (a miss, never a wait), and each of its transitions has
// the map read again, so a replica the cluster promoted takes over.
// Not done (yet): reads from replicas.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/steady_timer.hpp>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/error.hpp"
#include "kvlink/store/cluster_keys.hpp"
#include "kvlink/health/policy.hpp"
#include "store/redis_connection.hpp"
#include "store/redis_node_monitor.hpp"

namespace kvlink::store {

struct ClusterConfig {
  std::vector<ClusterNode> seeds;  // any nodes of the cluster
  std::string password;            // AUTH, when the cluster requires it
  Duration connect_timeout = std::chrono::seconds(1);
  Duration slots_timeout = std::chrono::seconds(2);
  int max_redirects = 5;
  // The masters' heartbeat (the engine link's defaults; tests shorten it).
  health::Config health;
  bool watch_nodes = true;
};

class ClusterClient : public std::enable_shared_from_this<ClusterClient> {
 public:
  static std::shared_ptr<ClusterClient> create(asio::any_io_executor ex, ClusterConfig config);
  ClusterClient(const ClusterClient&) = delete;
  ClusterClient& operator=(const ClusterClient&) = delete;

  // Reads the slot map (from the seeds, in turn); `done` says whether one
  // answered. Called again after a MOVED, and by the owner when it wants.
  void refresh(std::function<void(const Error&)> done = {});
  const SlotMap& slots() const { return slots_; }

  // What a command does when its slot's master is down: miss at once
  // (lookups), or wait for the slot map to be read again and go to the
  // master it names if that is another one (writes: a replica the cluster
  // promoted just now takes them), within the deadline.
  enum class MasterDown { miss, wait_for_map };
  // Sends `args` (the command, then its arguments; `key` among them) to
  // the master of `key`'s slot. `done` as RedisConnection's: a redirect is
  // followed, never handed back.
  using Done = RedisConnection::Done;
  void send(const std::string& key, std::vector<std::string> args, Duration deadline, Done done,
            MasterDown on_master_down = MasterDown::miss);

  // Closes every connection (pending commands fail with not_connected)
  // and stops the monitors.
  void close();
  std::size_t connections() const { return nodes_.size(); }
  // The state of `node`'s monitor (healthy while it has none yet).
  health::State node_state(const ClusterNode& node) const;
  // Masters of the map whose heartbeat says degraded now.
  std::size_t masters_degraded() const;
  // Health transitions of the masters' monitors so far.
  std::uint64_t node_transitions() const { return node_transitions_; }

 private:
  struct NodeLink {
    std::shared_ptr<RedisConnection> conn;
    bool connecting = false;
    std::vector<std::function<void(const Error&, const std::shared_ptr<RedisConnection>&)>> waiting;
  };
  struct Command {
    std::string key;
    std::vector<std::string> args;
    TimePoint deadline;
    Done done;
    int redirects = 0;
    MasterDown on_master_down = MasterDown::miss;
  };
  ClusterClient(asio::any_io_executor ex, ClusterConfig config);
  // The node's connection, made if needed; `then` gets it or why not.
  void with_node(const ClusterNode& node,
                 std::function<void(const Error&, const std::shared_ptr<RedisConnection>&)> then);
  void dispatch(std::shared_ptr<Command> cmd, const ClusterNode* ask = nullptr);
  void read_slots(std::size_t seed, std::function<void(const Error&)> done);
  // refresh(), at most once per min_refresh_interval (after failures).
  void refresh_soon();
  static constexpr std::chrono::milliseconds min_refresh_interval{100};
  TimePoint last_failure_refresh_{};
  // Monitors for the masters of the map, none for nodes that are not.
  void watch_masters();

  asio::any_io_executor ex_;
  ClusterConfig config_;
  SlotMap slots_;
  std::map<std::string, NodeLink> nodes_;  // by "host:port"
  std::map<std::string, std::shared_ptr<NodeMonitor>> monitors_;  // by "host:port"
  std::uint64_t next_seed_ = 1;
  std::uint64_t node_transitions_ = 0;
  bool refreshing_ = false;
  std::vector<std::function<void(const Error&)>> refresh_waiters_;
};

// The slot ranges of a CLUSTER SLOTS reply, or why it is not one.
Result<std::vector<SlotMap::Range>> parse_cluster_slots(RedisValue reply);

}  // namespace kvlink::store
