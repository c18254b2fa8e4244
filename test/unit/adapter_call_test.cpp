// The adapters' call plumbing without sockets: the blocking form never
// outlives its deadline, and one async operation serves callbacks and
// use_future, completing on the runtime's thread.
#include <doctest/doctest.h>

#include <asio/post.hpp>
#include <asio/use_future.hpp>
#include <atomic>
#include <thread>

#include "kvlink/adapter/call.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;
using namespace kvlink::adapter;
using namespace std::chrono_literals;

TEST_CASE("call: a blocking call returns timed_out at its deadline when the operation never completes") {
  detail::Callback<int> kept;  // never called: a hung server
  int deadline_reports = 0;
  const auto t0 = Clock::now();
  auto r = detail::blocking<int>(100ms, [&](detail::Callback<int> cb) { kept = std::move(cb); },
                                 [&] { ++deadline_reports; });
  const auto took = Clock::now() - t0;
  CHECK(r.error() == errc::timed_out);
  CHECK(!r);
  CHECK(!r.error().detail().empty());  // says which deadline passed and what to do
  CHECK(took >= 100ms);
  CHECK(took < 2s);
  CHECK(deadline_reports == 1);
  kept({}, 5);  // a late completion after the caller left is harmless
}

TEST_CASE("call: a blocking call returns the operation's result and error") {
  int deadline_reports = 0;
  auto ok = detail::blocking<int>(1s, [](detail::Callback<int> cb) { cb({}, 42); }, [&] { ++deadline_reports; });
  CHECK(ok);
  CHECK(*ok == 42);
  auto bad = detail::blocking<int>(
      1s, [](detail::Callback<int> cb) { cb(make_error_code(errc::unhealthy), 0); }, [&] { ++deadline_reports; });
  CHECK(bad.error() == errc::unhealthy);
  CHECK(!bad);
  CHECK(deadline_reports == 0);
}

namespace {
// A toy async operation in the adapters' style: the work runs on `ex`.
template <class Token>
auto async_twice(asio::any_io_executor ex, int v, std::atomic<bool>* on_io, runtime::Runtime* rt, Token&& token) {
  return detail::initiate<int>(ex, token, [ex, v, on_io, rt](detail::Callback<int> cb) {
    asio::post(ex, [v, on_io, rt, cb = std::move(cb)] {
      on_io->store(rt->running_in_this_thread());
      if (v < 0) return cb(make_error_code(errc::bad_request), 0);
      cb({}, 2 * v);
    });
  });
}
}  // namespace

TEST_CASE("call: one operation serves use_future and callbacks; the work runs on the io thread") {
  runtime::Runtime rt;
  std::atomic<bool> on_io{false};
  auto f = async_twice(rt.executor(), 21, &on_io, &rt, asio::use_future);
  REQUIRE(f.wait_for(5s) == std::future_status::ready);
  CHECK(f.get() == 42);
  CHECK(on_io.load());
  auto failing = async_twice(rt.executor(), -1, &on_io, &rt, asio::use_future);
  REQUIRE(failing.wait_for(5s) == std::future_status::ready);
  CHECK_THROWS_AS(failing.get(), std::system_error);
  std::promise<std::pair<std::error_code, int>> p;
  async_twice(rt.executor(), 4, &on_io, &rt, [&](std::error_code ec, int v) { p.set_value({ec, v}); });
  auto cb = p.get_future();
  REQUIRE(cb.wait_for(5s) == std::future_status::ready);
  auto [ec, v] = cb.get();
  CHECK(!ec);
  CHECK(v == 8);
  rt.stop();
  rt.stop();  // idempotent
}
