// Transfers (STORE, RETRIEVE) submitted to the engine and not yet
// completed, counted per connection (--max-in-flight), per instance (the
// status page) and server-wide (a planned restart's drain waits for none).
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>

namespace kvlink::server {

class InFlight {
 public:
  // One connection's count (SessionState::in_flight): shared with its
  // transfers' completions, which may outlive the connection.
  using ConnectionCount = std::shared_ptr<std::uint32_t>;
  // What a submitted transfer holds until it completes.
  struct Ticket {
    ConnectionCount connection;
    std::uint64_t instance = 0;
  };

  // A transfer of `instance`, on the connection counted by `connection`, was submitted.
  Ticket start(const ConnectionCount& connection, std::uint64_t instance);
  // It completed. The connection's count drops even when the tracker is
  // gone (a completion after the handler); pass null then.
  static void end(InFlight* tracker, const Ticket& ticket);

  // The instance's record was made afresh or forgotten: its transfers
  // still running count no more against it.
  void forget(std::uint64_t instance) { per_instance_.erase(instance); }

  std::uint64_t total() const { return total_; }
  std::uint32_t of_instance(std::uint64_t instance) const {
    auto it = per_instance_.find(instance);
    return it == per_instance_.end() ? 0 : it->second;
  }
  bool drained() const { return total_ == 0; }

 private:
  std::uint64_t total_ = 0;
  std::unordered_map<std::uint64_t, std::uint32_t> per_instance_;
};

}  // namespace kvlink::server
