// The server's liveness registry and its use by the RequestHandler.
#include <doctest/doctest.h>

#include <map>
#include <vector>

#include "kvlink/server/liveness.hpp"

using namespace kvlink;
using namespace kvlink::server;
using namespace std::chrono_literals;

TEST_CASE("liveness: traffic refreshes, silence reaps, release hook runs") {
  LivenessRegistry r({120s, 1h});
  std::vector<std::uint64_t> released;
  r.on_release([&](std::uint64_t id) { released.push_back(id); });
  TimePoint t{};
  r.hello(1, t);
  r.hello(2, t);
  r.pinged(1, t);
  CHECK(r.reap(t + 100s) == 0);
  CHECK(r.refresh(1, t + 100s));
  CHECK(r.reap(t + 121s) == 1);  // 2 was silent 121 s
  CHECK(released == std::vector<std::uint64_t>{2});
  CHECK(r.known(1));
  CHECK_FALSE(r.known(2));
  CHECK_FALSE(r.refresh(2, t + 121s));  // unknown until HELLO
  r.hello(2, t + 122s);
  CHECK(r.known(2));
  CHECK(r.reaped() == 1);
}

TEST_CASE("liveness: registered but never pinged gets the registration grace") {
  LivenessRegistry r({120s, 1h});
  std::vector<std::uint64_t> released;
  r.on_release([&](std::uint64_t id) { released.push_back(id); });
  TimePoint t{};
  r.hello(7, t);
  r.registered(7, t);
  CHECK(r.reap(t + 30min) == 0);
  CHECK(r.reap(t + 1h + 1s) == 1);
  CHECK(released == std::vector<std::uint64_t>{7});
  // Once it pinged, the normal timeout applies.
  r.hello(8, t);
  r.registered(8, t);
  r.pinged(8, t);
  CHECK(r.reap(t + 121s) == 1);
}

// ---- through the RequestHandler ---------------------------------------------

#include "kvlink/server/request_handler.hpp"

namespace {

struct Collect final : server::ReplySink {
  wire::Bytes out;
  wire::Bytes& buffer() override { return out; }
  void flush() override {}
  std::weak_ptr<ReplySink> weak_self() override { return {}; }
};

template <class M>
std::pair<wire::Header, wire::Bytes> call(server::RequestHandler& h, server::SessionState& s, const M& m,
                                          TimePoint now) {
  wire::Bytes bytes;
  wire::FrameBuilder(bytes).add(static_cast<std::uint8_t>(M::opcode), 0, 1, [&](wire::Writer& w) { encode(w, m); });
  wire::FrameParser p;
  p.append(bytes);
  auto f = p.next();
  REQUIRE(f);
  Collect sink;
  REQUIRE(h.handle(s, *f, sink, now));
  wire::FrameParser q;
  q.append(sink.out);
  auto r = q.next();
  REQUIRE(r);
  return {r->header, wire::Bytes(r->payload.begin(), r->payload.end())};
}

std::uint16_t error_code_of(const std::pair<wire::Header, wire::Bytes>& r) {
  if (!r.first.is_error()) return 0;
  wire::ErrorReply e;
  REQUIRE(wire::decode(r.second, e, "error") == "");
  return e.code;
}

}  // namespace

TEST_CASE("request handler: a reaped instance's PING answers unknown_instance until it HELLOs again") {
  server::ServerConfig cfg;
  cfg.reap_timeout_s = 10;
  server::RequestHandler h(cfg, 1);
  std::vector<std::uint64_t> released;
  h.liveness().on_release([&](std::uint64_t id) { released.push_back(id); });
  server::SessionState s;
  TimePoint t{};
  wire::HelloRequest hello;
  hello.instance_id = 42;
  CHECK(error_code_of(call(h, s, hello, t)) == 0);
  CHECK(error_code_of(call(h, s, wire::PingRequest{}, t + 9s)) == 0);
  h.tick(t + 18s);  // refreshed at 9 s: still alive
  CHECK(released.empty());
  h.tick(t + 20s);
  CHECK(released == std::vector<std::uint64_t>{42});
  CHECK(error_code_of(call(h, s, wire::PingRequest{}, t + 21s)) == to_wire(errc::unknown_instance));
  CHECK(error_code_of(call(h, s, hello, t + 22s)) == 0);
  CHECK(error_code_of(call(h, s, wire::PingRequest{}, t + 22s)) == 0);
  // STATS reports the registry.
  auto r = call(h, s, wire::StatsRequest{}, t + 23s);
  REQUIRE_FALSE(r.first.is_error());
  wire::StatsReply stats;
  REQUIRE(wire::decode(r.second, stats, "stats") == "");
  std::map<std::string, std::int64_t> m;
  for (auto& e : stats.entries) m[e.name] = e.value;
  CHECK(m.at("instances_live") == 1);
  CHECK(m.at("instances_reaped") == 1);
}
