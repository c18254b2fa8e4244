#include "kvlink/server/peer.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <fmt/format.h>

namespace kvlink::server {

Peer peer_of(int fd) {
  Peer p;
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    p.text = "unknown peer";
    return p;
  }
  if (addr.ss_family == AF_UNIX) {
    ucred cred{};
    socklen_t cred_len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) == 0) {
      p.has_credentials = true;
      p.pid = cred.pid;
      p.uid = cred.uid;
      p.gid = cred.gid;
      p.text = fmt::format("pid {} uid {}", cred.pid, cred.uid);
    } else {
      p.text = "unknown unix peer";
    }
    return p;
  }
  char host[INET6_ADDRSTRLEN] = "?";
  unsigned port = 0;
  if (addr.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(addr);
    ::inet_ntop(AF_INET, &in.sin_addr, host, sizeof host);
    port = ntohs(in.sin_port);
    p.text = fmt::format("{}:{}", host, port);
  } else if (addr.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(addr);
    ::inet_ntop(AF_INET6, &in6.sin6_addr, host, sizeof host);
    port = ntohs(in6.sin6_port);
    p.text = fmt::format("[{}]:{}", host, port);
  } else {
    p.text = "unknown peer";
  }
  return p;
}

}  // namespace kvlink::server
