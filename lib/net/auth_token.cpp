#include "kvlink/net/auth_token.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <sstream>

namespace kvlink::net {

namespace {
std::string trim(std::string s) {
  const char* space = " \t\r\n";
  const auto first = s.find_first_not_of(space);
  if (first == std::string::npos) return {};
  return s.substr(first, s.find_last_not_of(space) - first + 1);
}
}  // namespace

Result<std::string> read_auth_token_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int e = errno;
    return Error(std::error_code(e, std::generic_category()),
                 fmt::format("auth token file '{}' cannot be read: {}", path, std::strerror(e)));
  }
  std::ostringstream content;
  content << in.rdbuf();
  std::string token = trim(content.str());
  if (token.empty())
    return Error(errc::bad_request, fmt::format("auth token file '{}' is empty; put the shared secret in it", path));
  return token;
}

Result<std::string> resolve_auth_token(const std::string& explicit_token, const std::string& file) {
  if (!explicit_token.empty()) return explicit_token;
  if (!file.empty()) return read_auth_token_file(file);
  const char* env = std::getenv(auth_token_env);
  return env ? trim(env) : std::string();
}

}  // namespace kvlink::net
