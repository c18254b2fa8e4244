// kvlink-engine-sim: a small engine that uses both adapters the way vLLM's
// KV connector does, for demos, end-to-end tests and soak runs.
//
// Warmup (the gate stays closed: no heartbeat), then it registers a memfd
// KV cache, once, and runs requests with shared prefixes whether or not a
// server answers yet (the adapter sends the registration to the server as
// soon as one does; until then lookups miss and nothing is stored), one
// engine step after another: scheduler lookup -> allocate blocks -> worker
// retrieve of the hit -> "compute" the rest (a deterministic pattern per
// token, sim/workload.hpp) -> store -> get_finished frees the blocks.
// Every retrieved block is verified byte for byte; a block that failed to
// load is recomputed, as an engine does. The engine thread only makes
// blocking calls with deadlines and asynchronous transfers; it records the
// longest call.
//
// Output: JSON lines on stdout (health events in kvlink-cli watch's form
// with a "link" field, progress lines, a final summary); warnings on stderr.
// Exit 0; 1 when a retrieved block did not verify; 2 when it could not start
// or the server refused its KV cache (registration or chunk size).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <asio/post.hpp>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fmt/format.h>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "event_json.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"
#include "kvlink/log.hpp"
#include "kvlink/net/endpoint.hpp"
#include "kvlink/runtime/runtime.hpp"
#include "kvlink/transfer/kv_memfd.hpp"
#include "kvlink/version.hpp"
#include "sim/workload.hpp"

namespace {

using namespace std::chrono;
using namespace kvlink;
using kvlink::tools::json_string;
using kvlink::tools::unix_ms;

struct Options {
  std::string server = net::default_endpoint();
  std::string model = "sim-model";
  int warmup_ms = 1000;
  double duration_s = 10;
  std::uint64_t max_requests = 0;
  sim::WorkloadConfig workload;
  double rate = 20;
  std::uint32_t concurrency = 8;
  std::uint32_t layers = 4, block_size = 16, num_blocks = 0, kv_heads = 2, head_size = 64, dtype_bytes = 2;
  std::string lookup_mode = "two-phase";
  int call_timeout_ms = 1000;
  int transfer_timeout_ms = 5000;
  int deadline_ms = 2000;
  int health_interval_ms = 1000;
  int health_timeout_ms = 1000;
  int failure_threshold = 2;
  int success_threshold = 2;
  int progress_ms = 1000;
  std::string log_level = "warn";
};

// Every output line goes through here: the io thread prints health events,
// the engine thread the rest.
std::mutex out_mutex;
void emit(const std::string& line) {
  std::lock_guard lock(out_mutex);
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// Wakes the engine thread when a transfer completes.
struct Wake {
  std::mutex m;
  std::condition_variable cv;
  bool flag = false;
  void notify() {
    {
      std::lock_guard lock(m);
      flag = true;
    }
    cv.notify_one();
  }
  void wait_until(steady_clock::time_point t) {
    std::unique_lock lock(m);
    cv.wait_until(lock, t, [&] { return flag; });
    flag = false;
  }
};

// What transfer completions (on the io thread) report to the engine.
struct Shared {
  Wake wake;
  std::atomic<std::uint64_t> stored_chunks{0}, retrieved_chunks{0};
  std::atomic<std::int64_t> max_transfer_us{0};
  void transfer_took(steady_clock::duration d) {
    const auto us = duration_cast<microseconds>(d).count();
    auto cur = max_transfer_us.load();
    while (us > cur && !max_transfer_us.compare_exchange_weak(cur, us)) {
    }
  }
};

struct Active {
  sim::Request req;
  enum class Phase { lookup, blocks, loading, storing } phase = Phase::lookup;
  std::vector<std::uint32_t> blocks;
  std::uint32_t matched = 0;   // tokens the lookup matched
  bool store_done = false;     // get_finished reported the store: the blocks are free
};


struct Totals {
  std::uint64_t requests = 0, hit_tokens = 0, lookup_tokens = 0, verify_failures = 0, load_error_blocks = 0;
  std::uint64_t recomputed_blocks = 0;
  double max_call_ms = 0;
};

const char* state_of(adapter::WorkerAdapter& w) { return health::state_name(w.monitor().state()); }
const char* state_of(adapter::SchedulerAdapter& s) { return health::state_name(s.monitor().state()); }

// Runs `f` on the runtime's thread and waits for its result.
template <class F>
auto on_io(runtime::Runtime& rt, F f) {
  auto task = std::make_shared<std::packaged_task<decltype(f())()>>(std::move(f));
  auto fut = task->get_future();
  asio::post(rt.executor(), [task] { (*task)(); });
  return fut.get();
}

class Engine {
 public:
  Engine(const Options& o, runtime::Runtime& rt, std::shared_ptr<adapter::WorkerAdapter> w,
         std::shared_ptr<adapter::SchedulerAdapter> s, sim::KvView kv)
      : o_(o),
        rt_(rt),
        worker_(std::move(w)),
        scheduler_(std::move(s)),
        kv_(kv),
        gen_(o.workload),
        alloc_(kv.layout().num_blocks, o.workload.seed),
        deadline_(milliseconds(o.deadline_ms)) {}

  // Runs the workload for the configured time, then drains; or says why it
  // stopped early: the server refused the KV cache.
  Error run() {
    const auto start = steady_clock::now();
    const auto end = start + duration_cast<steady_clock::duration>(duration<double>(o_.duration_s));
    auto next_admit = start;
    auto next_progress = start + milliseconds(o_.progress_ms);
    const auto admit_gap = o_.rate > 0 ? duration_cast<steady_clock::duration>(duration<double>(1.0 / o_.rate))
                                       : steady_clock::duration::zero();
    std::optional<steady_clock::time_point> drain_until;
    for (;;) {
      const auto now = steady_clock::now();
      const bool admitting = now < end && (o_.max_requests == 0 || admitted_ < o_.max_requests);
      if (!admitting && !drain_until)
        drain_until = now + milliseconds(o_.transfer_timeout_ms + 2 * o_.deadline_ms + 1000);
      if (!admitting && (active_.empty() || now >= *drain_until)) break;
      if (auto err = refused()) {
        abandoned_ = active_.size();
        return err;
      }
      while (admitting && active_.size() < o_.concurrency && now >= next_admit &&
             (o_.max_requests == 0 || admitted_ < o_.max_requests)) {
        admit();
        next_admit += admit_gap;
        if (now - next_admit > seconds(1)) next_admit = now;  // no burst after a stall
      }
      step();
      if (steady_clock::now() >= next_progress) {
        progress(start);
        next_progress += milliseconds(o_.progress_ms);
        if (next_progress <= steady_clock::now())  // after a stall: no burst of lines
          next_progress = steady_clock::now() + milliseconds(o_.progress_ms);
        // The library drops a registration only when the server refuses it.
        refusal_ = on_io(rt_, [w = worker_] { return w->registration_refusal(); });
      }
      // Sleep until something is due; a completed transfer wakes us.
      auto wake_at = std::min(next_progress, steady_clock::now() + (lookups_pending() ? milliseconds(2) : milliseconds(20)));
      if (admitting && active_.size() < o_.concurrency) wake_at = std::min(wake_at, next_admit);
      shared_->wake.wait_until(wake_at);
    }
    progress(start);
    abandoned_ = active_.size();
    return {};
  }

  const Totals& totals() const { return t_; }
  const Shared& shared() const { return *shared_; }
  std::size_t abandoned() const { return abandoned_; }
  std::chrono::milliseconds deadline() const { return duration_cast<milliseconds>(deadline_); }

 private:
  // Times one blocking call (the longest one is reported).
  template <class F>
  auto timed(F f) {
    const auto t0 = steady_clock::now();
    auto r = f();
    t_.max_call_ms = std::max(t_.max_call_ms, duration<double, std::milli>(steady_clock::now() - t0).count());
    return r;
  }

  // Why the engine cannot use the server at all, or "": the server's chunk
  // size (known once it answered HELLO) does not fit the engine's blocks, or
  // it refused the registration (sent by the adapter when the server came).
  Error refused() const {
    const auto chunk = worker_->monitor().server_chunk_size();
    if (chunk != 0 && chunk % o_.block_size != 0)
      return Error(errc::bad_request, fmt::format("the server's chunk size {} is not a multiple of --block-size {}",
                                                  chunk, o_.block_size));
    if (!refusal_.empty())
      return Error(errc::bad_request, "stopping: registration refused by the server: " + refusal_);
    return {};
  }

  bool lookups_pending() const {
    return std::any_of(active_.begin(), active_.end(),
                       [](const auto& a) { return a.second.phase == Active::Phase::lookup; });
  }

  void admit() {
    Active a;
    a.req = gen_.next();
    ++admitted_;
    const std::string id = a.req.id;
    // Degraded: not sent, 0 matched (check_lookup says so). Either way the
    // request goes on; the engine computes what is not loaded.
    (void)timed([&] { return scheduler_->submit_lookup(id, a.req.tokens, deadline_); });
    active_.emplace(id, std::move(a));
  }

  void step() {
    for (auto& [id, a] : active_) {
      if (a.phase == Active::Phase::lookup) {
        auto r = timed([&] { return scheduler_->check_lookup(id, deadline_); });
        if (!r) {  // timed out, or lost: treat as a miss
          a.matched = 0;
          a.phase = Active::Phase::blocks;
        } else if (r->ready) {
          a.matched = std::min<std::uint32_t>(r->matched_tokens, static_cast<std::uint32_t>(a.req.tokens.size()));
          t_.lookup_tokens += a.matched;
          a.phase = Active::Phase::blocks;
        }
      }
      if (a.phase == Active::Phase::blocks) start_request(id, a);
    }
    if (!report_.empty() || std::any_of(active_.begin(), active_.end(), [](const auto& e) {
          return e.second.phase == Active::Phase::loading || e.second.phase == Active::Phase::storing;
        }))
      finish_step();
  }

  // Blocks allocated: retrieve the hit, or compute and store at once.
  void start_request(const std::string& id, Active& a) {
    auto blocks = alloc_.allocate(sim::blocks_for(a.req.tokens.size(), o_.block_size));
    if (!blocks) return;  // wait for blocks to be freed
    a.blocks = std::move(*blocks);
    if (a.matched == 0) return compute_and_store(id, a, {});
    const std::span<const std::uint32_t> hit(a.blocks.data(), a.matched / o_.block_size);
    sim::poison_blocks(kv_, hit);  // a block the retrieve does not fill fails verification
    adapter::TransferSpec spec;
    spec.request_id = id;
    spec.tokens.assign(a.req.tokens.begin(), a.req.tokens.begin() + a.matched);
    spec.block_ids.assign(hit.begin(), hit.end());
    a.phase = Active::Phase::loading;
    worker_->async_submit_retrieve(
        std::move(spec), [sh = shared_, t0 = steady_clock::now()](std::error_code ec, wire::RetrieveResult r) {
          if (!ec) sh->retrieved_chunks += r.retrieved_chunks;
          sh->transfer_took(steady_clock::now() - t0);
          sh->wake.notify();
        });
  }

  // Computes every token not loaded (blocks in `loaded` are), then stores
  // the request's full chunks and reports the request finished.
  void compute_and_store(const std::string& id, Active& a, const std::vector<bool>& loaded) {
    const auto n = static_cast<std::uint32_t>(a.req.tokens.size());
    for (std::uint32_t b = 0; b * o_.block_size < n; ++b) {
      if (b < loaded.size() && loaded[b]) continue;
      sim::fill_tokens(kv_, a.req.tokens, a.blocks, b * o_.block_size, std::min(n, (b + 1) * o_.block_size));
    }
    adapter::TransferSpec spec;
    spec.request_id = id;
    spec.tokens = a.req.tokens;
    spec.block_ids = a.blocks;
    a.phase = Active::Phase::storing;
    worker_->async_submit_store(std::move(spec), [sh = shared_, t0 = steady_clock::now()](std::error_code ec,
                                                                                          wire::StoreResult r) {
      if (!ec) sh->stored_chunks += r.stored_chunks;
      sh->transfer_took(steady_clock::now() - t0);
      sh->wake.notify();
    });
    report_.push_back(id);  // the engine is done with it: its stores may be reported
  }

  // get_finished: verify loaded blocks, free the blocks of stored requests.
  void finish_step() {
    auto fin = timed([&] { return worker_->get_finished(report_, deadline_); });
    if (!fin) return;  // try again next step (report_ is kept)
    report_.clear();
    auto errors = timed([&] { return worker_->take_load_errors(deadline_); });
    if (errors) {
      t_.load_error_blocks += errors->size();
      load_errors_.insert(errors->begin(), errors->end());
    }
    for (const auto& id : fin->retrieves) {
      auto it = active_.find(id);
      if (it != active_.end() && it->second.phase == Active::Phase::loading) verify_loaded(id, it->second);
    }
    for (const auto& id : fin->stores) {
      auto it = active_.find(id);
      if (it != active_.end()) it->second.store_done = true;
    }
    for (auto it = active_.begin(); it != active_.end();) {
      auto& a = it->second;
      // Like vLLM, trust get_finished: the adapter reports a store only once
      // the server can no longer read its blocks, so they are reused at once.
      if (a.phase == Active::Phase::storing && a.store_done) {
        alloc_.release(a.blocks);
        (void)timed([&] { return scheduler_->end_session(it->first, deadline_); });  // degraded: dropped, state freed
        ++t_.requests;
        it = active_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void verify_loaded(const std::string& id, Active& a) {
    const std::uint32_t hit_blocks = a.matched / o_.block_size;
    std::vector<bool> loaded(hit_blocks, false);
    for (std::uint32_t b = 0; b < hit_blocks; ++b) {
      const std::uint32_t block = a.blocks[b];
      if (load_errors_.erase(block)) {
        ++t_.recomputed_blocks;
        continue;  // failed to load: computed below
      }
      std::uint64_t bad = 0;
      auto where = sim::verify_tokens(kv_, a.req.tokens, a.blocks, b * o_.block_size, (b + 1) * o_.block_size, 1, &bad);
      if (bad == 0) {
        loaded[b] = true;
        t_.hit_tokens += o_.block_size;
        continue;
      }
      ++t_.verify_failures;  // recomputed below, but counted: the server returned wrong bytes
      if (t_.verify_failures <= 20)
        emit(fmt::format(R"({{"ts_ms":{},"event":"verify_failure","request":{},"block_index":{},"block":{},)"
                         R"("token":{},"layer":{},"plane":{},"bad_token_slices":{}}})",
                         unix_ms(), json_string(id), b, block, where[0].position, where[0].layer, where[0].plane, bad));
    }
    compute_and_store(id, a, loaded);
  }

  void progress(steady_clock::time_point start) {
    emit(fmt::format(R"({{"ts_ms":{},"event":"progress","t_s":{:.1f},"requests":{},"hit_tokens":{},)"
                     R"("load_error_blocks":{},"verify_failures":{},"active":{},"worker":"{}","scheduler":"{}"}})",
                     unix_ms(), duration<double>(steady_clock::now() - start).count(), t_.requests, t_.hit_tokens,
                     t_.load_error_blocks, t_.verify_failures, active_.size(), state_of(*worker_),
                     state_of(*scheduler_)));
  }

  const Options& o_;
  runtime::Runtime& rt_;
  std::shared_ptr<adapter::WorkerAdapter> worker_;
  std::shared_ptr<adapter::SchedulerAdapter> scheduler_;
  sim::KvView kv_;
  sim::RequestGenerator gen_;
  sim::BlockAllocator alloc_;
  Duration deadline_;
  std::shared_ptr<Shared> shared_ = std::make_shared<Shared>();
  std::map<std::string, Active> active_;
  std::vector<std::string> report_;       // finished by the engine, for the next get_finished
  std::set<std::uint32_t> load_errors_;   // reported, not yet matched to a finished retrieve
  std::uint64_t admitted_ = 0;
  std::size_t abandoned_ = 0;
  std::string refusal_;  // the server's reason, once it refused the registration
  Totals t_;
};

health::Config health_config(const Options& o) {
  health::Config c;
  c.interval = milliseconds(o.health_interval_ms);
  c.ping_timeout = milliseconds(o.health_timeout_ms);
  c.connect_timeout = milliseconds(o.health_timeout_ms);
  c.failure_threshold = o.failure_threshold;
  c.success_threshold = o.success_threshold;
  return c;
}

int fail_start(const std::string& why) {
  fmt::print(stderr, "kvlink-engine-sim: {}\n", why);
  return 2;
}

int run(const Options& o) {
  if (auto err = sim::check(o.workload)) return fail_start(err.message());
  auto parsed = net::parse_endpoint(o.server);
  if (!parsed) return fail_start(parsed.error().message());
  const net::Endpoint& ep = *parsed;
  if (!ep.is_unix())
    return fail_start(fmt::format("--server {} is not a unix socket: the CPU KV cache (a memfd) can only be passed "
                                  "over unix:/path endpoints", o.server));
  if (o.deadline_ms < o.call_timeout_ms)
    return fail_start(fmt::format("--deadline-ms {} is below --call-timeout-ms {}: a blocking call would give up "
                                  "before the remote call's own deadline",
                                  o.deadline_ms, o.call_timeout_ms));
  const std::uint32_t per_request = sim::blocks_for(o.workload.max_prompt_tokens, o.block_size);
  // Default: room for twice the concurrency (while a stopped server holds
  // transfers unanswered, their blocks stay taken until the transfer
  // deadline; that must not starve the engine).
  const std::uint32_t num_blocks = o.num_blocks ? o.num_blocks : 2 * per_request * o.concurrency;
  if (num_blocks < per_request)
    return fail_start(fmt::format("--num-blocks {} cannot hold one prompt of --max-prompt-tokens {} ({} blocks of {})",
                                  num_blocks, o.workload.max_prompt_tokens, per_request, o.block_size));
  const auto lay = wire::paged_layout(o.layers, num_blocks, o.block_size, o.kv_heads, o.head_size, o.dtype_bytes);
  if (auto err = lay.check()) return fail_start("KV layout: " + err.message());

  auto kv = transfer::create_kv_memfd(lay, {.name = "kvlink-engine-sim-kv"});
  if (!kv) return fail_start(fmt::format("cannot create the {} byte KV cache: {}", lay.region_bytes, kv.error().message()));

  runtime::Runtime rt;
  adapter::WorkerConfig wc;
  wc.endpoint = o.server;
  wc.model = o.model;
  wc.call_timeout = milliseconds(o.call_timeout_ms);
  wc.transfer_timeout = milliseconds(o.transfer_timeout_ms);
  wc.blocking_deadline = milliseconds(o.deadline_ms);
  wc.health = health_config(o);
  wc.name = "engine-sim worker";
  adapter::SchedulerConfig sc;
  sc.endpoint = o.server;
  sc.model = o.model;
  sc.lookup_mode = o.lookup_mode == "sync" ? adapter::LookupMode::sync : adapter::LookupMode::two_phase;
  sc.call_timeout = milliseconds(o.call_timeout_ms);
  sc.blocking_deadline = milliseconds(o.deadline_ms);
  sc.health = health_config(o);
  sc.name = "engine-sim scheduler";
  std::shared_ptr<adapter::WorkerAdapter> worker;
  std::shared_ptr<adapter::SchedulerAdapter> scheduler;
  try {
    worker = adapter::WorkerAdapter::create(rt.executor(), wc);
    scheduler = adapter::SchedulerAdapter::create(rt.executor(), sc);
  } catch (const std::exception& e) {
    return fail_start(e.what());
  }
  on_io(rt, [&] {
    worker->monitor().on_event([](const health::Event& e) { emit(tools::event_json(e, "worker")); });
    scheduler->monitor().on_event([](const health::Event& e) { emit(tools::event_json(e, "scheduler")); });
    return 0;
  });
  for (auto [link, m] : {std::pair{"worker", &worker->monitor()}, std::pair{"scheduler", &scheduler->monitor()}})
    m->gate().subscribe([link = std::string(link)](std::string_view reason) {
      emit(fmt::format(R"({{"ts_ms":{},"link":"{}","event":"gate","reason":{}}})", unix_ms(), link,
                       json_string(reason)));
    });
  emit(fmt::format(R"({{"ts_ms":{},"event":"start","server":{},"pid":{},"layers":{},"num_blocks":{},)"
                   R"("block_size":{},"kv_bytes":{},"warmup_ms":{},"duration_s":{}}})",
                   unix_ms(), json_string(o.server), ::getpid(), o.layers, num_blocks, o.block_size,
                   lay.region_bytes, o.warmup_ms, o.duration_s));

  // Warmup: the model loads; the gate is closed, so no heartbeat runs.
  std::this_thread::sleep_for(milliseconds(o.warmup_ms));
  const auto pings = on_io(rt, [&] {
    return worker->monitor().counters().pings_sent + scheduler->monitor().counters().pings_sent;
  });
  emit(fmt::format(R"({{"ts_ms":{},"event":"warmup_done","warmup_ms":{},"pings_during_warmup":{},"worker":"{}"}})",
                   unix_ms(), o.warmup_ms, pings, state_of(*worker)));

  // Register the KV cache, once, as an engine does after loading its model.
  // The adapter keeps the registration and sends it to the server as soon as
  // one answers (also when the engine starts before the server); the
  // worker's gate opens on its acknowledgement. Only a refusal is final.
  auto r = worker->register_kv_caches(lay, kv->fd.get(), milliseconds(o.deadline_ms));
  if (r.error() == errc::bad_request) {
    (void)worker->shutdown(milliseconds(o.deadline_ms));  // best effort: we are failing anyway
    scheduler->stop();
    const auto why = on_io(rt, [&] { return worker->registration_refusal(); });
    return fail_start(fmt::format("could not register the KV cache ({}): registration refused by the server: {}",
                                  r.error().message(), why));
  }
  if (!r)
    emit(fmt::format(R"({{"ts_ms":{},"event":"register_pending","error":{},"call_timeout_ms":{}}})", unix_ms(),
                     json_string(r.error().message()), o.call_timeout_ms));
  else
    emit(fmt::format(R"({{"ts_ms":{},"event":"registered","kv_bytes":{},"chunk_size":{}}})", unix_ms(),
                     lay.region_bytes, worker->monitor().server_chunk_size()));

  Engine engine(o, rt, worker, scheduler, sim::KvView(kv->memory.get(), lay));
  const Error fatal = engine.run();
  const auto rereg = on_io(rt, [&] { return worker->reregistrations(); });
  (void)worker->shutdown(milliseconds(o.deadline_ms));  // a failure is logged; the server reaps the rest
  scheduler->stop();
  const auto& t = engine.totals();
  emit(fmt::format(R"({{"ts_ms":{},"event":"summary","requests":{},"hit_tokens":{},"stored_chunks":{},)"
                   R"("retrieved_chunks":{},"verify_failures":{},"load_error_blocks":{},"max_call_ms":{:.1f},)"
                   R"("deadline_ms":{},"max_transfer_ms":{:.1f},"transfer_timeout_ms":{},"lookup_hit_tokens":{},)"
                   R"("recomputed_blocks":{},"reregistrations":{},"unfinished":{}}})",
                   unix_ms(), t.requests, t.hit_tokens, engine.shared().stored_chunks.load(),
                   engine.shared().retrieved_chunks.load(), t.verify_failures, t.load_error_blocks, t.max_call_ms,
                   o.deadline_ms, engine.shared().max_transfer_us.load() / 1000.0, o.transfer_timeout_ms,
                   t.lookup_tokens, t.recomputed_blocks, rereg, engine.abandoned()));
  rt.stop();
  if (fatal) return fail_start(fatal.message());
  return t.verify_failures > 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvlink-engine-sim: an engine using the scheduler and worker adapters against a kvlink-server; "
               "prints JSON lines (health events, progress, summary)"};
  app.set_version_flag("--version", std::string("kvlink-engine-sim ") + kvlink::version_string);
  Options o;
  app.add_option("--server,-s", o.server, "Server endpoint (unix:/path: the KV memfd is passed over it)")
      ->capture_default_str();
  app.add_option("--model", o.model, "Model name (part of the cache namespace)")->capture_default_str();
  app.add_option("--warmup-ms", o.warmup_ms, "Simulated model load before registering (the gate stays closed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600000));
  app.add_option("--duration-s", o.duration_s, "Time to admit requests for (then it drains)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e7));
  app.add_option("--requests", o.max_requests, "Stop admitting after this many requests (0: no limit)")
      ->capture_default_str();
  app.add_option("--seed", o.workload.seed, "Seed of the workload (prompts, block order)")->capture_default_str();
  app.add_option("--prefixes", o.workload.prefixes, "Distinct shared prefixes")->capture_default_str();
  app.add_option("--prefix-tokens", o.workload.prefix_tokens, "Tokens of each shared prefix")->capture_default_str();
  app.add_option("--min-prompt-tokens", o.workload.min_prompt_tokens, "Shortest prompt")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  app.add_option("--max-prompt-tokens", o.workload.max_prompt_tokens, "Longest prompt")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  app.add_option("--share-ratio", o.workload.share_ratio, "Fraction of requests starting with a shared prefix")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--rate", o.rate, "Requests admitted per second (0: as fast as --concurrency allows)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  app.add_option("--concurrency", o.concurrency, "Requests in flight at once")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  app.add_option("--layers", o.layers, "Model layers")->capture_default_str()->check(CLI::Range(1u, 1024u));
  app.add_option("--block-size", o.block_size, "Tokens per KV block (the server's chunk size must be a multiple)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 65536u));
  app.add_option("--num-blocks", o.num_blocks, "KV blocks of the cache (0: twice --concurrency longest prompts)")
      ->capture_default_str();
  app.add_option("--kv-heads", o.kv_heads, "KV heads")->capture_default_str()->check(CLI::Range(1u, 1024u));
  app.add_option("--head-size", o.head_size, "Elements per head")->capture_default_str()->check(CLI::Range(1u, 65536u));
  app.add_option("--dtype-bytes", o.dtype_bytes, "Bytes per element")->capture_default_str()->check(CLI::Range(1u, 8u));
  app.add_option("--lookup-mode", o.lookup_mode, "two-phase (LOOKUP + polling) or sync (SYNC_LOOKUP)")
      ->capture_default_str()
      ->check(CLI::IsMember({"two-phase", "sync"}));
  app.add_option("--call-timeout-ms", o.call_timeout_ms, "Deadline of each remote call (lookup, register, ...)")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  app.add_option("--transfer-timeout-ms", o.transfer_timeout_ms, "Deadline of each STORE/RETRIEVE")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  app.add_option("--deadline-ms", o.deadline_ms, "Deadline of every blocking call the engine makes")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  app.add_option("--health-interval-ms", o.health_interval_ms, "Time between pings")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  app.add_option("--health-timeout-ms", o.health_timeout_ms, "Deadline of each ping and connect")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600000));
  app.add_option("--failure-threshold", o.failure_threshold, "Consecutive failures that mean degraded")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--success-threshold", o.success_threshold, "Consecutive successes that mean healthy again")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--progress-ms", o.progress_ms, "Time between progress lines")
      ->capture_default_str()
      ->check(CLI::Range(10, 3600000));
  app.add_option("--log-level", o.log_level, "Library log level on stderr: debug, info, warn, error or off")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  auto level = log::parse_level(o.log_level);
  if (!level) return fail_start("--log-level: " + level.error().message());
  log::set_level(*level);
  try {
    return run(o);
  } catch (const std::exception& e) {
    return fail_start(e.what());
  }
}
