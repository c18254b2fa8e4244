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

std::string read_auth_token_file(const std::string& path, std::string& token) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fmt::format("auth token file '{}' cannot be read: {}", path, std::strerror(errno));
  std::ostringstream content;
  content << in.rdbuf();
  std::string t = trim(content.str());
  if (t.empty()) return fmt::format("auth token file '{}' is empty; put the shared secret in it", path);
  token = std::move(t);
  return {};
}

std::string resolve_auth_token(const std::string& explicit_token, const std::string& file, std::string& token) {
  if (!explicit_token.empty()) {
    token = explicit_token;
    return {};
  }
  if (!file.empty()) return read_auth_token_file(file, token);
  const char* env = std::getenv(auth_token_env);
  token = env ? trim(env) : std::string();
  return {};
}

}  // namespace kvlink::net
