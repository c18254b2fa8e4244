// get_finished bookkeeping (SPEC section 7) as pure logic.
#include <doctest/doctest.h>

#include "kvlink/adapter/finished_tracker.hpp"

using kvlink::adapter::GetFinishedTracker;
using Ids = std::vector<std::string>;
using Blocks = std::vector<std::uint32_t>;

namespace {
using namespace std::chrono_literals;
using kvlink::TimePoint;
const TimePoint t0 = TimePoint{} + 1000s;  // fake time

GetFinishedTracker::Finished step(GetFinishedTracker& t, Ids engine = {}, bool unhealthy = false,
                                  kvlink::adapter::LinkNow now = {t0, 0}) {
  return t.get_finished(engine, unhealthy, now);
}
}  // namespace

TEST_CASE("tracker: a store is finished only after both the server and the engine finished it") {
  GetFinishedTracker t;
  auto s = t.store_started("a");
  CHECK(step(t, {"a"}).stores.empty());  // engine done, server not
  t.store_done(s);
  CHECK(step(t).stores == Ids{"a"});  // the engine's earlier report is remembered

  auto s2 = t.store_started("b");
  t.store_done(s2);
  CHECK(step(t).stores.empty());  // server done, engine not
  CHECK(step(t, {"b"}).stores == Ids{"b"});
}

TEST_CASE("tracker: every store of a request must finish") {
  GetFinishedTracker t;
  auto s1 = t.store_started("a");
  auto s2 = t.store_started("a");
  t.store_done(s1);
  CHECK(step(t, {"a"}).stores.empty());
  t.store_done(s2);
  CHECK(step(t).stores == Ids{"a"});
}

TEST_CASE("tracker: a repeated engine report is reported once; a new transfer of the id is reported again") {
  GetFinishedTracker t;
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a", "a"}).stores == Ids{"a"});
  CHECK(step(t, {"a"}).stores.empty());  // the engine repeats it: no new transfer, no report
  // A later store under the same id is a new round: reported again once the
  // engine reports the id again.
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a"}).stores == Ids{"a"});
  // Retrieves likewise.
  t.retrieve_done(t.retrieve_started("r", Blocks{1}), true);
  CHECK(step(t).retrieves == Ids{"r"});
  CHECK(step(t, {"r"}).retrieves.empty());
  t.retrieve_done(t.retrieve_started("r", Blocks{1}), true);
  CHECK(step(t, {"r"}).retrieves == Ids{"r"});
  CHECK(t.take_load_errors().empty());
}

TEST_CASE("tracker: engine ids with no transfers are ignored") {
  GetFinishedTracker t;
  auto f = step(t, {"x", "y"});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
}

TEST_CASE("tracker: retrieves finish without the engine; failures become load errors") {
  GetFinishedTracker t;
  auto ok = t.retrieve_started("a", Blocks{1, 2});
  auto bad = t.retrieve_started("b", Blocks{7, 3});
  CHECK(step(t).retrieves.empty());
  t.retrieve_done(ok, true);
  t.retrieve_done(bad, false);
  auto f = step(t);
  CHECK(f.retrieves == Ids{"a", "b"});
  CHECK(t.load_errors().size() == 2);
  CHECK(t.take_load_errors() == Blocks{3, 7});
  CHECK(t.take_load_errors().empty());  // reported once
}

TEST_CASE("tracker: unhealthy drain finishes every pending store and fails every pending retrieve") {
  GetFinishedTracker t;
  auto s = t.store_started("s");
  auto s_unfinished = t.store_started("s2");
  auto r = t.retrieve_started("r", Blocks{4, 5});
  auto f = step(t, {"s"}, true);
  CHECK(f.stores == Ids{"s"});
  CHECK(f.retrieves == Ids{"r"});
  CHECK(t.take_load_errors() == Blocks{4, 5});
  CHECK(t.pending_stores() == 0);
  CHECK(t.pending_retrieves() == 0);
  // s2 counts as finished by the server: reported once the engine finishes it.
  CHECK(step(t, {"s2"}).stores == Ids{"s2"});
  // Late server completions of drained operations change nothing.
  t.store_done(s);
  t.store_done(s_unfinished);
  t.retrieve_done(r, true);
  f = step(t, {"s", "s2", "r"});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
  CHECK(t.take_load_errors().empty());
}

TEST_CASE("tracker: a request drained as a finished retrieve is not also a finished store") {
  GetFinishedTracker t;
  t.store_started("a");
  t.retrieve_started("a", Blocks{9});
  auto f = step(t, {"a"}, true);
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores.empty());
  CHECK(step(t, {"a"}).stores.empty());  // not later either
  CHECK(t.take_load_errors() == Blocks{9});
}

TEST_CASE("tracker: healthy steps report a request in both directions when both finished") {
  GetFinishedTracker t;
  t.retrieve_done(t.retrieve_started("a", Blocks{1}), true);
  CHECK(step(t).retrieves == Ids{"a"});
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a"}).stores == Ids{"a"});
}

TEST_CASE("tracker: forget drops an id's records") {
  GetFinishedTracker t;
  auto s = t.store_started("a");
  t.forget("a");
  t.store_done(s);
  CHECK(step(t, {"a"}).stores.empty());
  CHECK(t.pending_stores() == 0);
}

TEST_CASE("tracker: memory stays bounded over 100k ids and over 100k rounds of one id") {
  GetFinishedTracker t;
  for (int i = 0; i < 100'000; ++i) {
    const std::string id = "req-" + std::to_string(i);
    t.retrieve_done(t.retrieve_started(id, Blocks{1}), true);
    t.store_done(t.store_started(id));
    auto f = step(t, {id});
    REQUIRE(f.retrieves == Ids{id});
    REQUIRE(f.stores == Ids{id});
    // A retrieve-only request holds nothing once reported, engine report or not.
    t.retrieve_done(t.retrieve_started(id + "-load", Blocks{2}), true);
    REQUIRE(step(t).retrieves == Ids{id + "-load"});
  }
  CHECK(t.live_requests() == 0);
  CHECK(t.pending_stores() == 0);
  CHECK(t.pending_retrieves() == 0);
  for (int i = 0; i < 100'000; ++i) {
    t.retrieve_done(t.retrieve_started("r", Blocks{3}), true);
    REQUIRE(step(t).retrieves == Ids{"r"});
    t.store_done(t.store_started("r"));
    REQUIRE(step(t, {"r"}).stores == Ids{"r"});
  }
  CHECK(t.live_requests() == 0);
  // Only what is open stays: a store the engine has not finished.
  t.store_done(t.store_started("open"));
  CHECK(step(t).stores.empty());
  CHECK(t.live_requests() == 1);
  CHECK(step(t, {"open"}).stores == Ids{"open"});
  CHECK(t.live_requests() == 0);
}

TEST_CASE("tracker: an unanswered transfer is finished only after its fence") {
  GetFinishedTracker t;
  const kvlink::adapter::SentTransfer sent{t0 + 5s, 7};
  auto s = t.store_started("s", sent);
  auto r = t.retrieve_started("r", Blocks{3, 4}, sent);
  t.store_unanswered(s);  // e.g. the connection was lost: the server may still copy
  t.retrieve_unanswered(r);
  auto f = step(t, {"s", "r"});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
  CHECK(t.take_load_errors().empty());  // the engine must not recompute into them yet
  // A degraded link drains what is safe only: these are not.
  f = step(t, {}, true, {t0 + 4s, 0});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
  // Once the fence passed, they end: the store finished, the retrieve failed.
  f = step(t, {}, false, {t0 + 5s, 7});
  CHECK(f.stores == Ids{"s"});
  CHECK(f.retrieves == Ids{"r"});
  CHECK(t.take_load_errors() == Blocks{3, 4});
}

TEST_CASE("tracker: a restarted server (new boot id) cannot touch old transfers") {
  GetFinishedTracker t;
  auto s = t.store_started("s", {t0 + 30s, 7});
  auto r = t.retrieve_started("r", Blocks{9}, {t0 + 30s, 7});
  t.store_unanswered(s);
  t.retrieve_unanswered(r);
  CHECK(step(t, {"s"}, false, {t0, 7}).stores.empty());  // same server: maybe stopped, not dead
  CHECK(step(t, {}, false, {t0, 0}).stores.empty());     // no server known: still unsafe
  auto f = step(t, {}, false, {t0, 8});                  // another process answers now
  CHECK(f.stores == Ids{"s"});
  CHECK(f.retrieves == Ids{"r"});
  CHECK(t.take_load_errors() == Blocks{9});
}

TEST_CASE("tracker: a drain takes in-flight transfers whose fence passed, and keeps the others") {
  GetFinishedTracker t;
  t.store_started("early", {t0 - 1s, 7});
  t.store_started("late", {t0 + 1s, 7});
  auto f = step(t, {"early", "late"}, true);
  CHECK(f.stores == Ids{"early"});
  CHECK(t.pending_stores() == 1);
  f = step(t, {}, true, {t0 + 1s, 0});
  CHECK(f.stores == Ids{"late"});
}

TEST_CASE("tracker: an answered transfer is finished at once, fence or not") {
  GetFinishedTracker t;
  auto s = t.store_started("s", {t0 + 60s, 7});
  auto r = t.retrieve_started("r", Blocks{1}, {t0 + 60s, 7});
  t.store_done(s);          // the server replied (even with an error)
  t.retrieve_done(r, false);
  auto f = step(t, {"s"});
  CHECK(f.stores == Ids{"s"});
  CHECK(f.retrieves == Ids{"r"});
  CHECK(t.take_load_errors() == Blocks{1});
}

TEST_CASE("tracker: a request's stores wait for its pending retrieves (the engine frees its blocks on the report)") {
  GetFinishedTracker t;
  auto r = t.retrieve_started("a", Blocks{1, 2}, {t0 + 5s, 7});
  t.retrieve_unanswered(r);  // lost connection: the server may still write blocks 1 and 2
  t.store_done(t.store_started("a"));  // degraded: not sent
  CHECK(step(t, {"a"}).stores.empty());
  auto f = step(t, {}, false, {t0 + 5s, 7});
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores == Ids{"a"});
}

// vLLM reschedules a preempted request under its id and loads it again; the
// engine waits for a finished retrieve of each load.
TEST_CASE("tracker: vLLM preemption: a request loaded again under its id is reported again") {
  GetFinishedTracker t;
  auto r1 = t.retrieve_started("r", Blocks{1, 2});
  CHECK(step(t).retrieves.empty());
  t.retrieve_done(r1, true);
  CHECK(step(t).retrieves == Ids{"r"});
  CHECK(step(t).retrieves.empty());  // reported once
  // Preempted (no engine report), then scheduled again: a second load.
  auto r2 = t.retrieve_started("r", Blocks{5, 6});
  CHECK(step(t).retrieves.empty());  // not before it is done
  t.retrieve_done(r2, true);
  CHECK(step(t).retrieves == Ids{"r"});
  CHECK(step(t).retrieves.empty());
  // A third load that fails: reported again, its blocks are load errors.
  t.retrieve_done(t.retrieve_started("r", Blocks{8}), false);
  CHECK(step(t).retrieves == Ids{"r"});
  CHECK(t.take_load_errors() == Blocks{8});
  // Every retrieve of a round must finish.
  auto a = t.retrieve_started("r", Blocks{10});
  auto b = t.retrieve_started("r", Blocks{11});
  t.retrieve_done(a, true);
  CHECK(step(t).retrieves.empty());
  t.retrieve_done(b, true);
  CHECK(step(t).retrieves == Ids{"r"});
  // The request finishes, with stores from both lives.
  t.store_done(t.store_started("r"));
  CHECK(step(t, {"r"}).stores == Ids{"r"});
  CHECK(t.live_requests() == 0);
}

TEST_CASE("tracker: a request that stores again under its id is reported again after the engine finishes it again") {
  GetFinishedTracker t;
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a"}).stores == Ids{"a"});
  // Resumed under the same id: stores again.
  auto s = t.store_started("a");
  CHECK(step(t).stores.empty());
  t.store_done(s);
  CHECK(step(t).stores.empty());  // the engine has not finished this round
  CHECK(step(t, {"a"}).stores == Ids{"a"});
  CHECK(step(t, {"a"}).stores.empty());
  // The engine's report may come first; the store is reported when done.
  s = t.store_started("a");
  CHECK(step(t, {"a"}).stores.empty());
  t.store_done(s);
  CHECK(step(t).stores == Ids{"a"});
}

TEST_CASE("tracker: an engine repeating a finished id with no new transfer gets no second report") {
  GetFinishedTracker t;
  t.retrieve_done(t.retrieve_started("a", Blocks{1}), true);
  t.store_done(t.store_started("a"));
  auto f = step(t, {"a", "a"});
  CHECK(f.stores == Ids{"a"});
  CHECK(f.retrieves == Ids{"a"});
  for (int i = 0; i < 3; ++i) {
    f = step(t, {"a"});
    CHECK(f.stores.empty());
    CHECK(f.retrieves.empty());
  }
  // A repeat that comes while only a new load of the id is open finishes
  // nothing: a store started after it waits for the engine's next report.
  auto r = t.retrieve_started("a", Blocks{2});
  CHECK(step(t, {"a"}).stores.empty());
  auto s = t.store_started("a");
  t.retrieve_done(r, true);
  t.store_done(s);
  f = step(t, {});
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores.empty());
  CHECK(step(t, {"a"}).stores == Ids{"a"});
  CHECK(t.take_load_errors().empty());
}

TEST_CASE("tracker: a store started after the engine's report waits for a new report") {
  GetFinishedTracker t;
  auto s1 = t.store_started("a");
  CHECK(step(t, {"a"}).stores.empty());  // the report covers s1
  auto s2 = t.store_started("a");        // the id's next life, before s1 was reported
  t.store_done(s1);
  t.store_done(s2);
  CHECK(step(t).stores.empty());
  CHECK(step(t, {"a"}).stores == Ids{"a"});  // once, for both
  CHECK(step(t, {"a"}).stores.empty());
}

TEST_CASE("tracker: a drain during a second round") {
  GetFinishedTracker t;
  // Round one, healthy.
  t.retrieve_done(t.retrieve_started("a", Blocks{1}), true);
  t.store_done(t.store_started("a"));
  auto f = step(t, {"a"});
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores == Ids{"a"});
  // Round two in flight when the link degrades: the retrieve is reported
  // (failed) and the store round ends with it, unreported.
  t.retrieve_started("a", Blocks{4, 5});
  t.store_started("a");
  t.store_started("b");
  t.store_done(t.store_started("b"));
  f = step(t, {"a", "b"}, true);
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores == Ids{"b"});
  CHECK(t.take_load_errors() == Blocks{4, 5});
  CHECK(t.pending_stores() == 0);
  CHECK(t.pending_retrieves() == 0);
  f = step(t, {"a", "b"});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
  CHECK(t.live_requests() == 0);
  // A drained store round of an id not reported as a retrieve waits for the
  // engine, as in round one.
  t.store_started("a");
  CHECK(step(t, {}, true).stores.empty());
  CHECK(step(t, {"a"}, true).stores == Ids{"a"});
  // Round four, healthy again: reported as usual.
  t.retrieve_done(t.retrieve_started("a", Blocks{7}), true);
  t.store_done(t.store_started("a"));
  f = step(t, {"a"});
  CHECK(f.retrieves == Ids{"a"});
  CHECK(f.stores == Ids{"a"});
  CHECK(t.take_load_errors().empty());
}

TEST_CASE("tracker: forget during a second round drops only that round") {
  GetFinishedTracker t;
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a"}).stores == Ids{"a"});
  auto s = t.store_started("a");
  auto r = t.retrieve_started("a", Blocks{3});
  t.forget("a");
  t.store_done(s);
  t.retrieve_done(r, false);
  auto f = step(t, {"a"});
  CHECK(f.stores.empty());
  CHECK(f.retrieves.empty());
  CHECK(t.take_load_errors().empty());
  CHECK(t.live_requests() == 0);
  t.store_done(t.store_started("a"));  // a later life is tracked afresh
  CHECK(step(t, {"a"}).stores == Ids{"a"});
}
