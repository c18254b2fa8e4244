// The server's request handling without sockets: frames in, frames out.
#include <doctest/doctest.h>

#include "kvlink/server/request_handler.hpp"

using namespace kvlink;
using namespace kvlink::wire;

namespace {

struct Collect final : server::ReplySink {
  Bytes out;
  int flushes = 0;
  Bytes& buffer() override { return out; }
  void flush() override { ++flushes; }
  std::weak_ptr<ReplySink> weak_self() override { return {}; }

  // Parses everything collected so far into frames (copying payloads).
  std::vector<std::pair<Header, Bytes>> frames() {
    FrameParser p;
    p.append(out);
    out.clear();
    std::vector<std::pair<Header, Bytes>> v;
    while (auto f = p.next()) v.emplace_back(f->header, Bytes(f->payload.begin(), f->payload.end()));
    REQUIRE_FALSE(p.failed());
    return v;
  }
};

struct Fixture {
  server::ServerConfig config;
  server::RequestHandler handler{config, 77};
  server::SessionState session;
  Collect sink;
  TimePoint now{};

  template <class M>
  bool send(std::uint64_t id, const M& m, std::uint16_t flags = 0) {
    Bytes bytes;
    FrameBuilder(bytes).add(static_cast<std::uint8_t>(M::opcode), flags, id, [&](Writer& w) { encode(w, m); });
    FrameParser p;
    p.append(bytes);
    auto f = p.next();
    REQUIRE(f);
    return handler.handle(session, *f, sink, now);
  }
  void hello() {
    HelloRequest h;
    h.instance_id = 5;
    REQUIRE(send(1, h));
    sink.out.clear();
  }
};

ErrorReply error_of(const std::pair<Header, Bytes>& f) {
  REQUIRE(f.first.is_error());
  ErrorReply e;
  REQUIRE_FALSE(decode(f.second, e, "error"));
  return e;
}

}  // namespace

TEST_CASE("HELLO answers with the boot id and limits") {
  Fixture fx;
  HelloRequest h;
  h.instance_id = 5;
  h.role = Role::worker;
  CHECK(fx.send(1, h));
  auto frames = fx.sink.frames();
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].first.is_response());
  CHECK(frames[0].first.id == 1);
  HelloReply r;
  REQUIRE_FALSE(decode(frames[0].second, r, "reply"));
  CHECK(r.boot_id == 77);
  CHECK(r.chunk_size == fx.config.chunk_size);
  CHECK(r.max_payload == fx.config.max_payload);
  CHECK(fx.session.hello_done);
  CHECK(fx.session.instance_id == 5);
}

TEST_CASE("requests before HELLO get a clear error and the connection stays") {
  Fixture fx;
  CHECK(fx.send(3, PingRequest{}));
  auto frames = fx.sink.frames();
  REQUIRE(frames.size() == 1);
  auto e = error_of(frames[0]);
  CHECK(e.code == static_cast<std::uint16_t>(errc::bad_request));
  CHECK(e.message.find("HELLO") != std::string::npos);
}

TEST_CASE("a HELLO of another protocol version is refused and closes") {
  Fixture fx;
  HelloRequest h;
  h.instance_id = 5;
  h.protocol_version = wire::protocol_version + 1;
  CHECK_FALSE(fx.send(1, h));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::version_mismatch));
}

TEST_CASE("PING after HELLO answers ok") {
  Fixture fx;
  fx.hello();
  CHECK(fx.send(9, PingRequest{}));
  auto frames = fx.sink.frames();
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].first.id == 9);
  CHECK_FALSE(frames[0].first.is_error());
  PingReply r;
  REQUIRE_FALSE(decode(frames[0].second, r, "reply"));
  CHECK(r.data_path_error.empty());  // nothing registered: nothing to move
}

TEST_CASE("an unknown opcode is answered with an error and the connection stays") {
  Fixture fx;
  fx.hello();
  Bytes bytes;
  FrameBuilder(bytes).add(200, 0, 4, [](Writer&) {});
  FrameParser p;
  p.append(bytes);
  CHECK(fx.handler.handle(fx.session, *p.next(), fx.sink, fx.now));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::unknown_opcode));
  CHECK(fx.handler.counters().unknown_opcodes == 1);
}

TEST_CASE("a malformed PING payload is a protocol error, counted") {
  Fixture fx;
  fx.hello();
  Bytes bytes;
  FrameBuilder(bytes).add(static_cast<std::uint8_t>(Opcode::ping), 0, 4, [](Writer& w) { w.num(std::uint32_t{1}); });
  FrameParser p;
  p.append(bytes);
  CHECK(fx.handler.handle(fx.session, *p.next(), fx.sink, fx.now));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::protocol_error));
  CHECK(e.message.find("trailing") != std::string::npos);
  CHECK(fx.handler.counters().protocol_errors == 1);
}

TEST_CASE("a client sending responses is disconnected") {
  Fixture fx;
  fx.hello();
  CHECK_FALSE(fx.send(4, PingRequest{}, flag::response));
}

TEST_CASE("STATS reports per-op counters") {
  Fixture fx;
  fx.hello();
  fx.send(2, PingRequest{});
  fx.send(3, PingRequest{});
  fx.sink.out.clear();
  fx.send(4, StatsRequest{});
  auto frames = fx.sink.frames();
  StatsReply s;
  REQUIRE_FALSE(decode(frames.at(0).second, s, "stats"));
  std::int64_t pings = -1;
  for (auto& e : s.entries)
    if (e.name == "op_ping_requests") pings = e.value;
  CHECK(pings == 2);
}

TEST_CASE("a repeated HELLO must name the same instance") {
  Fixture fx;
  fx.hello();  // instance 5
  HelloRequest again;
  again.instance_id = 5;
  CHECK(fx.send(2, again));
  CHECK_FALSE(fx.sink.frames().at(0).first.is_error());

  HelloRequest other;
  other.instance_id = 6;
  CHECK(fx.send(3, other));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::bad_request));
  CHECK(e.message.find("another instance id") != std::string::npos);
  CHECK(fx.session.instance_id == 5);
}

TEST_CASE("HELLO says whether the server holds a registration and whether it drains") {
  Fixture fx;
  HelloRequest h;
  h.instance_id = 5;
  h.role = Role::worker;
  CHECK(fx.send(1, h));
  HelloReply r;
  REQUIRE_FALSE(decode(fx.sink.frames().at(0).second, r, "reply"));
  CHECK(r.registered == 0);
  CHECK(r.draining == 0);
  fx.handler.begin_drain(fx.now, std::chrono::seconds(10));
  CHECK(fx.send(2, h));
  REQUIRE_FALSE(decode(fx.sink.frames().at(0).second, r, "reply"));
  CHECK(r.draining == 1);
}

TEST_CASE("a repeated HELLO must keep the connection's role") {
  Fixture fx;
  fx.hello();  // instance 5, scheduler
  HelloRequest again;
  again.instance_id = 5;
  again.role = Role::admin;
  CHECK(fx.send(2, again));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::bad_request));
  CHECK(e.message.find("HELLO as admin on a connection that said HELLO as scheduler") != std::string::npos);
  CHECK(fx.session.role == Role::scheduler);
}

TEST_CASE("a SERVER_NOTICE from a client is refused; a request with a reply sent one-way closes the connection") {
  Fixture fx;
  fx.hello();
  ServerNotice n;
  n.message = "I am not a server";
  CHECK(fx.send(6, n));
  auto e = error_of(fx.sink.frames().at(0));
  CHECK(e.code == static_cast<std::uint16_t>(errc::bad_request));
  CHECK(e.message.find("from servers to clients") != std::string::npos);
  CHECK(fx.send(7, PingRequest{}));
  CHECK_FALSE(fx.sink.frames().at(0).first.is_error());
  // One-way, no reply could reach it: the connection's error (id 0), closed.
  for (Opcode op : {Opcode::server_notice, Opcode::ping, Opcode::store}) {
    Fixture one;
    one.hello();
    Bytes bytes;
    FrameBuilder(bytes).add(static_cast<std::uint8_t>(op), flag::one_way, 8, [](Writer&) {});
    FrameParser p;
    p.append(bytes);
    CHECK_FALSE(one.handler.handle(one.session, *p.next(), one.sink, one.now));
    auto f = one.sink.frames();
    REQUIRE(f.size() == 1);
    CHECK(f[0].first.id == 0);
    CHECK(error_of(f[0]).message.find("was sent one-way, but it has a reply") != std::string::npos);
  }
  CHECK(one_way_allowed(Opcode::end_session));
  CHECK_FALSE(one_way_allowed(Opcode::lookup));
}

TEST_CASE("instance ids are bound to their first HELLO's secret: claims without it are refused") {
  Fixture fx;
  const std::string secret(16, 's'), other(16, 'o');
  // HELLO on a connection of its own; returns the error code (0: accepted)
  // and whether the connection stays open.
  auto hello_on = [&](server::SessionState& s, std::uint64_t id, const std::string& sec, Role role = Role::worker) {
    HelloRequest h;
    h.instance_id = id;
    h.role = role;
    h.instance_secret = sec;
    Bytes bytes;
    FrameBuilder(bytes).add(static_cast<std::uint8_t>(Opcode::hello), 0, 1, [&](Writer& w) { encode(w, h); });
    FrameParser p;
    p.append(bytes);
    const bool open = fx.handler.handle(s, *p.next(), fx.sink, fx.now);
    auto frames = fx.sink.frames();
    REQUIRE(frames.size() == 1);
    const std::uint16_t code = frames[0].first.is_error() ? error_of(frames[0]).code : 0;
    return std::pair{code, open};
  };
  const auto unauthorized = std::pair{static_cast<std::uint16_t>(errc::unauthorized), false};
  server::SessionState owner, spoof, again, admin;
  CHECK(hello_on(owner, 9, secret) == std::pair<std::uint16_t, bool>{0, true});
  // Without the secret, with another, or as a scheduler: refused and closed.
  CHECK(hello_on(spoof, 9, "") == unauthorized);
  CHECK(hello_on(spoof, 9, other) == unauthorized);
  CHECK(hello_on(spoof, 9, other, Role::scheduler) == unauthorized);
  CHECK_FALSE(spoof.hello_done);
  // The owner's second connection (or its reconnect) presents it: accepted.
  CHECK(hello_on(again, 9, secret) == std::pair<std::uint16_t, bool>{0, true});
  // Admins are not instances: nothing to claim.
  CHECK(hello_on(admin, 9, "", Role::admin).first == 0);
  // A short secret is a malformed HELLO.
  server::SessionState shorty;
  CHECK(hello_on(shorty, 10, "abc").first == static_cast<std::uint16_t>(errc::bad_request));
  // Once the instance is forgotten (its connections closed, nothing
  // registered), the id is free again.
  fx.handler.on_session_end(owner, fx.now);
  fx.handler.on_session_end(again, fx.now);
  server::SessionState later;
  CHECK(hello_on(later, 9, other) == std::pair<std::uint16_t, bool>{0, true});
  StatsRequest stats;
  fx.session = std::move(later);
  REQUIRE(fx.send(2, stats));
  StatsReply s;
  REQUIRE_FALSE(decode(fx.sink.frames().at(0).second, s, "stats"));
  std::int64_t refused = -1;
  for (auto& e : s.entries)
    if (e.name == "instance_claims_refused") refused = e.value;
  CHECK(refused == 3);
}
