// Who is at the other end of a client connection, for the server's logs.
// On a unix socket the kernel says (SO_PEERCRED, taken when the client
// connected); on TCP only the address is known.
#pragma once

#include <sys/types.h>

#include <string>

namespace kvlink::server {

struct Peer {
  bool has_credentials = false;  // unix socket: pid, uid and gid are the kernel's word
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::string text;  // "pid 1234 uid 1000" or "127.0.0.1:41234"; "unknown peer" if neither could be read
};

// The peer of connected socket `fd`.
Peer peer_of(int fd);

}  // namespace kvlink::server
