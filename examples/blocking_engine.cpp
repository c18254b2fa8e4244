// A thread-per-step engine with no event loop: kvlink runs on a Runtime's
// own thread (mode (a)), and every engine thread uses the blocking calls,
// each bounded by its deadline. Usage: blocking_engine ENDPOINT
//
// Workload: register the memfd KV cache; two requests store their prompt
// concurrently (one thread each); the scheduler looks both up; each is
// retrieved into other blocks (again a thread each) and the bytes are
// compared; get_finished reports every transfer exactly once.
#include <chrono>
#include <cstdio>
#include <future>

#include "example_kv.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/runtime/runtime.hpp"

using namespace kvlink;
using example::check;

int main(int argc, char** argv) {
  const std::string endpoint = example::endpoint_from(argc, argv);
  runtime::Runtime rt;  // kvlink's io thread: sockets, heartbeat, deadlines

  adapter::WorkerConfig wc;
  wc.endpoint = endpoint;
  wc.model = "example-model";
  auto worker = adapter::WorkerAdapter::create(rt.executor(), wc);
  adapter::SchedulerConfig sc;
  sc.endpoint = endpoint;
  sc.model = "example-model";
  sc.lookup_mode = adapter::LookupMode::sync;
  auto scheduler = adapter::SchedulerAdapter::create(rt.executor(), sc);

  example::KvCache kv;
  auto reg = worker->register_kv_caches(kv.kv_layout(), kv.fd(), std::chrono::seconds(10));
  check(reg.has_value(), "register_kv_caches: " + reg.error().message());

  // Prefill two requests into blocks 0-31 and 32-63, then store both, each
  // from its own thread.
  kv.fill(example::block_range(0), 1);
  kv.fill(example::block_range(32), 2);
  auto a = std::async(std::launch::async, [&] { return worker->submit_store(example::spec("req-1", 1, 0)); });
  auto b = std::async(std::launch::async, [&] { return worker->submit_store(example::spec("req-2", 2, 32)); });
  for (const Result<wire::StoreResult>& s : {a.get(), b.get()}) {
    check(s.has_value(), "submit_store: " + s.error().message());
    check(s->stored_chunks == 2, "2 chunks stored per request");
  }

  // The scheduler finds both prompts, whole.
  for (std::uint32_t seed : {1u, 2u}) {
    const std::string id = "lookup-" + std::to_string(seed);
    check(scheduler->submit_lookup(id, example::prompt(seed)).has_value(), "submit_lookup");
    auto st = scheduler->check_lookup(id);
    check(st && st->ready, "check_lookup answers at once in sync mode");
    check(st->matched_tokens == example::prompt_tokens, "the whole prompt is cached");
    check(scheduler->end_session(id).has_value(), "end_session");
  }

  // Wipe the engine's blocks, retrieve both requests crosswise, compare.
  kv.fill(example::block_range(0, 64), 99);
  auto c = std::async(std::launch::async, [&] { return worker->submit_retrieve(example::spec("req-3", 1, 32)); });
  auto d = std::async(std::launch::async, [&] { return worker->submit_retrieve(example::spec("req-4", 2, 0)); });
  for (const Result<wire::RetrieveResult>& g : {c.get(), d.get()})
    check(g && g->retrieved_chunks == 2, "submit_retrieve: " + g.error().message());
  check(kv.holds(example::block_range(32), 1), "request 1's bytes came back into blocks 32-63");
  check(kv.holds(example::block_range(0), 2), "request 2's bytes came back into blocks 0-31");

  // get_finished: stores finish once the engine says the request finished;
  // retrieves as soon as they are done. A repeated report of one request is
  // reported once; a request loaded again under its id is reported again.
  auto fin = worker->get_finished({"req-1", "req-2"});
  check(fin.has_value(), "get_finished: " + fin.error().message());
  check(fin->stores.size() == 2 && fin->retrieves.size() == 2, "2 stores and 2 retrieves finished");
  auto again = worker->get_finished({"req-1", "req-2"});
  check(again && again->stores.empty() && again->retrieves.empty(), "nothing is reported twice");
  auto load_errors = worker->take_load_errors();
  check(load_errors && load_errors->empty(), "no load errors");

  check(worker->shutdown().has_value(), "shutdown");
  scheduler->stop();
  std::printf("blocking_engine: ok\n");
  return 0;
}
