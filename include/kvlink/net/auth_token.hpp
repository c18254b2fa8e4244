// The shared-secret token of HELLO: read from a file or from the
// environment (KVLINK_AUTH_TOKEN), never from the command line, where other
// users could read it in the process list.
#pragma once

#include <string>

namespace kvlink::net {

inline constexpr const char* auth_token_env = "KVLINK_AUTH_TOKEN";

// Reads the token from `path` (the file's content, surrounding whitespace
// removed) into `token`. Returns "" or why it could not.
std::string read_auth_token_file(const std::string& path, std::string& token);

// The token to use: `explicit_token` if set, else the content of `file` if
// set, else $KVLINK_AUTH_TOKEN, else "" (none). Returns "" or why the file
// could not be used.
std::string resolve_auth_token(const std::string& explicit_token, const std::string& file, std::string& token);

}  // namespace kvlink::net
