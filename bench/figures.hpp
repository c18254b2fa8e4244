// What the benches that drive a real kvlink-server share: medians of
// rounds, a server's STATS row (through kvlink-cli), transfer specs.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "kvlink/adapter/scheduler.hpp"
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

// Looks `tokens` up (polling until answered), then RETRIEVEs the match
// into `dst`: seconds from the lookup to the retrieve's completion. Throws
// unless every token matched (`why_not` adds what the caller knows) and
// one chunk came back.
inline double hit_seconds(adapter::SchedulerAdapter& scheduler, adapter::WorkerAdapter& worker,
                          const std::string& id, const std::vector<store::Token>& tokens,
                          const std::vector<std::uint32_t>& dst, const std::function<std::string()>& why_not = {}) {
  using namespace std::chrono_literals;
  const auto t0 = Clock::now();
  if (auto l = scheduler.submit_lookup(id, tokens); !l) throw std::runtime_error(l.error().message());
  auto st = scheduler.check_lookup(id);
  while (st && !st->ready && Clock::now() - t0 < 10s) {
    std::this_thread::sleep_for(100us);  // the answer comes when the tier's read landed
    st = scheduler.check_lookup(id);
  }
  if (!st || !st->ready || st->matched_tokens != tokens.size())
    throw std::runtime_error(fmt::format(
        "{}: the lookup did not hit the chunk ({}{})", id,
        !st ? st.error().message() : fmt::format("ready {} matched {}", st->ready, st->matched_tokens),
        why_not ? "; " + why_not() : std::string()));
  if (auto got = worker.submit_retrieve(spec(id, tokens, dst)); !got || got->retrieved_chunks != 1)
    throw std::runtime_error("retrieve failed: " + (got ? std::string("nothing retrieved") : got.error().message()));
  const double s = seconds(Clock::now() - t0);
  (void)worker.get_finished({});
  return s;
}

}  // namespace kvlink::bench
