// The server's liveness registry and its use by the RequestHandler.
#include <doctest/doctest.h>

#include <map>
#include <vector>

#include "kvlink/server/config.hpp"
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

TEST_CASE("liveness: the last connection closing forgets an instance without a registration, keeps one with") {
  LivenessRegistry r({120s, 1h});
  std::vector<std::uint64_t> released;
  r.on_release([&](std::uint64_t id) { released.push_back(id); });
  TimePoint t{};
  r.hello(1, t);
  r.hello(2, t);
  r.registered(2, t);
  CHECK(r.holds_registration(2));
  CHECK(r.last_connection_closed(1));  // nothing to come back to
  CHECK_FALSE(r.known(1));
  CHECK_FALSE(r.last_connection_closed(2));
  CHECK(r.known(2));
  CHECK(r.size() == 1);
  CHECK(released.empty());  // forgetting is not reaping
  CHECK(r.reaped() == 0);
  // The kept instance ages from its last traffic, then the reaper ends it.
  CHECK(r.reap(t + 1h) == 0);
  CHECK(r.reap(t + 1h + 1s) == 1);
  CHECK(released == std::vector<std::uint64_t>{2});
  // Unknown (reaped while connected): nothing to do.
  CHECK_FALSE(r.last_connection_closed(3));
}

TEST_CASE("liveness: unregistering ends the grace and the keeping") {
  LivenessRegistry r({120s, 1h});
  TimePoint t{};
  r.hello(1, t);
  r.registered(1, t);
  r.registered(1, t + 10s, false);
  CHECK_FALSE(r.holds_registration(1));
  CHECK(r.reap(t + 131s) == 1);  // the plain timeout, from the UNREGISTER
  r.hello(2, t);
  r.registered(2, t);
  r.registered(2, t, false);
  CHECK(r.last_connection_closed(2));
  // Registering an unknown instance records nothing.
  r.registered(3, t);
  CHECK_FALSE(r.known(3));
}

TEST_CASE("liveness: a reap timeout of 0 disables the reaper") {
  LivenessRegistry r({0s, 1h});
  CHECK_FALSE(r.reaper_enabled());
  TimePoint t{};
  r.hello(1, t);
  r.hello(2, t);
  r.registered(2, t);
  CHECK(r.reap(t + std::chrono::hours(24 * 365 * 10)) == 0);
  CHECK(r.size() == 2);
}

TEST_CASE("liveness: a grace shorter than the timeout never reaps sooner than the timeout") {
  LivenessRegistry r({120s, 10s});
  TimePoint t{};
  r.hello(1, t);
  r.registered(1, t);
  CHECK(r.reap(t + 60s) == 0);
  CHECK(r.reap(t + 121s) == 1);
}

TEST_CASE("reaper flags: 0 disables, a grace below the timeout is an error, below 3 s is a warning") {
  server::ServerConfig c;
  std::string warning = "stale";
  CHECK_FALSE(check_reaper(c, warning));  // defaults: 120 s, 3600 s
  CHECK(warning.empty());
  c.reap_timeout_s = 0;
  c.registration_grace_s = 1;
  CHECK_FALSE(check_reaper(c, warning));
  CHECK(warning.empty());
  c.reap_timeout_s = 60;
  c.registration_grace_s = 30;
  const std::string why = check_reaper(c, warning).message();
  CHECK(why.find("--registration-grace-s 30 is shorter than --reap-timeout-s 60") == 0);
  c.registration_grace_s = 60;  // equal is fine
  CHECK_FALSE(check_reaper(c, warning));
  c.reap_timeout_s = 2;
  CHECK_FALSE(check_reaper(c, warning));
  CHECK(warning.find("--reap-timeout-s 2 is below 3 s (3 x the clients' default 1 s heartbeat interval)") == 0);
  c.reap_timeout_s = 3;
  CHECK_FALSE(check_reaper(c, warning));
  CHECK(warning.empty());
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
  REQUIRE_FALSE(wire::decode(r.second, e, "error"));
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
  REQUIRE_FALSE(wire::decode(r.second, stats, "stats"));
  std::map<std::string, std::int64_t> m;
  for (auto& e : stats.entries) m[e.name] = e.value;
  CHECK(m.at("instances_live") == 1);
  CHECK(m.at("instances_reaped") == 1);
}

TEST_CASE("request handler: an admin connection's PING is never unknown_instance and it is no instance") {
  server::ServerConfig cfg;
  cfg.reap_timeout_s = 10;
  server::RequestHandler h(cfg, 1);
  server::SessionState s;
  TimePoint t{};
  wire::HelloRequest hello;
  hello.instance_id = 43;
  hello.role = wire::Role::admin;
  CHECK(error_code_of(call(h, s, hello, t)) == 0);
  CHECK_FALSE(h.liveness().known(43));
  h.tick(t + 1h);  // nothing to reap, and still answered
  CHECK(error_code_of(call(h, s, wire::PingRequest{}, t + 1h)) == 0);
  CHECK(h.liveness().size() == 0);
  CHECK(h.liveness().reaped() == 0);
  h.on_session_end(s, t + 1h);
  CHECK(h.liveness().size() == 0);
}
