#include "kvlink/net/endpoint.hpp"

#include <unistd.h>

#include <asio/ip/address.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <charconv>
#include <cstdlib>
#include <fmt/format.h>

namespace kvlink::net {

bool Endpoint::is_loopback() const {
  if (is_unix()) return true;
  std::error_code ec;
  auto addr = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  return !ec && addr.is_loopback();
}

std::string Endpoint::to_string() const {
  if (is_unix()) return "unix:" + path;
  if (host.find(':') != std::string::npos) return fmt::format("tcp:[{}]:{}", host, port);
  return fmt::format("tcp:{}:{}", host, port);
}

Protocol::endpoint Endpoint::asio_endpoint() const {
  if (is_unix()) return asio::local::stream_protocol::endpoint(path);
  auto addr = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host);
  return asio::ip::tcp::endpoint(addr, port);
}

Result<Endpoint> parse_endpoint(std::string_view text) {
  auto bad = [text](std::string_view what) {
    return Error(errc::bad_request, fmt::format("endpoint '{}': {}", text, what));
  };
  Endpoint out;
  if (text.starts_with("unix:")) {
    out.kind = Endpoint::Kind::unix_socket;
    out.path = std::string(text.substr(5));
    if (out.path.empty()) return bad("unix socket path is empty (write unix:/path/to.sock)");
    if (out.path.size() >= 108) return bad("unix socket path is longer than 107 bytes");  // sizeof(sun_path)
    return out;
  }
  if (!text.starts_with("tcp:"))
    return bad("must start with unix: or tcp: (e.g. unix:/tmp/kvlink.sock, tcp:127.0.0.1:7070)");
  out.kind = Endpoint::Kind::tcp;
  std::string_view rest = text.substr(4);
  std::string_view host, port;
  if (rest.starts_with('[')) {
    auto close = rest.find(']');
    if (close == std::string_view::npos || close + 1 >= rest.size() || rest[close + 1] != ':')
      return bad("write IPv6 as tcp:[ADDR]:PORT");
    host = rest.substr(1, close - 1);
    port = rest.substr(close + 2);
  } else {
    auto colon = rest.rfind(':');
    if (colon == std::string_view::npos) {
      // tcp:PORT: the host omitted means loopback, as with tcp::PORT.
      if (rest.empty() || rest.find_first_not_of("0123456789") != std::string_view::npos)
        return bad("missing port (write tcp:HOST:PORT, or tcp:PORT for loopback)");
      colon = 0;
      rest = text.substr(3);  // ":PORT"
    }
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
  }
  unsigned value = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc{} || p != port.data() + port.size() || value > 65535)
    return bad(fmt::format("port '{}' is not a number from 0 to 65535", port));
  out.host = std::string(host.empty() ? "127.0.0.1" : host);
  out.port = static_cast<unsigned short>(value);
  if (out.host != "localhost") {
    std::error_code aec;
    asio::ip::make_address(out.host, aec);
    if (aec) return bad(fmt::format("host '{}' is not an IP address (names other than localhost are not resolved)", out.host));
  }
  return out;
}

std::string default_endpoint() {
  if (const char* dir = std::getenv("XDG_RUNTIME_DIR"); dir != nullptr && *dir != '\0')
    return fmt::format("unix:{}/kvlink.sock", dir);
  return fmt::format("unix:/tmp/kvlink-{}.sock", ::getuid());
}

}  // namespace kvlink::net
