// The engine-side adapters against the real kvlink-server: lookups after
// stores, get_finished bookkeeping, degraded mode after SIGKILL/SIGSTOP,
// automatic re-registration after a restart. The adapters run on a Runtime
// (their own io thread); the test thread plays the engine and uses the
// blocking calls, as a non-coroutine engine would. These check protocol
// and bookkeeping; byte-exact data through the CPU engine is e2e_test's.
#include <doctest/doctest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <asio/post.hpp>
#include <fstream>
#include <future>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/unique_fd.hpp"
#include "adapter_fixture.hpp"
#include "server_process.hpp"
#include "test_support.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;
using kvlink::test::ServerProcess;
using kvlink::test::TempDir;
using kvlink::test::eventually;

namespace {

using Fixture = test::AdapterFixture;
using test::block;
using test::blocks;
using test::chunk;
using test::config_for;
using test::kv_memfd;
using test::layout;
using test::prompt;

void stop_server(ServerProcess& server) {
  server.stop();
  REQUIRE(eventually([&] { return test::process_stopped(server.pid()); }, 5s));
}

// Every health event of both adapters, recorded on their executor.
struct Events {
  std::mutex m;
  std::vector<std::pair<std::string, health::Event>> all;  // (adapter, event)
  int count(const std::string& who, const std::string& to) {
    std::lock_guard lock(m);
    return static_cast<int>(std::count_if(all.begin(), all.end(), [&](const auto& e) {
      return e.first == who && e.second.kind == health::Event::Kind::transition &&
             health::state_name(e.second.transition.to) == to;
    }));
  }
  int notices(const std::string& who, const std::string& text) {
    std::lock_guard lock(m);
    return static_cast<int>(std::count_if(all.begin(), all.end(), [&](const auto& e) {
      return e.first == who && e.second.kind == health::Event::Kind::notice &&
             e.second.notice.find(text) != std::string::npos;
    }));
  }
};
std::shared_ptr<Events> record_events(Fixture& f) {
  auto ev = std::make_shared<Events>();
  auto attach = [&](health::Monitor& m, std::string who) {
    std::promise<void> done;
    asio::post(f.rt.executor(), [&, who] {
      m.on_event([ev, who](const health::Event& e) {
        std::lock_guard lock(ev->m);
        ev->all.emplace_back(who, e);
      });
      done.set_value();
    });
    done.get_future().wait();
  };
  attach(f.worker->monitor(), "worker");
  attach(f.scheduler->monitor(), "scheduler");
  return ev;
}

// An engine written with coroutines: a free coroutine, state as parameters.
asio::awaitable<std::uint32_t> awaited_lookup(std::shared_ptr<SchedulerAdapter> s, std::vector<store::Token> tokens) {
  co_await s->async_submit_lookup("co", std::move(tokens), asio::use_awaitable);
  auto st = co_await s->async_check_lookup("co", asio::use_awaitable);
  co_return st.ready ? st.matched_tokens : 999999;
}

}  // namespace

TEST_CASE("adapter: store, then sync and two-phase lookups; get_finished bookkeeping") {
  for (auto mode : {LookupMode::sync, LookupMode::two_phase}) {
    CAPTURE(static_cast<int>(mode));
    Fixture f;
    f.server.start();
    f.make(mode);
    CHECK(!f.worker->monitor().gate().is_open());
    auto reg = f.worker->register_kv_caches(layout(), f.kv.get());
    REQUIRE_MESSAGE(reg, reg.error().message());
    CHECK(f.worker->monitor().gate().is_open());  // opens on the register ack
    CHECK(f.stat("registrations") == 1);

    const auto tokens = prompt(4 * chunk + 5);  // 4 full chunks and a tail
    auto st = f.worker->submit_store(f.spec("req-1", tokens));
    REQUIRE_MESSAGE(st, st.error().message());
    CHECK(st->stored_chunks == 4);
    auto fin = f.worker->get_finished({});
    REQUIRE(fin);
    CHECK(fin->stores.empty());  // the engine has not finished req-1
    fin = f.worker->get_finished({"req-1", "req-1"});
    CHECK(fin->stores == std::vector<std::string>{"req-1"});
    CHECK(f.worker->get_finished({"req-1"})->stores.empty());  // a repeated report: once

    CHECK(!f.scheduler->monitor().gate().is_open());
    REQUIRE(f.scheduler->submit_lookup("a", tokens));
    CHECK(f.scheduler->monitor().gate().is_open());  // the first lookup starts the heartbeat
    CHECK(f.matched("a") == 4 * chunk);
    CHECK(f.matched("a") == 4 * chunk);  // cached (a two-phase job answers once)

    auto diverging = tokens;
    diverging[2 * chunk + 1] += 1;  // the third chunk differs
    REQUIRE(f.scheduler->submit_lookup("b", diverging));
    CHECK(f.matched("b") == 2 * chunk);
    // A duplicate submit is ignored: the first answer stands.
    REQUIRE(f.scheduler->submit_lookup("b", tokens));
    CHECK(f.matched("b") == 2 * chunk);

    REQUIRE(f.scheduler->submit_lookup("miss", prompt(2 * chunk, 7)));
    CHECK(f.matched("miss") == 0);

    const auto locks = f.stat("read_locks_held");
    CHECK(locks > 0);
    CHECK(f.scheduler->free_lookup_locks("b", 0, 2));
    // One-way: wait for the server to have applied it.
    CHECK(eventually([&] { return f.stat("read_locks_held") < locks; }, 5s));
    CHECK(f.scheduler->report_block_allocation("a", 8, 256));
    const auto sessions = f.stat("sessions");
    CHECK(f.scheduler->end_session("b"));
    CHECK(eventually([&] { return f.stat("sessions") == sessions - 1; }, 5s));
    CHECK(eventually([&] { return f.stat("block_allocation_reports") == 1; }, 5s));
    CHECK(f.scheduler->check_lookup("b").error() == errc::not_found);  // state dropped

    auto rt = f.worker->submit_retrieve(f.spec("req-2", tokens, 20));
    REQUIRE_MESSAGE(rt, rt.error().message());
    CHECK(rt->retrieved_chunks == 4);
    fin = f.worker->get_finished({});
    CHECK(fin->retrieves == std::vector<std::string>{"req-2"});
    CHECK(f.worker->take_load_errors()->empty());
    // The worker's retrieve for request "a" releases exactly the locks the
    // scheduler's lookups for "a" took: nothing stays pinned.
    CHECK(f.stat("read_locks_held") > 0);
    REQUIRE(f.worker->submit_retrieve(f.spec("a", tokens, 40)));
    CHECK(f.stat("read_locks_held") == 0);
    CHECK(f.stat("l1_pinned_bytes") == 0);
    CHECK(f.worker->monitor().state() == health::State::healthy);
  }
}

TEST_CASE("adapter: the async forms work with use_future and callbacks; batches") {
  Fixture f;
  f.server.start();
  f.make();
  auto reg = f.worker->async_register_kv_caches(layout(), f.kv.get(), asio::use_future);
  REQUIRE(reg.wait_for(5s) == std::future_status::ready);
  reg.get();  // throws on an error
  std::vector<TransferSpec> specs{f.spec("s1", prompt(2 * chunk, 1), 0), f.spec("s2", prompt(2 * chunk, 2), 8)};
  auto batch = f.worker->async_submit_stores(specs, asio::use_future);
  REQUIRE(batch.wait_for(5s) == std::future_status::ready);
  auto codes = batch.get();
  REQUIRE(codes.size() == 2);
  CHECK(!codes[0]);
  CHECK(!codes[1]);
  std::promise<std::vector<std::string>> p;
  f.worker->async_get_finished({"s1", "s2"}, [&](std::error_code, FinishedSets s) { p.set_value(s.stores); });
  auto fut = p.get_future();
  REQUIRE(fut.wait_for(5s) == std::future_status::ready);
  CHECK(fut.get() == std::vector<std::string>{"s1", "s2"});
  auto rb = f.worker->submit_retrieves({f.spec("r1", prompt(2 * chunk, 1), 30), f.spec("r2", prompt(chunk, 9), 40)});
  // The batch ran: its value holds each spec's code, failed ones included.
  REQUIRE_MESSAGE(rb, rb.error().message());
  REQUIRE(rb->size() == 2);
  CHECK(!(*rb)[0]);
  CHECK((*rb)[1] == errc::not_found);  // never stored: its blocks failed to load
  auto fin = f.worker->get_finished({});
  REQUIRE(fin);
  CHECK(fin->retrieves.size() == 2);
  CHECK(f.worker->take_load_errors().value() == blocks(40, 2));
  auto co = asio::co_spawn(f.rt.executor(), awaited_lookup(f.scheduler, prompt(2 * chunk + 3, 1)), asio::use_future);
  REQUIRE(co.wait_for(5s) == std::future_status::ready);
  CHECK(co.get() == 2 * chunk);
}

TEST_CASE("adapter: SIGKILL mid-workload -> calls return in time, retrieves fail, get_finished drains; "
          "a restart re-registers and lookups resume") {
  Fixture f;
  f.server.start();
  f.make();
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(3 * chunk);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens)));
  REQUIRE(f.scheduler->submit_lookup("warm", tokens));
  f.healthy();

  // In flight when the server dies: a store and a retrieve it never answers.
  stop_server(f.server);
  auto pending_store = f.worker->async_submit_store(f.spec("s-late", prompt(2 * chunk, 5), 100), asio::use_future);
  auto pending_retrieve = f.worker->async_submit_retrieve(f.spec("r-late", tokens, 50), asio::use_future);
  f.server.kill();  // while stopped: it never reads them
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::degraded; }, 5s));
  REQUIRE(pending_retrieve.wait_for(3s) == std::future_status::ready);
  REQUIRE(pending_store.wait_for(3s) == std::future_status::ready);

  const auto t0 = std::chrono::steady_clock::now();
  auto rr = f.worker->submit_retrieve(f.spec("r-degraded", tokens, 60));
  CHECK(rr.error() == errc::unhealthy);  // not sent
  auto ss = f.worker->submit_store(f.spec("s-degraded", tokens, 70));
  CHECK(ss.error() == errc::unhealthy);
  REQUIRE(eventually([&] { return f.scheduler->monitor().state() == health::State::degraded; }, 5s));
  CHECK(f.scheduler->submit_lookup("during", tokens).error() == errc::unhealthy);
  auto during = f.scheduler->check_lookup("during");
  REQUIRE(during);
  CHECK(during->ready);
  CHECK(during->matched_tokens == 0);
  CHECK(f.scheduler->end_session("warm").error() == errc::unhealthy);  // dropped
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);

  // What was never sent is finished at once. What was sent and never
  // answered waits for its fence (transfer_timeout after sending): the
  // adapter cannot tell a dead server from a stopped one that may still copy.
  auto fin = f.worker->get_finished({"s-late", "s-degraded", "r-late"});
  REQUIRE(fin);
  CHECK(fin->retrieves == std::vector<std::string>{"r-degraded"});
  CHECK(fin->stores == std::vector<std::string>{"s-degraded"});
  CHECK(f.worker->take_load_errors().value() == blocks(60, 6));
  std::vector<std::string> late_retrieves, late_stores;
  REQUIRE(eventually([&] {
    auto more = f.worker->get_finished({}).value();
    late_retrieves.insert(late_retrieves.end(), more.retrieves.begin(), more.retrieves.end());
    late_stores.insert(late_stores.end(), more.stores.begin(), more.stores.end());
    return !late_retrieves.empty() && !late_stores.empty();
  }, 5s));
  CHECK(late_retrieves == std::vector<std::string>{"r-late"});
  CHECK(late_stores == std::vector<std::string>{"s-late"});
  CHECK(f.worker->take_load_errors().value() == blocks(50, 6));
  CHECK(f.worker->get_finished({"s-late", "r-late"})->stores.empty());  // once only

  // Restart: the worker re-registers by itself, then lookups work again.
  f.server.start();
  f.healthy();
  CHECK(f.stat("registrations") == 1);
  REQUIRE(f.worker->submit_store(f.spec("s2", tokens)));
  REQUIRE(f.scheduler->submit_lookup("after", tokens));
  CHECK(f.matched("after") == 3 * chunk);
}

TEST_CASE("adapter: SIGSTOP -> blocking calls return within their deadline") {
  Fixture f;
  f.server.start();
  f.make(LookupMode::two_phase);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(2 * chunk);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens)));
  REQUIRE(f.scheduler->submit_lookup("x", tokens));
  f.healthy();
  stop_server(f.server);
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = f.worker->submit_retrieve(f.spec("r" + std::to_string(i), tokens, 10), 300ms);
    const auto took = std::chrono::steady_clock::now() - t0;
    CHECK(!r);  // timed_out while the link looks healthy, unhealthy after
    CHECK(took < 1s);
    const auto t1 = std::chrono::steady_clock::now();
    auto l = f.scheduler->submit_lookup("y" + std::to_string(i), tokens, 300ms);
    (void)l;
    auto c = f.scheduler->check_lookup("y" + std::to_string(i), 300ms);
    (void)c;
    CHECK(std::chrono::steady_clock::now() - t1 < 1500ms);
  }
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::degraded; }, 5s));
  // Drained, each once, when their fence (transfer_timeout 1 s) has passed.
  std::vector<std::string> drained;
  CHECK(eventually([&] {
    auto more = f.worker->get_finished({})->retrieves;
    drained.insert(drained.end(), more.begin(), more.end());
    return drained.size() >= 3;
  }, 5s));
  std::sort(drained.begin(), drained.end());
  CHECK(drained == std::vector<std::string>{"r0", "r1", "r2"});
  f.server.resume();
  f.healthy();
  CHECK(f.stat("registrations") == 1);  // same server: registration kept
}

TEST_CASE("adapter: a cancelled async call completes at once with operation_aborted, and only once") {
  Fixture f;
  f.server.start();
  f.make();
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  f.scheduler_connected();  // the first lookup must not find it still connecting (it is healthy only once a lookup opens its gate)
  const auto tokens = prompt(2 * chunk);
  // Runs one async lookup with a cancellation slot, on the adapters' thread;
  // `cancel_after` > 0 signals the slot then. Returns every completion.
  struct Outcome {
    asio::cancellation_signal signal;  // must outlive the operation (Asio's rule)
    std::mutex m;
    std::vector<std::error_code> completions;
    std::chrono::steady_clock::time_point first;
  };
  auto lookup = [&](const std::string& id, std::chrono::milliseconds cancel_after) {
    auto out = std::make_shared<Outcome>();
    auto* signal = &out->signal;
    const auto t0 = std::chrono::steady_clock::now();
    asio::post(f.rt.executor(), [&, id, out, signal] {
      f.scheduler->async_submit_lookup(id, tokens,
                                       asio::bind_cancellation_slot(signal->slot(), [out](std::error_code ec, Done) {
                                         std::lock_guard l(out->m);
                                         if (out->completions.empty()) out->first = std::chrono::steady_clock::now();
                                         out->completions.push_back(ec);
                                       }));
    });
    if (cancel_after > 0ms) {
      std::this_thread::sleep_for(cancel_after);
      asio::post(f.rt.executor(), [signal] { signal->emit(asio::cancellation_type::terminal); });
    }
    return std::make_pair(out, t0);
  };
  auto completions = [](const std::shared_ptr<Outcome>& o) {
    std::lock_guard l(o->m);
    return o->completions;
  };

  // A slot never signalled changes nothing.
  auto [normal, t_normal] = lookup("n", 0ms);
  REQUIRE(eventually([&] { return completions(normal).size() == 1; }, 2s));
  CHECK(!completions(normal)[0]);
  f.healthy();  // (the scheduler's gate opened on that first lookup)

  // The server stops answering: the lookup would wait for its 1 s call
  // deadline; cancelled after 50 ms it completes then, once.
  stop_server(f.server);
  auto [cancelled, t0] = lookup("c", 50ms);
  REQUIRE(eventually([&] { return completions(cancelled).size() == 1; }, 2s));
  CHECK(completions(cancelled)[0] == asio::error::operation_aborted);
  CHECK(cancelled->first - t0 < 500ms);
  std::this_thread::sleep_for(1500ms);  // past the call's own deadline: its result is dropped
  CHECK(completions(cancelled).size() == 1);
  f.server.resume();
}

TEST_CASE("adapter: a cancelled lookup cancels its connection call at once; the lookup then reports no hit") {
  Fixture f;
  f.server.start();
  f.make(LookupMode::two_phase);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(2 * chunk);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens)));
  // A scheduler whose heartbeat waits 5 s for a ping: while the server is
  // stopped below, its connection stays up and healthy, and only the
  // cancellations can end the lookups' calls before their 1 s deadline.
  auto s = test::config_for<SchedulerConfig>(f.endpoint, 1s);
  s.lookup_mode = LookupMode::two_phase;
  s.health.ping_timeout = 5s;
  f.scheduler->stop();
  f.scheduler = SchedulerAdapter::create(f.rt.executor(), s);
  f.scheduler_connected();
  REQUIRE(f.scheduler->submit_lookup("a", tokens));  // job known, its status not asked yet
  const auto conn = f.scheduler->monitor().connection();
  REQUIRE(conn);
  auto stats = [&] {  // the connection's counters, read on its executor
    std::promise<net::ConnectionStats> p;
    asio::post(f.rt.executor(), [&] { p.set_value(conn->stats()); });
    return p.get_future().get();
  };

  // Starts `call(slot-bound handler)` on the adapters' thread, cancels it
  // 50 ms later and returns its completion's error.
  auto cancel_after_50ms = [&](auto call) {
    asio::cancellation_signal signal;
    std::promise<std::error_code> done;
    asio::post(f.rt.executor(), [&] {
      call(asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec, auto) { done.set_value(ec); }));
    });
    std::this_thread::sleep_for(50ms);
    asio::post(f.rt.executor(), [&] { signal.emit(asio::cancellation_type::terminal); });
    auto ec = done.get_future().get();
    std::promise<void> drained;  // the forwarded cancellation ran too (posted after the completion's)
    asio::post(f.rt.executor(), [&] { drained.set_value(); });
    drained.get_future().wait();
    return ec;
  };

  stop_server(f.server);
  const auto before = stats();
  const auto t0 = std::chrono::steady_clock::now();
  // check_lookup: its QUERY_PREFETCH_STATUS leaves the pending table now,
  // not at its deadline; the lookup is final, with no hit.
  CHECK(cancel_after_50ms([&](auto handler) { f.scheduler->async_check_lookup("a", std::move(handler)); }) ==
        asio::error::operation_aborted);
  CHECK(stats().cancelled == before.cancelled + 1);
  auto a = f.scheduler->check_lookup("a");
  REQUIRE_MESSAGE(a, a.error().message());
  CHECK(a->ready);
  CHECK(a->matched_tokens == 0);
  // submit_lookup: the same for its LOOKUP.
  CHECK(cancel_after_50ms([&](auto handler) { f.scheduler->async_submit_lookup("b", tokens, std::move(handler)); }) ==
        asio::error::operation_aborted);
  CHECK(stats().cancelled == before.cancelled + 2);
  auto b = f.scheduler->check_lookup("b");
  REQUIRE_MESSAGE(b, b.error().message());
  CHECK(b->ready);
  CHECK(b->matched_tokens == 0);
  CHECK(std::chrono::steady_clock::now() - t0 < 900ms);  // both before the calls' 1 s deadline
  CHECK(stats().timeouts == before.timeouts);

  // The server answers the cancelled calls once it runs: late replies,
  // dropped; the connection serves the next lookup.
  f.server.resume();
  CHECK(eventually([&] { return stats().late_replies >= before.late_replies + 2; }, 5s));
  REQUIRE(f.scheduler->submit_lookup("c", tokens));
  CHECK(f.matched("c") == 2 * chunk);
  CHECK(f.scheduler->monitor().connection() == conn);
}

TEST_CASE("adapter: no server -> degraded; nothing hangs, everything reports the degraded outcome") {
  Fixture f;
  f.make();
  f.worker->ready();
  f.scheduler->ready();
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::degraded; }, 5s));
  REQUIRE(eventually([&] { return f.scheduler->monitor().state() == health::State::degraded; }, 5s));
  CHECK(f.worker->register_kv_caches(layout(), f.kv.get()).error() == errc::unhealthy);
  CHECK(f.worker->submit_store(f.spec("s", prompt(chunk))).error() == errc::unhealthy);
  CHECK(f.worker->submit_retrieve(f.spec("r", prompt(chunk), 3)).error() == errc::unhealthy);
  auto fin = f.worker->get_finished({"s"});
  REQUIRE(fin);
  CHECK(fin->stores == std::vector<std::string>{"s"});
  CHECK(fin->retrieves == std::vector<std::string>{"r"});
  CHECK(f.worker->take_load_errors().value() == blocks(3, 2));
  CHECK(f.scheduler->submit_lookup("l", prompt(chunk)).error() == errc::unhealthy);
  auto st = f.scheduler->check_lookup("l");
  REQUIRE(st);
  CHECK(st->ready);
  CHECK(st->matched_tokens == 0);
  CHECK(f.scheduler->report_block_allocation("l", 1, 2).error() == errc::unhealthy);

  // The server appears: the registration that was never acknowledged is
  // sent once the link is healthy, and transfers work.
  f.server.start();
  f.healthy();
  REQUIRE(eventually([&] { return f.stat("registrations") == 1; }, 5s));
  auto st2 = f.worker->submit_store(f.spec("s2", prompt(chunk)));
  CHECK_MESSAGE(st2, st2.error().message());
  CHECK(st2->stored_chunks == 1);
}

TEST_CASE("adapter: worker gate triggers; unregister") {
  SUBCASE("first transfer") {
    Fixture f;
    f.server.start();
    f.make(LookupMode::sync, GateTrigger::first_transfer);
    REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
    CHECK(!f.worker->monitor().gate().is_open());
    REQUIRE(f.worker->submit_store(f.spec("s", prompt(chunk))));
    CHECK(f.worker->monitor().gate().is_open());
    CHECK(f.worker->monitor().gate().reason() == "first store");
  }
  SUBCASE("explicit ready only") {
    Fixture f;
    f.server.start();
    f.make(LookupMode::sync, GateTrigger::explicit_ready);
    REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
    REQUIRE(f.worker->submit_store(f.spec("s", prompt(chunk))));
    CHECK(!f.worker->monitor().gate().is_open());
    CHECK(f.worker->monitor().state() == health::State::warming);
    f.worker->ready();
    CHECK(f.worker->monitor().gate().is_open());
    REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::healthy; }));
    CHECK(f.stat("registrations") == 1);
    REQUIRE(f.worker->unregister_kv_caches());
    CHECK(f.stat("registrations") == 0);
    CHECK(f.worker->submit_store(f.spec("s2", prompt(chunk, 2))).error() == errc::not_registered);
  }
}

TEST_CASE("adapter: a refused registration's error says what the server refused") {
  Fixture f;
  f.server.start();
  f.make(LookupMode::sync, GateTrigger::register_ack);
  const auto tiny = wire::paged_layout(1, 256, block, 1, 1, 1);  // chunks far below the server's minimum
  auto kv = transfer::create_kv_memfd(tiny);
  REQUIRE(kv);
  auto r = f.worker->register_kv_caches(tiny, kv->fd.get());
  REQUIRE(!r);
  CHECK(r.error() == errc::bad_request);
  CHECK(r.error().message().find("refused by the server") != std::string::npos);
  CHECK(r.error().message().find("minimum") != std::string::npos);
}

TEST_CASE("adapter: reaped by the server (unknown_instance) -> HELLO again, re-registered, no degraded episode") {
  Fixture f({"--reap-timeout-s", "1", "--registration-grace-s", "1"});
  f.server.start();
  f.make(LookupMode::sync, GateTrigger::explicit_ready);
  auto events = record_events(f);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  CHECK(f.stat("registrations") == 1);
  // Gate closed, no pings: the server reaps the silent instance.
  REQUIRE(eventually([&] { return f.stat("registrations") == 0; }, 10s));
  f.worker->ready();
  // The first ping answers unknown_instance: HELLO again (the reply says the
  // server holds nothing), REGISTER again, then healthy.
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::healthy; }, 10s));
  REQUIRE(eventually([&] { return f.stat("registrations") == 1; }, 5s));
  REQUIRE(f.worker->submit_store(f.spec("s", prompt(chunk))));
  CHECK(events->count("worker", "degraded") == 0);
  CHECK(events->notices("worker", "saying HELLO again") == 1);
}

TEST_CASE("adapter: a scheduler can share the worker's monitor (one connection, one heartbeat)") {
  Fixture f;
  f.server.start();
  f.make();
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(2 * chunk, 3);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens)));
  SchedulerConfig c;
  c.model = "adapter-model";
  c.monitor = f.worker->shared_monitor();
  auto shared = SchedulerAdapter::create(f.rt.executor(), c);
  CHECK(&shared->monitor() == &f.worker->monitor());
  REQUIRE(shared->submit_lookup("q", tokens));
  auto st = shared->check_lookup("q");
  REQUIRE(st);
  CHECK(st->ready);
  CHECK(st->matched_tokens == 2 * chunk);
  shared->stop();  // leaves the shared monitor alone
  shared.reset();
  CHECK(f.worker->monitor().state() != health::State::stopped);
  CHECK(f.worker->submit_store(f.spec("s2", prompt(chunk, 4))));
}

// ---- self-healing in the orders reality produces -------------------------------------

namespace {
// Stores `tokens` under a fresh id and looks them up under another: the
// matched tokens (0 while the link cannot serve them yet).
std::uint32_t store_then_lookup(Fixture& f, const std::vector<store::Token>& tokens, int round) {
  (void)f.worker->submit_store(f.spec("store-" + std::to_string(round), tokens));
  const std::string id = "lookup-" + std::to_string(round);
  if (!f.scheduler->submit_lookup(id, tokens)) return 0;
  auto st = f.scheduler->check_lookup(id);
  return !st || !st->ready ? 0 : st->matched_tokens;
}

// Runs store_then_lookup until it hits; the time it took (or `limit`).
Duration until_hit(Fixture& f, const std::vector<store::Token>& tokens, Duration limit = 10s) {
  const auto t0 = Clock::now();
  for (int round = 0; Clock::now() - t0 < limit; ++round) {
    if (store_then_lookup(f, tokens, round) > 0) return Clock::now() - t0;
    std::this_thread::sleep_for(5ms);
  }
  return limit;
}

double ms(Duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
}  // namespace

TEST_CASE("self-heal: engine before server: hits within 2 s of the server listening, default gate, no ready()") {
  Fixture f;
  f.make();  // default gate trigger (register_ack); nobody calls ready()
  // No server yet: the call says so at its deadline; the registration stays.
  const auto r = f.worker->register_kv_caches(layout(), f.kv.get());
  CHECK(r.error() == errc::not_connected);
  CHECK(!f.worker->submit_store(f.spec("early", prompt(chunk))));  // nothing to serve it yet
  std::this_thread::sleep_for(300ms);
  f.server.start();  // returns once it listens
  const Duration took = until_hit(f, prompt(2 * chunk, 7));
  MESSAGE("server listening -> first hit: " << ms(took) << " ms");
  CHECK(took < 2s);
  CHECK(f.worker->monitor().gate().reason() == "register acknowledged");
  CHECK(f.stat("registrations") == 1);
  f.healthy();  // the lookups opened the scheduler's gate
}

TEST_CASE("self-heal: a connection dropped with the server alive: healthy again, no not_registered, hits resume") {
  Fixture f;
  f.server.start();
  f.make();
  auto events = record_events(f);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(2 * chunk, 8);
  REQUIRE(until_hit(f, tokens) < 2s);  // the lookup opens the scheduler's gate
  f.healthy();
  const auto not_registered_before = f.stat("op_store_errors");
  // A client-side close (after a protocol error, say): the server keeps the
  // registration, and its HELLO reply says so.
  for (health::Monitor* m : {&f.worker->monitor(), &f.scheduler->monitor()})
    asio::post(f.rt.executor(), [m] {
      if (auto c = m->connection()) c->close();
    });
  REQUIRE(eventually([&] { return events->count("worker", "degraded") == 1; }, 5s));
  REQUIRE(eventually([&] { return events->count("scheduler", "degraded") == 1; }, 5s));
  f.healthy();
  const Duration took = until_hit(f, prompt(2 * chunk, 9));
  MESSAGE("healthy again -> hits resume: " << ms(took) << " ms");
  CHECK(took < 2s);
  CHECK(f.stat("op_store_errors") == not_registered_before);  // no store was refused
  CHECK(f.stat("registrations") == 1);
  CHECK(f.stat("op_register_kv_cache_requests") == 1);  // the surviving server kept it: not sent again
}

TEST_CASE("self-heal: an idle scheduler past the reap timeout: its first lookup is served, no degraded episode") {
  Fixture f({"--reap-timeout-s", "1", "--registration-grace-s", "1"});
  f.server.start();
  f.make();
  auto events = record_events(f);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));  // the worker's gate opens: it pings
  const auto tokens = prompt(2 * chunk, 10);
  REQUIRE(f.worker->submit_store(f.spec("s", tokens)));
  // The scheduler's gate stays closed (no lookup yet): silent, it is reaped.
  REQUIRE(eventually([&] { return f.stat("instances_reaped") >= 1; }, 10s));
  REQUIRE(f.scheduler->submit_lookup("first", tokens));
  CHECK(f.matched("first") == 2 * chunk);
  REQUIRE(eventually([&] { return f.scheduler->monitor().state() == health::State::healthy; }, 5s));
  CHECK(events->count("scheduler", "degraded") == 0);
  CHECK(events->count("worker", "degraded") == 0);
}

TEST_CASE("self-heal: a preempted request loaded again under its id is reported finished twice") {
  Fixture f;
  f.server.start();
  f.make();
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  const auto tokens = prompt(2 * chunk, 11);
  REQUIRE(f.worker->submit_store(f.spec("writer", tokens)));
  // vLLM: load, report finished, preempt, load again under the same id.
  for (int load = 1; load <= 2; ++load) {
    CAPTURE(load);
    auto r = f.worker->submit_retrieve(f.spec("req-p", tokens, 8));
    REQUIRE_MESSAGE(r, r.error().message());
    auto fin = f.worker->get_finished({});
    REQUIRE(fin);
    CHECK(fin->retrieves == std::vector<std::string>{"req-p"});
    CHECK(f.worker->get_finished({})->retrieves.empty());  // a round is reported once
  }
}

TEST_CASE("self-heal: a refused re-registration is dropped with one error, not retried") {
  auto lines = std::make_shared<std::vector<std::string>>();
  auto mu = std::make_shared<std::mutex>();
  log::set_sink([lines, mu](log::Level level, std::string_view line) {
    if (level < log::Level::warn) return;
    std::lock_guard lock(*mu);
    lines->emplace_back(line);
  });
  struct Restore {
    ~Restore() { log::set_sink(nullptr); }
  } restore;
  Fixture f;
  f.server.start();
  f.make();
  auto events = record_events(f);
  REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
  f.worker_healthy();
  // The replacement cannot take this layout: 24-token chunks are not whole
  // 16-token blocks, so it refuses the registration.
  f.server.kill();
  ServerProcess other({"--listen", f.endpoint, "--log-level", "warn", "--chunk-size", "24", "--l1-size", "64MiB",
                       "--no-huge-pages"});
  other.start();
  REQUIRE(eventually([&] { return events->notices("worker", "registration refused") == 1; }, 5s));
  std::this_thread::sleep_for(1s);  // 20 heartbeat intervals: nothing retried meanwhile
  CHECK(test::server_stat(f.endpoint, "op_register_kv_cache_requests") == 1);
  CHECK(events->notices("worker", "registration refused") == 1);
  std::lock_guard lock(*mu);
  CHECK(std::count_if(lines->begin(), lines->end(), [](const std::string& l) {
          return l.find("REGISTER_KV_CACHE refused") != std::string::npos;
        }) == 1);
  // The link itself is fine, and the worker says what it lacks.
  REQUIRE(eventually([&] { return f.worker->monitor().state() == health::State::healthy; }, 5s));
  CHECK(f.worker->submit_store(f.spec("s", prompt(chunk))).error() == errc::not_registered);
  other.kill();
}

TEST_CASE("self-heal: shutdown stops the heartbeat, then unregisters; bounded when the server hangs") {
  SUBCASE("server alive") {
    Fixture f;
    f.server.start();
    f.make();
    REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
    f.worker_healthy();
    REQUIRE(f.stat("registrations") == 1);
    const auto r = f.worker->shutdown(3s);
    CHECK_MESSAGE(r, r.error().message());
    CHECK(f.worker->monitor().state() == health::State::stopped);
    CHECK(f.stat("registrations") == 0);
    CHECK(f.worker->submit_store(f.spec("late", prompt(chunk))).error() == errc::shutting_down);
  }
  SUBCASE("server hung") {
    auto warnings = std::make_shared<std::atomic<int>>(0);
    log::set_sink([warnings](log::Level level, std::string_view line) {
      if (level == log::Level::warn && line.find("UNREGISTER_KV_CACHE at shutdown failed") != std::string::npos)
        ++*warnings;
    });
    struct Restore {
      ~Restore() { log::set_sink(nullptr); }
    } restore;
    Fixture f;
    f.server.start();
    f.make();
    REQUIRE(f.worker->register_kv_caches(layout(), f.kv.get()));
    f.worker_healthy();
    stop_server(f.server);
    const auto t0 = Clock::now();
    const auto r = f.worker->shutdown(5s);
    const auto took = Clock::now() - t0;
    CHECK(r.error() == errc::timed_out);
    CHECK(took < 1500ms);  // call_timeout (1 s) and a margin, well before the 5 s deadline
    CHECK(warnings->load() == 1);
    CHECK(f.worker->monitor().state() == health::State::stopped);  // no degraded verdict on the way out
    f.server.resume();
  }
}

TEST_CASE("self-heal: engines forked from one parent draw distinct instance ids and both register") {
  TempDir dir;
  const std::string ep = dir.socket();
  ServerProcess server(Fixture::args(ep, {}));
  server.start();
  const std::uint64_t parent_id = net::random_instance_id();  // the parent drew before forking
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  std::vector<pid_t> children;
  for (int i = 0; i < 2; ++i) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      // The child: an engine of its own, its io_context run by its only
      // thread (no thread is started after the fork).
      int rc = 1;
      {
        UniqueFd kv = kv_memfd();
        asio::io_context io;
        auto worker = WorkerAdapter::create(io.get_executor(), config_for<WorkerConfig>(ep, 2s));
        const std::uint64_t id = worker->monitor().instance_id();
        if (::write(fds[1], &id, sizeof id) == sizeof id)
          worker->async_register_kv_caches(layout(), kv.get(), [&](std::error_code ec, Done) {
            rc = ec ? 1 : 0;
            io.stop();  // no shutdown: the server keeps the registration until reaped
          });
        io.run_for(5s);
      }
      ::_exit(rc);
    }
    children.push_back(pid);
  }
  ::close(fds[1]);
  std::set<std::uint64_t> ids{parent_id};
  std::uint64_t id = 0;
  while (::read(fds[0], &id, sizeof id) == sizeof id) ids.insert(id);
  ::close(fds[0]);
  for (pid_t pid : children) {
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  }
  CHECK(ids.size() == 3);
  CHECK(test::server_stat(ep, "registrations") == 2);
}

TEST_CASE("adapter: adapters never stopped are freed with their io_context, calls still pending") {
  // An engine that tears down its io_context without stopping the adapters
  // (an exception unwinding, a test ending early) must not leak them: the
  // calls waiting on a hung server own the adapters, and nothing may own
  // those calls but the io_context.
  TempDir dir;
  const std::string ep = dir.socket();
  ServerProcess server(Fixture::args(ep, {}));
  server.start();
  UniqueFd kv = kv_memfd();
  std::weak_ptr<WorkerAdapter> weak_worker;
  std::weak_ptr<SchedulerAdapter> weak_scheduler;
  std::weak_ptr<health::Monitor> weak_monitors[2];
  {
    asio::io_context io;
    auto worker = WorkerAdapter::create(io.get_executor(), config_for<WorkerConfig>(ep, 10s));
    auto scheduler = SchedulerAdapter::create(io.get_executor(), config_for<SchedulerConfig>(ep, 10s));
    bool registered = false;
    worker->async_register_kv_caches(layout(), kv.get(), [&](std::error_code ec, Done) { registered = !ec; });
    for (int i = 0; i < 100 && !registered; ++i) io.run_for(20ms);
    REQUIRE(registered);
    server.stop();  // SIGSTOP: every call from now on waits for its deadline
    int answered = 0;
    TransferSpec store;
    store.request_id = "pending";
    store.tokens = prompt(chunk);
    store.block_ids = blocks(0, chunk / block);
    worker->async_submit_store(std::move(store), [&](std::error_code, auto) { ++answered; });
    scheduler->async_submit_lookup("pending", prompt(chunk), [&](std::error_code, auto) { ++answered; });
    io.run_for(200ms);  // heartbeat pings pile up too
    CHECK(answered == 0);
    weak_worker = worker;
    weak_scheduler = scheduler;
    weak_monitors[0] = worker->shared_monitor();
    weak_monitors[1] = scheduler->shared_monitor();
  }
  CHECK(weak_worker.expired());
  CHECK(weak_scheduler.expired());
  CHECK(weak_monitors[0].expired());
  CHECK(weak_monitors[1].expired());
  server.resume();
}
