// A C++20 coroutine engine that owns its io_context (mode (c)): the
// adapters are created on the engine's own executor, the engine co_awaits
// them, and everything (engine, kvlink sockets, heartbeat) runs on the one
// thread that runs io.run(). No locks, no Runtime. Usage:
// coroutine_engine ENDPOINT
//
// Workload: register the memfd KV cache, store a prompt, look it up, retrieve
// it into other blocks while a second lookup runs concurrently, compare the
// bytes, then get_finished.
#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <cstdio>

#include "example_kv.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"

using namespace kvlink;
using asio::use_awaitable;
using example::check;

namespace {

// g++ 12 cannot put an initializer_list's array in a coroutine frame
// ("array used as initializer"): braced lists are built out here.
std::vector<std::string> ids(const char* id) { return {id}; }

// State is passed as parameters, not lambda captures (g++ 12 coroutine
// lambdas are unsafe), and the engine is one free coroutine.
asio::awaitable<void> engine(std::shared_ptr<adapter::WorkerAdapter> worker,
                             std::shared_ptr<adapter::SchedulerAdapter> scheduler, example::KvCache& kv) {
  using namespace asio::experimental::awaitable_operators;
  // Errors arrive as exceptions with use_awaitable (asio::as_tuple would
  // give them as values): any failure ends the engine with a message.
  co_await worker->async_register_kv_caches(kv.kv_layout(), kv.fd(), use_awaitable);

  kv.fill(example::block_range(0), 1);
  auto stored = co_await worker->async_submit_store(example::spec("req-1", 1, 0), use_awaitable);
  check(stored.stored_chunks == 2, "2 chunks stored");

  co_await scheduler->async_submit_lookup("lookup-1", example::prompt(1), use_awaitable);
  auto st = co_await scheduler->async_check_lookup("lookup-1", use_awaitable);
  check(st.ready && st.matched_tokens == example::prompt_tokens, "the whole prompt is cached");

  // Two calls in flight at once on the same thread: a retrieve into blocks
  // 32-63 and a lookup of a prompt never stored.
  auto [got, miss] = co_await (worker->async_submit_retrieve(example::spec("req-2", 1, 32), use_awaitable) &&
                               scheduler->async_submit_lookup("lookup-2", example::prompt(7), use_awaitable));
  (void)miss;
  check(got.retrieved_chunks == 2, "2 chunks retrieved");
  check(kv.holds(example::block_range(32), 1), "the stored bytes came back into blocks 32-63");
  auto none = co_await scheduler->async_check_lookup("lookup-2", use_awaitable);
  check(none.ready && none.matched_tokens == 0, "an unknown prompt matches nothing");

  auto fin = co_await worker->async_get_finished(ids("req-1"), use_awaitable);
  check(fin.stores == ids("req-1"), "the store finished");
  check(fin.retrieves == ids("req-2"), "the retrieve finished");

  co_await scheduler->async_end_session("lookup-1", use_awaitable);
  co_await scheduler->async_end_session("lookup-2", use_awaitable);
  co_await worker->async_shutdown(use_awaitable);
  scheduler->stop();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string endpoint = example::endpoint_from(argc, argv);
  asio::io_context io;  // the engine's own loop

  adapter::WorkerConfig wc;
  wc.endpoint = endpoint;
  wc.model = "example-model";
  auto worker = adapter::WorkerAdapter::create(io.get_executor(), wc);
  adapter::SchedulerConfig sc;
  sc.endpoint = endpoint;
  sc.model = "example-model";
  sc.lookup_mode = adapter::LookupMode::sync;
  auto scheduler = adapter::SchedulerAdapter::create(io.get_executor(), sc);

  example::KvCache kv;
  bool done = false;
  asio::co_spawn(io, engine(worker, scheduler, kv), [&](std::exception_ptr e) {
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        check(false, std::string("engine: ") + ex.what());
      }
    }
    done = true;
  });
  // The engine's loop; a 30 s silence would mean a hang (every kvlink call
  // has its own deadline, so it cannot happen).
  while (!done && io.run_one_for(std::chrono::seconds(30)) > 0) {
  }
  check(done, "the engine finished within its deadlines");
  std::printf("coroutine_engine: ok\n");
  return 0;
}
