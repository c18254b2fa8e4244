// kvlink's error codes: one std::error_category shared by the library, the
// server and the wire (error replies carry these numbers).
#pragma once

#include <cstdint>
#include <string>
#include <system_error>

namespace kvlink {

enum class errc : std::uint16_t {
  ok = 0,
  connection_lost = 1,   // the socket closed or reset while a call was pending
  timed_out = 2,         // the call's deadline passed
  unhealthy = 3,         // not sent: the link is degraded
  protocol_error = 4,    // malformed frame or message
  unknown_instance = 5,  // the server does not know this instance (reaped or restarted)
  version_mismatch = 6,  // client and server speak different protocol versions
  frame_too_large = 7,   // a frame exceeds the negotiated maximum
  unknown_opcode = 8,    // the peer does not implement this operation
  bad_request = 9,       // well-formed but invalid arguments
  not_found = 10,        // a key, job or registration does not exist
  unauthorized = 11,     // missing or wrong auth token
  limit_exceeded = 12,   // a server limit (connections, in-flight, quota) was hit
  not_registered = 13,   // the worker has no KV cache registered
  server_error = 14,     // the server failed internally
  shutting_down = 15,    // the server or client is stopping
  not_connected = 16,    // no connection exists yet
};

const std::error_category& error_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

// Wire value of an error code: kvlink codes travel as themselves, anything
// else as server_error.
std::uint16_t to_wire(std::error_code ec) noexcept;
std::error_code from_wire(std::uint16_t code) noexcept;

}  // namespace kvlink

template <>
struct std::is_error_code_enum<kvlink::errc> : std::true_type {};
