// Who is connected: HELLO (auth token, instance claims, --max-instances),
// the records of known instances and their connections, and what goes when
// an instance's last connection closes or the reaper forgets it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvlink/clock.hpp"
#include "kvlink/server/config.hpp"
#include "kvlink/server/in_flight.hpp"
#include "kvlink/server/liveness.hpp"
#include "kvlink/server/peer.hpp"
#include "kvlink/server/reporter.hpp"
#include "kvlink/server/session.hpp"
#include "kvlink/server/status.hpp"

namespace kvlink::server {

// True if `a` equals `b`; the time taken depends only on their lengths.
bool constant_time_equal(std::string_view a, std::string_view b);

class Handshake {
 public:
  // What the handshake asks of the other parts of the server about an instance.
  struct Hooks {
    std::function<bool(std::uint64_t)> registered;             // it holds a KV-cache registration
    std::function<void(std::uint64_t)> drop_registration;      // it is forgotten: its registration goes
    std::function<void(std::uint64_t)> release_scheduler_state;  // its lookup sessions, locks and jobs go
    std::function<bool()> draining;                            // HELLO tells a planned restart
  };
  struct Identity {
    std::uint64_t boot_id = 0;
    std::uint64_t capabilities = 0;  // the transfer engine's
  };
  // Sets the liveness registry's release hook (reaped instances come here).
  Handshake(const ServerConfig& config, Identity identity, LivenessRegistry& liveness, Reporter& reporter,
            InFlight& in_flight, Hooks hooks);
  Handshake(const Handshake&) = delete;
  Handshake& operator=(const Handshake&) = delete;

  // HELLO. Returns false when the connection must be closed.
  bool hello(SessionState& session, const wire::Frame& frame, ReplySink& sink, TimePoint now);
  // The session's connection ended: its instance's last connection takes
  // its scheduler state along, and the instance itself unless it holds a
  // registration.
  void connection_closed(SessionState& session, TimePoint now);
  // Reaps silent instances (each is logged and its state released).
  void reap(TimePoint now);

  std::uint64_t boot_id() const { return identity_.boot_id; }
  // Every known instance as the status page shows it (without registration).
  std::vector<InstanceStatus> instances(TimePoint now) const;

 private:
  // What the server knows of each instance until it is forgotten (left,
  // or reaped).
  struct Instance {
    std::string secret;  // its first HELLO's: other clients cannot claim its id
    std::string label;   // "pid 1234 uid 1000 (client name)", for the log
    wire::Role role = wire::Role::scheduler;
    std::string client;
    Peer peer;
  };
  // Reaped: the instance is gone for good (a later HELLO starts afresh).
  void reaped(std::uint64_t instance);
  void forget(std::uint64_t instance);

  const ServerConfig& config_;
  Identity identity_;
  LivenessRegistry& liveness_;
  Reporter& reporter_;
  InFlight& in_flight_;
  Hooks hooks_;
  std::unordered_map<std::uint64_t, Instance> instances_;
  std::unordered_map<std::uint64_t, std::uint32_t> connections_;  // per instance id
  TimePoint reap_now_{};  // of the reap in progress (reaped() logs it)
};

}  // namespace kvlink::server
