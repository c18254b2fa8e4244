// What the benches that drive a real kvlink-server share: medians of
// rounds, a server's STATS row (through kvlink-cli), transfer specs.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvlink/adapter/worker.hpp"
#include "kvlink/clock.hpp"
#include "server_process.hpp"

namespace kvlink::bench {

inline double seconds(Duration d) { return std::chrono::duration<double>(d).count(); }

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// STATS row `name` of the server on `endpoint`.
inline std::int64_t stat_of(const std::string& endpoint, const std::string& name) {
  const std::string cmd = test::ServerProcess::binary("KVLINK_CLI") + " stats --server " + endpoint;
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (p && std::fgets(buf, sizeof buf, p)) out += buf;
  if (p) ::pclose(p);
  const auto at = out.find("\"" + name + "\":");
  if (at == std::string::npos) throw std::runtime_error("no " + name + " in STATS: " + out);
  return std::strtoll(out.c_str() + at + name.size() + 3, nullptr, 10);
}

inline adapter::TransferSpec spec(std::string id, std::vector<store::Token> tokens,
                                  std::vector<std::uint32_t> blocks) {
  adapter::TransferSpec s;
  s.request_id = std::move(id);
  s.tokens = std::move(tokens);
  s.block_ids = std::move(blocks);
  return s;
}

}  // namespace kvlink::bench
