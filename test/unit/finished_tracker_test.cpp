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

TEST_CASE("tracker: each id is reported at most once, even when the engine repeats it") {
  GetFinishedTracker t;
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a", "a"}).stores == Ids{"a"});
  CHECK(step(t, {"a"}).stores.empty());
  // A later store under the same id is never reported again.
  t.store_done(t.store_started("a"));
  CHECK(step(t, {"a"}).stores.empty());
  // Retrieves likewise.
  t.retrieve_done(t.retrieve_started("r", Blocks{1}), true);
  CHECK(step(t).retrieves == Ids{"r"});
  t.retrieve_done(t.retrieve_started("r", Blocks{1}), true);
  CHECK(step(t, {"r"}).retrieves.empty());
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

TEST_CASE("tracker: memory stays bounded; repeats within the remembered window are still blocked") {
  GetFinishedTracker t(2);
  auto finish = [&](const std::string& id) {
    t.store_done(t.store_started(id));
    return step(t, {id}).stores;
  };
  CHECK(finish("a") == Ids{"a"});
  CHECK(t.live_requests() == 0);
  CHECK(t.retired_ids() == 1);
  CHECK(finish("a").empty());  // repeated while remembered: not reported again
  CHECK(finish("b") == Ids{"b"});
  CHECK(finish("c") == Ids{"c"});  // "a" falls out of the window
  for (int i = 0; i < 100; ++i) finish("r" + std::to_string(i));
  CHECK(t.retired_ids() == 2);
  CHECK(t.live_requests() == 0);
  CHECK(finish("a") == Ids{"a"});  // long forgotten: a new request
  // A retrieve-only request retires too once the engine finished it.
  t.retrieve_done(t.retrieve_started("x", Blocks{7}), true);
  CHECK(step(t, {"x"}).retrieves == Ids{"x"});
  CHECK(t.live_requests() == 0);
  t.retrieve_done(t.retrieve_started("x", Blocks{7}), true);
  CHECK(step(t, {"x"}).retrieves.empty());
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
