// The server-wide bound on buffered inbound bytes (--max-inbound-bytes),
// without sockets: what the frames still arriving may hold, which frame is
// refused, and that claims come back.
#include <doctest/doctest.h>

#include "kvlink/server/inbound_budget.hpp"

using namespace kvlink::server;

namespace {
constexpr std::uint32_t MiB = 1u << 20;
}

TEST_CASE("inbound budget: frames still arriving share the limit; the one that would pass it is refused") {
  InboundBudget budget(10 * MiB);
  InboundBudget::Claim a, b, c;
  CHECK_FALSE(budget.hold(a, 6 * MiB));
  CHECK(budget.held() == 6 * MiB);
  // The same frame, reported again on each read, holds no more.
  CHECK_FALSE(budget.hold(a, 6 * MiB));
  CHECK(budget.held() == 6 * MiB);
  const kvlink::Error err = budget.hold(b, 5 * MiB);
  CHECK(err == kvlink::errc::limit_exceeded);
  const std::string& why = err.detail();
  CHECK(why.find("--max-inbound-bytes") != std::string::npos);
  CHECK(why.find(std::to_string(5 * MiB)) != std::string::npos);   // the frame
  CHECK(why.find(std::to_string(10 * MiB)) != std::string::npos);  // the limit
  CHECK(b.bytes == 0);  // a refusal holds nothing
  CHECK(budget.held() == 6 * MiB);
  // Up to the limit exactly is fine.
  CHECK_FALSE(budget.hold(c, 4 * MiB));
  CHECK(budget.held() == 10 * MiB);
  // `a`'s frame completed; the next one on its connection is small.
  CHECK_FALSE(budget.hold(a, 0));
  CHECK(budget.held() == 4 * MiB);
  CHECK_FALSE(budget.hold(b, 5 * MiB));
  CHECK(budget.held() == 9 * MiB);
  budget.release(b);
  budget.release(c);
  budget.release(a);
  CHECK(budget.held() == 0);
  CHECK(b.bytes == 0);
  budget.release(b);  // twice is harmless
  CHECK(budget.held() == 0);
}

TEST_CASE("inbound budget: small frames are always admitted, and a connection's next frame replaces its claim") {
  InboundBudget budget(1 * MiB);
  InboundBudget::Claim big, small;
  CHECK_FALSE(budget.hold(big, 1 * MiB));
  // The budget is full, yet an ordinary request split across reads goes on.
  CHECK_FALSE(budget.hold(small, InboundBudget::small_payload));
  CHECK(budget.held() == 1 * MiB + InboundBudget::small_payload);
  CHECK(budget.hold(small, InboundBudget::small_payload + 1) == kvlink::errc::limit_exceeded);
  CHECK(small.bytes == InboundBudget::small_payload);
  // A connection's claim is its current frame: a larger next frame needs
  // room for itself only, not on top of the one that completed.
  CHECK_FALSE(budget.hold(small, 0));
  CHECK_FALSE(budget.hold(big, 1 * MiB - 1));  // smaller: always fine
  CHECK(budget.held() == 1 * MiB - 1);
  CHECK_FALSE(budget.hold(big, 1 * MiB));
  CHECK(budget.hold(big, 1 * MiB + 1) == kvlink::errc::limit_exceeded);
  CHECK(budget.held() == 1 * MiB);
}

TEST_CASE("inbound limit: 4 x --max-payload by default; below --max-payload it is refused") {
  ServerConfig c;
  CHECK(inbound_limit(c) == 4 * std::uint64_t{c.max_payload});
  CHECK(inbound_limit(c) == 256u * MiB);
  CHECK_FALSE(check_inbound(c));
  c.max_payload = 1 << 30;
  CHECK(inbound_limit(c) == 4ull << 30);
  c.max_inbound_bytes = 512 * MiB;
  CHECK(inbound_limit(c) == 512 * MiB);
  const std::string why = check_inbound(c).message();
  CHECK(why.find("--max-inbound-bytes") != std::string::npos);
  CHECK(why.find("--max-payload") != std::string::npos);
  c.max_inbound_bytes = c.max_payload;
  CHECK_FALSE(check_inbound(c));
}
