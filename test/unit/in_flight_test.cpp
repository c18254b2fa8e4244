// InFlight: transfers counted per connection, per instance and server-wide.
#include <doctest/doctest.h>

#include "kvlink/server/in_flight.hpp"

using kvlink::server::InFlight;

TEST_CASE("in flight: counted per connection, per instance and in all; drained at zero") {
  InFlight f;
  auto a = std::make_shared<std::uint32_t>(0), b = std::make_shared<std::uint32_t>(0);
  CHECK(f.drained());
  const auto t1 = f.start(a, 7), t2 = f.start(a, 7), t3 = f.start(b, 8);
  CHECK(*a == 2);
  CHECK(*b == 1);
  CHECK(f.of_instance(7) == 2);
  CHECK(f.of_instance(8) == 1);
  CHECK(f.of_instance(9) == 0);
  CHECK(f.total() == 3);
  CHECK_FALSE(f.drained());
  InFlight::end(&f, t1);
  InFlight::end(&f, t3);
  CHECK(*a == 1);
  CHECK(*b == 0);
  CHECK(f.of_instance(7) == 1);
  CHECK(f.of_instance(8) == 0);
  InFlight::end(&f, t2);
  CHECK(f.drained());
  CHECK(*a == 0);
}

TEST_CASE("in flight: a forgotten instance counts nothing more; a completion after the tracker still frees the connection") {
  InFlight f;
  auto conn = std::make_shared<std::uint32_t>(0);
  const auto old = f.start(conn, 7);
  f.forget(7);  // reaped while its copy ran
  CHECK(f.of_instance(7) == 0);
  const auto fresh = f.start(conn, 7);  // the instance came back
  CHECK(f.of_instance(7) == 1);
  CHECK(f.total() == 2);
  InFlight::end(&f, old);
  CHECK(f.total() == 1);
  InFlight::end(nullptr, fresh);  // the tracker is gone: only the connection's count drops
  CHECK(*conn == 0);
  CHECK(f.total() == 1);
}
