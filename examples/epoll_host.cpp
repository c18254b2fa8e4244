// A host with a plain epoll loop embeds kvlink through one file descriptor
// (mode (b)): kvlink's Runtime keeps its sockets, heartbeat and deadlines
// on its own thread; every completion the host asks for is bound to
// rt.host_executor() and runs inside rt.poll(), on the host's thread, when
// the host's loop sees rt.host_fd() readable. The host's code needs no
// locks and never busy-loops. Usage: epoll_host ENDPOINT
//
// Workload, as a chain of callbacks: register the memfd KV cache, store a
// prompt, look it up, retrieve it into other blocks, compare the bytes,
// get_finished, shut down. Health transitions arrive through the fd too.
#include <sys/epoll.h>
#include <sys/timerfd.h>

#include <asio/bind_executor.hpp>
#include <cstdio>
#include <thread>

#include "example_kv.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;
using example::check;

namespace {

struct Host {
  runtime::Runtime& rt;
  std::shared_ptr<adapter::WorkerAdapter> worker;
  std::shared_ptr<adapter::SchedulerAdapter> scheduler;
  example::KvCache& kv;
  std::thread::id host_thread = std::this_thread::get_id();
  bool done = false;

  // A completion handler that runs in rt.poll() on the host thread and
  // hands the value to `next` (any error ends the example).
  template <class Next>
  auto on_host(const char* what, Next next) {
    return asio::bind_executor(rt.host_executor(), [this, what, next](std::error_code ec, auto value) {
      check(std::this_thread::get_id() == host_thread, "completions run on the host thread");
      check(!ec, std::string(what) + ": " + ec.message());
      next(std::move(value));
    });
  }

  void watch_health() {
    worker->monitor().async_changed(asio::bind_executor(rt.host_executor(), [this](std::error_code ec, health::Transition t) {
      if (ec) return;
      std::printf("epoll_host: link %s -> %s (%s)\n", health::state_name(t.from), health::state_name(t.to), t.reason.c_str());
      if (t.to != health::State::stopped) watch_health();
    }));
  }

  void start() {
    watch_health();
    worker->async_register_kv_caches(kv.kv_layout(), kv.fd(), on_host("register", [this](adapter::Done) { store(); }));
  }
  void store() {
    kv.fill(example::block_range(0), 1);
    worker->async_submit_store(example::spec("req-1", 1, 0), on_host("store", [this](wire::StoreResult r) {
      check(r.stored_chunks == 2, "2 chunks stored");
      lookup();
    }));
  }
  void lookup() {
    scheduler->async_submit_lookup("lookup-1", example::prompt(1), on_host("submit_lookup", [this](adapter::Done) {
      scheduler->async_check_lookup("lookup-1", on_host("check_lookup", [this](adapter::LookupStatus s) {
        check(s.ready && s.matched_tokens == example::prompt_tokens, "the whole prompt is cached");
        retrieve();
      }));
    }));
  }
  void retrieve() {
    worker->async_submit_retrieve(example::spec("req-2", 1, 32), on_host("retrieve", [this](wire::RetrieveResult r) {
      check(r.retrieved_chunks == 2, "2 chunks retrieved");
      check(kv.holds(example::block_range(32), 1), "the stored bytes came back into blocks 32-63");
      finish();
    }));
  }
  void finish() {
    worker->async_get_finished({"req-1"}, on_host("get_finished", [this](adapter::FinishedSets f) {
      check(f.stores == std::vector<std::string>{"req-1"} && f.retrieves == std::vector<std::string>{"req-2"},
            "the store and the retrieve finished");
      scheduler->async_end_session("lookup-1", on_host("end_session", [this](adapter::Done) {
        worker->async_shutdown(on_host("shutdown", [this](adapter::Done) {
          scheduler->stop();
          done = true;
        }));
      }));
    }));
  }
};

}  // namespace

int main(int argc, char** argv) {
  const std::string endpoint = example::endpoint_from(argc, argv);
  runtime::Runtime rt;

  adapter::WorkerConfig wc;
  wc.endpoint = endpoint;
  wc.model = "example-model";
  adapter::SchedulerConfig sc;
  sc.endpoint = endpoint;
  sc.model = "example-model";
  sc.lookup_mode = adapter::LookupMode::sync;
  example::KvCache kv;
  Host host{rt, adapter::WorkerAdapter::create(rt.executor(), wc),
            adapter::SchedulerAdapter::create(rt.executor(), sc), kv};

  // The host's loop watches its own fds (here a 10 ms "engine step" timer)
  // and kvlink's one fd.
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  const int step_timer = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  itimerspec every_10ms{{0, 10'000'000}, {0, 10'000'000}};
  ::timerfd_settime(step_timer, 0, &every_10ms, nullptr);
  for (int fd : {rt.host_fd(), step_timer}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    check(::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl");
  }

  host.start();
  std::uint64_t steps = 0;
  while (!host.done) {
    epoll_event events[4];
    const int n = ::epoll_wait(ep, events, 4, 30'000);
    check(n > 0, "the loop is woken within 30 s (every kvlink call has a deadline)");
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == rt.host_fd()) {
        rt.poll();  // runs kvlink's completions here, without blocking
      } else {
        std::uint64_t expirations = 0;
        if (::read(step_timer, &expirations, sizeof expirations) > 0) steps += expirations;
      }
    }
  }
  ::close(step_timer);
  ::close(ep);
  std::printf("epoll_host: ok (%llu engine steps meanwhile)\n", static_cast<unsigned long long>(steps));
  return 0;
}
