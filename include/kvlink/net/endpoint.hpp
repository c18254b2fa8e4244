// Endpoints are written `unix:/path/to.sock` or `tcp:HOST:PORT` (HOST: an
// IPv4 address, [IPv6], or localhost; omitted, as in tcp:PORT or tcp::PORT,
// it is the loopback address 127.0.0.1). One generic stream socket type serves
// both, so the connection and server code is written once.
#pragma once

#include <asio/basic_socket_acceptor.hpp>
#include <asio/generic/stream_protocol.hpp>
#include <string>
#include <string_view>
#include <system_error>

#include "kvlink/error.hpp"

namespace kvlink::net {

using Protocol = asio::generic::stream_protocol;
using Socket = Protocol::socket;
using Acceptor = asio::basic_socket_acceptor<Protocol>;

struct Endpoint {
  enum class Kind { unix_socket, tcp } kind = Kind::unix_socket;
  std::string path;  // unix
  std::string host;  // tcp
  unsigned short port = 0;

  bool is_unix() const { return kind == Kind::unix_socket; }
  bool is_loopback() const;  // unix sockets count as loopback
  std::string to_string() const;
  Protocol::endpoint asio_endpoint() const;  // throws std::system_error on a bad address
};

// Parses an endpoint, or says what is wrong with it (bad_request).
Result<Endpoint> parse_endpoint(std::string_view text);

// The default server endpoint: unix:$XDG_RUNTIME_DIR/kvlink.sock, or
// unix:/tmp/kvlink-<uid>.sock when XDG_RUNTIME_DIR is unset.
std::string default_endpoint();

}  // namespace kvlink::net
