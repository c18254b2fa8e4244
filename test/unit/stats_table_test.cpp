// StatsTable: STATS' rows, read in order each time.
#include <doctest/doctest.h>

#include "kvlink/server/stats_table.hpp"

using namespace kvlink;

TEST_CASE("stats table: rows are read now, in the order added") {
  std::uint64_t hits = 1, misses = 2;
  server::StatsTable t;
  t.add("hits", [&] { return hits; }).add("misses", [&] { return misses; });
  CHECK(t.size() == 2);
  auto r = t.read();
  REQUIRE(r.size() == 2);
  CHECK(r[0].name == "hits");
  CHECK(r[0].value == 1);
  CHECK(r[1].name == "misses");
  CHECK(r[1].value == 2);
  hits = 40;
  CHECK(t.read()[0].value == 40);  // read when asked, not when added
}

TEST_CASE("stats table: per-opcode names are lowercase") {
  CHECK(server::opcode_stat_name(static_cast<std::uint8_t>(wire::Opcode::sync_lookup), "requests") ==
        "op_sync_lookup_requests");
  CHECK(server::opcode_stat_name(static_cast<std::uint8_t>(wire::Opcode::store), "errors") == "op_store_errors");
}
