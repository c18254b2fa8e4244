// The shared-secret token of HELLO: read from a file or from the
// environment (KVLINK_AUTH_TOKEN), never from the command line, where other
// users could read it in the process list.
#pragma once

#include <string>

#include "kvlink/error.hpp"

namespace kvlink::net {

inline constexpr const char* auth_token_env = "KVLINK_AUTH_TOKEN";

// The token in `path`: the file's content, surrounding whitespace removed;
// an error if it cannot be read or is empty.
Result<std::string> read_auth_token_file(const std::string& path);

// The token to use: `explicit_token` if set, else the content of `file` if
// set, else $KVLINK_AUTH_TOKEN, else "" (none); an error if the file cannot
// be used.
Result<std::string> resolve_auth_token(const std::string& explicit_token, const std::string& file);

}  // namespace kvlink::net
