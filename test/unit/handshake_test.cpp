// Handshake on its own: HELLO, instance records, connections closing and
// reaping, with fake time and the other parts of the server as hooks.
#include <doctest/doctest.h>

#include <set>

#include "collect_sink.hpp"
#include "kvlink/server/handshake.hpp"
#include "request_frame.hpp"

using namespace kvlink;
using namespace kvlink::wire;
using namespace std::chrono_literals;
using test::RequestFrame;

namespace {

struct Fixture {
  server::ServerConfig config = [] {
    server::ServerConfig c;
    c.max_instances = 2;
    return c;
  }();
  server::ServerCounters counters;
  server::Reporter reporter{counters};
  server::LivenessRegistry liveness{{120s, 1h}};
  server::InFlight in_flight;
  std::set<std::uint64_t> registered;
  std::vector<std::uint64_t> released, dropped;
  bool draining = false;
  server::Handshake handshake{config, {77, 5}, liveness, reporter, in_flight,
                              {.registered = [this](std::uint64_t id) { return registered.contains(id); },
                               .drop_registration = [this](std::uint64_t id) { dropped.push_back(id); },
                               .release_scheduler_state = [this](std::uint64_t id) { released.push_back(id); },
                               .draining = [this] { return draining; }}};
  std::shared_ptr<test::CollectSink> sink = std::make_shared<test::CollectSink>();
  TimePoint now{};

  // Sends HELLO; returns the reply's frames and whether the connection goes on.
  bool hello(server::SessionState& s, std::uint64_t id, Role role = Role::scheduler, std::string secret = {}) {
    HelloRequest h;
    h.instance_id = id;
    h.role = role;
    h.client_name = "test";
    h.instance_secret = std::move(secret);
    return handshake.hello(s, RequestFrame(h), *sink, now);
  }
  HelloReply hello_reply() { return sink->only_reply<HelloReply>(); }
  ErrorReply error_reply() { return sink->only_error(); }
};

}  // namespace

TEST_CASE("handshake: HELLO says who the server is, whether the instance is registered, and whether it drains") {
  Fixture fx;
  server::SessionState s;
  fx.registered.insert(1);
  fx.draining = true;
  REQUIRE(fx.hello(s, 1, Role::worker));
  const HelloReply r = fx.hello_reply();
  CHECK(r.boot_id == 77);
  CHECK(r.capabilities == 5);
  CHECK(r.registered == 1);
  CHECK(r.draining == 1);
  CHECK(s.hello_done);
  CHECK(s.counted);
  CHECK(fx.liveness.known(1));
  CHECK(fx.liveness.holds_registration(1));
  REQUIRE(fx.reporter.events().events().size() == 1);
  CHECK(fx.reporter.events().events()[0].kind == server::ServerEvent::Kind::connect);
  CHECK(fx.reporter.events().events()[0].text.find("its KV-cache registration was kept") != std::string::npos);
  const auto instances = fx.handshake.instances(fx.now + 3s);
  REQUIRE(instances.size() == 1);
  CHECK(instances[0].connections == 1);
  CHECK(instances[0].since_seen == 3s);
}

TEST_CASE("handshake: another client's id and more than --max-instances are refused") {
  Fixture fx;
  server::SessionState a, thief, b, c;
  const std::string secret(16, 'x');
  REQUIRE(fx.hello(a, 1, Role::scheduler, secret));
  fx.sink->frames();
  CHECK_FALSE(fx.hello(thief, 1, Role::scheduler, std::string(16, 'y')));
  CHECK(fx.error_reply().code == to_wire(errc::unauthorized));
  CHECK(fx.counters.instance_claims_refused == 1);
  REQUIRE(fx.hello(b, 2));
  fx.sink->frames();
  CHECK_FALSE(fx.hello(c, 3));
  const ErrorReply e = fx.error_reply();
  CHECK(e.code == to_wire(errc::limit_exceeded));
  CHECK(e.message.find("--max-instances") != std::string::npos);
  CHECK(fx.counters.instances_refused == 1);
  // An admin takes no instance slot.
  server::SessionState admin;
  CHECK(fx.hello(admin, 4, Role::admin));
  CHECK_FALSE(fx.liveness.known(4));
}

TEST_CASE("handshake: the last connection takes the scheduler state; an unregistered instance is forgotten") {
  Fixture fx;
  server::SessionState s1, s2, w;
  REQUIRE(fx.hello(s1, 1));
  REQUIRE(fx.hello(s2, 1));
  fx.registered.insert(2);
  REQUIRE(fx.hello(w, 2, Role::worker));
  fx.liveness.registered(2, fx.now);
  fx.handshake.connection_closed(s1, fx.now);
  CHECK(fx.released.empty());  // s2 remains
  fx.handshake.connection_closed(s2, fx.now);
  CHECK(fx.released == std::vector<std::uint64_t>{1});
  CHECK_FALSE(fx.liveness.known(1));
  fx.handshake.connection_closed(w, fx.now);
  CHECK(fx.released == std::vector<std::uint64_t>{1, 2});
  CHECK(fx.liveness.known(2));  // kept for its registration
  CHECK(fx.dropped.empty());
  CHECK(fx.handshake.instances(fx.now).size() == 1);
  fx.handshake.connection_closed(w, fx.now);  // counted once
  CHECK(fx.released.size() == 2);
}

TEST_CASE("handshake: reaping with fake time drops the instance, its scheduler state and its registration") {
  Fixture fx;
  server::SessionState s;
  REQUIRE(fx.hello(s, 1));
  auto conn = std::make_shared<std::uint32_t>(0);
  (void)fx.in_flight.start(conn, 1);
  fx.handshake.reap(fx.now + 120s);
  CHECK(fx.released.empty());
  fx.handshake.reap(fx.now + 121s);
  CHECK(fx.released == std::vector<std::uint64_t>{1});
  CHECK(fx.dropped == std::vector<std::uint64_t>{1});
  CHECK(fx.in_flight.of_instance(1) == 0);
  CHECK(fx.handshake.instances(fx.now).empty());
  const auto& events = fx.reporter.events().events();
  REQUIRE(events.size() == 2);
  CHECK(events[1].kind == server::ServerEvent::Kind::reap);
  CHECK(events[1].at == fx.now + 121s);
  // The reaped instance's connection closing: no instance, so its
  // registration made since goes too.
  fx.handshake.connection_closed(s, fx.now + 122s);
  CHECK(fx.released == std::vector<std::uint64_t>{1, 1});
  CHECK(fx.dropped == std::vector<std::uint64_t>{1, 1});
}

TEST_CASE("handshake: an admin's end releases its lookups' state unless an instance of that id is connected") {
  Fixture fx;
  server::SessionState admin, sched;
  REQUIRE(fx.hello(admin, 9, Role::admin));
  fx.handshake.connection_closed(admin, fx.now);
  CHECK(fx.released == std::vector<std::uint64_t>{9});
  REQUIRE(fx.hello(sched, 9));
  fx.handshake.connection_closed(admin, fx.now);
  CHECK(fx.released.size() == 1);
}

TEST_CASE("constant_time_equal") {
  CHECK(server::constant_time_equal("abc", "abc"));
  CHECK_FALSE(server::constant_time_equal("abc", "abd"));
  CHECK_FALSE(server::constant_time_equal("abc", "ab"));
  CHECK(server::constant_time_equal("", ""));
}
