// The server-wide bound on buffered inbound bytes (--max-inbound-bytes):
// the payloads of frames still arriving, summed over all connections. A
// client that trickles a frame announced at --max-payload makes the server
// hold that much for as long as it likes; without a bound, --max-connections
// of them would hold --max-payload each. Each connection has a Claim for
// the frame at the front of its buffer; a frame that would take the sum
// past the limit is refused before the buffer grows to hold it.
// Sans-io: the network layer reports what each connection's parser holds,
// the budget decides.
#pragma once

#include <cstdint>
#include <string>

#include "kvlink/error.hpp"
#include "kvlink/server/config.hpp"

namespace kvlink::server {

class InboundBudget {
 public:
  // Payloads up to this are always admitted (counted, never refused): each
  // connection reads that much at a time anyway, --max-connections bounds
  // them, and a full budget must not stop ordinary small requests.
  static constexpr std::uint32_t small_payload = 64 * 1024;

  // One connection's share: the payload of its frame still arriving.
  struct Claim {
    std::uint64_t bytes = 0;
  };

  explicit InboundBudget(std::uint64_t limit) : limit_(limit) {}

  // The connection's frame still arriving has a payload of `payload` bytes
  // (0: no frame is arriving). Returns success with the claim set to it
  // (what it held before is released), or errc::limit_exceeded with why
  // the frame is refused, naming --max-inbound-bytes (the claim is
  // unchanged; close the connection and release it).
  Error hold(Claim& claim, std::uint32_t payload);
  // The connection ended: its claim goes back.
  void release(Claim& claim);

  // Bytes claimed now, over all connections.
  std::uint64_t held() const { return held_; }
  std::uint64_t limit() const { return limit_; }

 private:
  std::uint64_t limit_;
  std::uint64_t held_ = 0;
};

// The inbound limit `config` asks for: max_inbound_bytes, or 4 x
// max_payload when that is 0 (the default).
std::uint64_t inbound_limit(const ServerConfig& config);

// Why `config`'s inbound limit cannot be served (bad_request), or success:
// below max_payload, a frame of the largest size would always be refused.
Error check_inbound(const ServerConfig& config);

}  // namespace kvlink::server
