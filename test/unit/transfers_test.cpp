// Transfers on its own: who may transfer, the drain with fake time, and
// the checks of a registration.
#include <doctest/doctest.h>

#include "collect_sink.hpp"
#include "kvlink/server/transfers.hpp"
#include "request_frame.hpp"

using namespace kvlink;
using namespace kvlink::wire;
using namespace std::chrono_literals;
using test::RequestFrame;

namespace {

struct Fixture {
  server::ServerConfig config;
  server::ServerCounters counters;
  server::Reporter reporter{counters};
  server::TrafficTotals totals;
  server::LivenessRegistry liveness;
  server::InFlight in_flight;
  transfer::NullTransferEngine engine;
  store::L1Pool pool{1 << 20, false, 1 << 16};
  store::KvStore store{pool, {}};
  server::TierFetches fetches{store};
  server::LookupSessions lookups{config, store, reporter, totals, in_flight, fetches};
  server::Transfers transfers{{config, engine, pool, store, liveness, reporter, in_flight, lookups, totals}};
  std::shared_ptr<test::CollectSink> sink = std::make_shared<test::CollectSink>();
  TimePoint now{};

  Fixture() { REQUIRE_FALSE(pool.map()); }
  ErrorReply only_error() { return sink->only_error(); }
};

server::SessionState session(Role role, std::uint64_t id) {
  server::SessionState s;
  s.hello_done = true;
  s.role = role;
  s.instance_id = id;
  return s;
}

}  // namespace

TEST_CASE("transfers: admins never transfer; a draining server takes no new transfer") {
  Fixture fx;
  auto admin = session(Role::admin, 1), worker = session(Role::worker, 2);
  const RequestFrame store(StoreRequest{});
  CHECK(fx.transfers.refuse_transfer(admin, store, *fx.sink));
  CHECK(fx.only_error().message.find("said HELLO as admin") != std::string::npos);
  CHECK_FALSE(fx.transfers.refuse_transfer(worker, store, *fx.sink));
  CHECK(fx.sink->frames().empty());
  CHECK(fx.transfers.begin_drain(fx.now, 5s) == 0);
  CHECK(fx.transfers.refuse_transfer(worker, store, *fx.sink));
  const ErrorReply e = fx.only_error();
  CHECK(e.code == to_wire(errc::shutting_down));
  CHECK(e.message.find("STORE refused: the server is draining") == 0);
  CHECK(fx.counters.ops[static_cast<std::uint8_t>(Opcode::store)].errors == 2);
}

TEST_CASE("transfers: the drain waits for transfers in flight and queued replies, until its timeout (fake time)") {
  Fixture fx;
  auto conn = std::make_shared<std::uint32_t>(0);
  const auto ticket = fx.in_flight.start(conn, 2);
  CHECK(fx.transfers.begin_drain(fx.now, 10s) == 1);
  CHECK(fx.transfers.begin_drain(fx.now + 5s, 1s) == 1);  // idempotent: the first deadline holds
  CHECK(fx.transfers.drain_started() == fx.now);
  CHECK(fx.transfers.drain_step(fx.now + 9s, 0) == server::DrainStep::wait);
  CHECK(fx.transfers.drain_step(fx.now + 10s, 0) == server::DrainStep::timed_out);
  server::InFlight::end(&fx.in_flight, ticket);
  CHECK(fx.transfers.drain_step(fx.now + 1s, 1) == server::DrainStep::wait);  // a reply still to send
  CHECK(fx.transfers.drain_step(fx.now + 1s, 0) == server::DrainStep::drained);
}

TEST_CASE("transfers: registrations are checked and logged as refusals; UNREGISTER is idempotent") {
  Fixture fx;
  auto worker = session(Role::worker, 2);
  RegisterKvCacheRequest req;
  req.model = "m";
  req.ns = 0;
  req.world_size = 1;
  req.layout = paged_layout(2, 100, 16, 1, 8, 2);
  fx.transfers.register_cache(worker, RequestFrame(req), *fx.sink, {}, fx.now);
  const ErrorReply e = fx.only_error();
  CHECK(e.message.find("namespace 0 is not a namespace id") == 0);
  REQUIRE(fx.reporter.events().events().size() == 1);
  CHECK(fx.reporter.events().events()[0].kind == server::ServerEvent::Kind::refusal);
  req.ns = 5;
  fx.transfers.register_cache(worker, RequestFrame(req), *fx.sink, {}, fx.now);
  auto f = fx.sink->frames();
  REQUIRE(f.size() == 1);
  CHECK_FALSE(f[0].first.is_error());
  CHECK(fx.transfers.registered(2));
  CHECK(fx.transfers.registration_status(2)->ns == 5);
  CHECK(fx.transfers.data_path_error(2).empty());
  fx.transfers.unregister(worker, RequestFrame(UnregisterKvCacheRequest{}), *fx.sink, fx.now);
  fx.transfers.unregister(worker, RequestFrame(UnregisterKvCacheRequest{}), *fx.sink, fx.now);
  CHECK(fx.sink->frames().size() == 2);
  CHECK_FALSE(fx.transfers.registered(2));
  CHECK(fx.transfers.registrations() == 0);
}

TEST_CASE("transfers: STORE without a registration is not_registered") {
  Fixture fx;
  auto worker = session(Role::worker, 2);
  fx.transfers.store(worker, RequestFrame(StoreRequest{}), *fx.sink, fx.now);
  CHECK(fx.only_error().code == to_wire(errc::not_registered));
  CHECK(fx.in_flight.drained());
}
