// The server's counters that STATS shows, kept by the request handler and
// the network layer.
#pragma once

#include <array>
#include <cstdint>

#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

struct OpCounters {
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
};

struct ServerCounters {
  std::array<OpCounters, wire::max_opcode + 1> ops{};  // indexed by opcode
  std::uint64_t unknown_opcodes = 0;
  std::uint64_t protocol_errors = 0;  // malformed frames or messages
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_refused = 0;
  std::uint64_t connections_open = 0;
  // Limits and access control (each refusal is an error reply).
  std::uint64_t in_flight_refused = 0;    // requests beyond max_in_flight
  std::uint64_t instances_refused = 0;    // HELLOs beyond max_instances
  std::uint64_t auth_failures = 0;        // HELLOs with a missing or wrong token
  std::uint64_t instance_claims_refused = 0;  // HELLOs claiming an id bound to another client's secret
  std::uint64_t frames_too_large = 0;     // frames longer than max_payload (the connection is closed)
  // Slow readers (kept by the network layer).
  std::uint64_t reads_paused = 0;         // times a connection's reads stopped for its queued replies
  std::uint64_t connections_paused = 0;   // connections whose reads are stopped now
  std::uint64_t slow_reader_closes = 0;   // connections closed for not reading their replies
  // Frames still arriving (kept by the network layer, --max-inbound-bytes).
  std::uint64_t inbound_buffered_bytes = 0;  // their payloads, over all connections, now
  std::uint64_t inbound_refused = 0;         // frames refused for passing the limit (connection closed)
};

}  // namespace kvlink::server
