#include "kvlink/error.hpp"

namespace kvlink {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "kvlink"; }
  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::ok: return "ok";
      case errc::connection_lost: return "connection to the kvlink server lost";
      case errc::timed_out: return "timed out: the deadline passed before the server answered";
      case errc::unhealthy: return "not sent: the link to the kvlink server is degraded";
      case errc::protocol_error: return "protocol error (malformed frame or message)";
      case errc::unknown_instance: return "the server does not know this instance";
      case errc::version_mismatch: return "protocol version mismatch between client and server";
      case errc::frame_too_large: return "frame larger than the negotiated maximum";
      case errc::unknown_opcode: return "operation not supported by the peer";
      case errc::bad_request: return "invalid request";
      case errc::not_found: return "not found";
      case errc::unauthorized: return "unauthorized: missing or wrong auth token";
      case errc::limit_exceeded: return "server limit exceeded";
      case errc::not_registered: return "no KV cache registered for this instance";
      case errc::server_error: return "internal server error";
      case errc::shutting_down: return "shutting down";
      case errc::not_connected: return "not connected to the kvlink server";
    }
    return "unknown kvlink error " + std::to_string(value);
  }
};

}  // namespace

const std::error_category& error_category() noexcept {
  static const Category category;
  return category;
}

std::uint16_t to_wire(std::error_code ec) noexcept {
  if (!ec) return 0;
  if (ec.category() == error_category()) return static_cast<std::uint16_t>(ec.value());
  return static_cast<std::uint16_t>(errc::server_error);
}

std::error_code from_wire(std::uint16_t code) noexcept {
  if (code == 0) return {};
  if (code > static_cast<std::uint16_t>(errc::not_connected)) return errc::server_error;
  return static_cast<errc>(code);
}

}  // namespace kvlink

namespace kvlink {

Error& Error::context(std::string_view where) {
  if (*this) detail_ = std::string(where) + ": " + message();
  return *this;
}

}  // namespace kvlink
