// kvlink's error codes: one std::error_category shared by the library, the
// server and the wire (error replies carry these numbers).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

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

namespace kvlink {

// kvlink's one way to say "failed": an error code (what kind of failure,
// which a program tests) plus a detail (what exactly was wrong and what to
// do, which a person reads). A default-constructed Error is success; like
// std::error_code, it converts to true when it holds a failure:
//
//   if (auto err = check_layout(layout)) return err;
//
// Code decides, detail explains: never compare details.
class [[nodiscard]] Error {
 public:
  Error() = default;
  Error(std::error_code code, std::string detail = {}) : code_(code), detail_(std::move(detail)) {}
  Error(errc code, std::string detail = {}) : Error(make_error_code(code), std::move(detail)) {}

  explicit operator bool() const noexcept { return static_cast<bool>(code_); }
  std::error_code code() const noexcept { return code_; }
  // What was wrong and what to do; falls back to the code's own message.
  const std::string& detail() const noexcept { return detail_; }
  // The detail if there is one, else the code's message.
  std::string message() const { return detail_.empty() ? code_.message() : detail_; }

  // Prefixes the detail with where it happened ("chunk 3: ...").
  Error& context(std::string_view where);

  friend bool operator==(const Error& e, errc code) noexcept { return e.code_ == make_error_code(code); }

 private:
  std::error_code code_;
  std::string detail_;
};

// A value or the Error that prevented it: std::expected<T, Error> in
// C++23's terms, which kvlink's C++20 cannot use yet. Converts to true when
// it holds a value.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}
  Result(Error error) : error_(std::move(error)) {
    if (!error_) error_ = Error(errc::server_error, "Result built from a success Error");
  }
  Result(errc code, std::string detail) : Result(Error(code, std::move(detail))) {}

  bool has_value() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return has_value(); }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  // The failure; a success Error when there is a value.
  const Error& error() const noexcept { return error_; }

 private:
  std::optional<T> value_;
  Error error_;
};

}  // namespace kvlink
