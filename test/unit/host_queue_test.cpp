// The host queue (mode (b) of runtime.hpp) without sockets: its fd is
// readable exactly while handlers wait, poll() runs them on the calling
// thread, and it works as an Asio executor (post, dispatch, bind_executor,
// co_spawn, any_io_executor).
#include <doctest/doctest.h>
#include <poll.h>

#include <asio/any_io_executor.hpp>
#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvlink/runtime/runtime.hpp"

using namespace kvlink::runtime;
using namespace std::chrono_literals;

namespace {

// Whether `fd` is readable within `ms` milliseconds.
bool readable(int fd, int ms = 0) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

asio::awaitable<int> wait_twice(asio::steady_timer* t, std::thread::id* resumed_on) {
  t->expires_after(1ms);
  co_await t->async_wait(asio::use_awaitable);
  t->expires_after(1ms);
  co_await t->async_wait(asio::use_awaitable);
  *resumed_on = std::this_thread::get_id();
  co_return 7;
}

}  // namespace

TEST_CASE("host queue: the fd is readable exactly while handlers wait; poll runs them here") {
  asio::execution_context ctx;
  HostQueue q(ctx);
  CHECK(!readable(q.fd()));
  CHECK(q.poll() == 0);
  std::thread::id ran_on;
  bool inside = false;
  std::thread producer([&] {
    q.post([&] {
      ran_on = std::this_thread::get_id();
      inside = q.running_in_this_thread();
    });
  });
  producer.join();
  CHECK(readable(q.fd()));
  CHECK(readable(q.fd()));  // level-triggered: still readable until polled
  CHECK(q.poll() == 1);
  CHECK(ran_on == std::this_thread::get_id());
  CHECK(inside);
  CHECK(!q.running_in_this_thread());
  CHECK(!readable(q.fd()));
}

TEST_CASE("host queue: one poll runs what was queued before it; what handlers queue makes the fd readable again") {
  asio::execution_context ctx;
  HostQueue q(ctx);
  std::vector<int> order;
  q.post([&] {
    order.push_back(1);
    q.post([&] { order.push_back(3); });
  });
  q.post([&] { order.push_back(2); });
  CHECK(q.poll() == 2);
  CHECK(order == std::vector<int>{1, 2});
  CHECK(readable(q.fd()));
  CHECK(q.poll() == 1);
  CHECK(order == std::vector<int>{1, 2, 3});
  CHECK(!readable(q.fd()));
}

TEST_CASE("host queue: a throwing handler leaves poll; the rest stay queued and signalled") {
  asio::execution_context ctx;
  HostQueue q(ctx);
  int ran = 0;
  q.post([] { throw std::runtime_error("boom"); });
  q.post([&] { ++ran; });
  CHECK_THROWS_AS(q.poll(), std::runtime_error);
  CHECK(ran == 0);
  CHECK(readable(q.fd()));
  CHECK(q.poll() == 1);
  CHECK(ran == 1);
}

TEST_CASE("host queue: handlers dropped unpolled are destroyed with the queue") {
  auto token = std::make_shared<int>(1);
  {
    asio::execution_context ctx;
    HostQueue q(ctx);
    q.post([t = token] {});
    CHECK(token.use_count() == 2);
  }
  CHECK(token.use_count() == 1);
}

TEST_CASE("host executor: post and dispatch queue (never inline); any_io_executor holds it") {
  Runtime rt;
  auto ex = rt.host_executor();
  int n = 0;
  asio::post(ex, [&] { ++n; });
  asio::dispatch(ex, [&] { ++n; });
  asio::any_io_executor any = ex;
  asio::post(any, [&] { ++n; });
  CHECK(n == 0);
  CHECK(rt.poll() == 3);
  CHECK(n == 3);
  CHECK(&asio::query(ex, asio::execution::context) == &static_cast<asio::execution_context&>(rt.context()));
  CHECK(ex == rt.host_executor());
}

TEST_CASE("host executor: a timer's handler bound to it runs in poll, woken through the fd") {
  Runtime rt;
  asio::steady_timer t(rt.executor());
  t.expires_after(5ms);
  std::thread::id ran_on;
  std::error_code got = asio::error::would_block;
  t.async_wait(asio::bind_executor(rt.host_executor(), [&](std::error_code ec) {
    got = ec;
    ran_on = std::this_thread::get_id();
  }));
  // The host's loop: block on the fd (no busy loop), then poll.
  REQUIRE(readable(rt.host_fd(), 5000));
  CHECK(rt.poll() == 1);
  CHECK(!got);
  CHECK(ran_on == std::this_thread::get_id());
}

TEST_CASE("host executor: a coroutine co_spawned on it resumes on the host thread; its timers are the runtime's") {
  Runtime rt;
  // A timer made from the host executor waits on the runtime's reactor and
  // completes in poll().
  asio::steady_timer t(rt.host_executor());
  std::thread::id resumed_on;
  int result = 0;
  asio::co_spawn(rt.host_executor(), wait_twice(&t, &resumed_on), [&](std::exception_ptr e, int v) {
    CHECK(!e);
    result = v;
  });
  const auto end = std::chrono::steady_clock::now() + 5s;
  while (result == 0 && std::chrono::steady_clock::now() < end) {
    if (readable(rt.host_fd(), 100)) rt.poll();
  }
  CHECK(result == 7);
  CHECK(resumed_on == std::this_thread::get_id());
}
