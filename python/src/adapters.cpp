#include "adapters.hpp"

#include <asio/post.hpp>
#include <asio/use_future.hpp>
#include <cmath>
#include <cstring>

#include "call.hpp"
#include "record.hpp"
#include "kvlink/adapter/metrics.hpp"

namespace kvlink::python {

using adapter::SchedulerAdapter;
using adapter::WorkerAdapter;
using Timeout = std::optional<double>;

Duration deadline(std::optional<double> seconds) {
  if (!seconds) return {};
  if (!std::isfinite(*seconds) || *seconds <= 0 || *seconds > 1e9)
    throw py::value_error("timeout must be a number of seconds above 0 (or None for the adapter's default), got " +
                          py::repr(py::float_(*seconds)).cast<std::string>());
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(*seconds));
}

namespace {

// What Python's on_event callbacks receive.
struct PyEvent {
  std::string kind;  // transition, notice, connected, disconnected
  health::State from = health::State::warming;
  health::State to = health::State::warming;
  std::string reason;  // a transition's
  std::string notice;  // what happened, in words
  double outage = 0;   // degraded -> healthy: seconds the outage lasted
};

PyEvent to_py_event(const health::Event& e) {
  static constexpr const char* kinds[] = {"transition", "notice", "connected", "disconnected"};
  return {kinds[static_cast<int>(e.kind)], e.transition.from, e.transition.to, e.transition.reason, e.notice,
          std::chrono::duration<double>(e.transition.outage).count()};
}

// The adapter metrics as a dict: state, per-operation calls, worker and
// scheduler totals (metrics_text() has everything, as Prometheus text).
py::dict metrics_dict(const adapter::AdapterMetrics& m) {
  py::dict d;
  d["state"] = m.health.state;
  // The link's heartbeat and connection counters (health::Counters).
  const auto& h = m.health.counters;
  py::dict health;
  health["pings_sent"] = h.pings_sent;
  health["pings_ok"] = h.pings_ok;
  health["pings_failed"] = h.pings_failed;
  health["deadlines_missed"] = h.deadlines_missed;
  health["connects_ok"] = h.connects_ok;
  health["connects_failed"] = h.connects_failed;
  health["connections_lost"] = h.connections_lost;
  health["hellos_repeated"] = h.hellos_repeated;
  health["planned_restarts"] = h.planned_restarts;
  health["transitions"] = h.transitions;
  health["last_rtt"] = std::chrono::duration<double>(h.last_rtt).count();
  py::dict seconds_in;
  for (int i = 0; i < health::state_count; ++i)
    seconds_in[health::state_name(static_cast<health::State>(i))] =
        std::chrono::duration<double>(h.time_in_state[i]).count();
  health["seconds_in_state"] = seconds_in;
  d["health"] = health;
  py::dict calls;
  for (auto op : adapter::ops_of(m.role)) {
    const auto& c = m.call(op);
    py::dict errors;
    for (const auto& [name, n] : c.errors) errors[py::str(name)] = n;
    calls[adapter::op_name(op)] = py::dict(py::arg("calls") = c.calls, py::arg("failed") = c.failed,
                                           py::arg("degraded") = c.degraded, py::arg("errors") = errors);
  }
  d["calls"] = calls;
  if (m.role == adapter::AdapterRole::worker) {
    d["stored_bytes"] = m.stored_bytes;
    d["retrieved_bytes"] = m.retrieved_bytes;
    d["stored_chunks"] = m.stored_chunks;
    d["skipped_chunks"] = m.skipped_chunks;
    d["retrieved_chunks"] = m.retrieved_chunks;
    d["load_errors"] = m.load_errors;
    d["load_error_blocks"] = m.load_error_blocks;
    d["registered"] = m.registered;
    d["reregistrations"] = m.reregistrations;
    d["registrations_refused"] = m.registrations_refused;
  } else {
    d["lookup_tokens"] = m.lookup_tokens;
    d["lookup_hit_tokens"] = m.lookup_hit_tokens;
  }
  return d;
}

// Both adapters' shared methods.
template <class Adapter>
void bind_common(py::class_<PyAdapter<Adapter>>& cls) {
  using P = PyAdapter<Adapter>;
  cls.def_property_readonly("runtime", &P::runtime)
      .def_property_readonly("state", [](P& a) { return a.get().monitor().state(); }, "The link's health (State).")
      .def_property_readonly("draining", [](P& a) { return a.get().monitor().draining(); },
                             "The server announced a planned restart.")
      .def_property_readonly("chunk_size",
                             [](P& a) {
                               const auto own = a.get().config().chunk_size;
                               return own ? own : a.get().monitor().server_chunk_size();
                             },
                             "Tokens per chunk: the config's, else the server's (0 before its HELLO).")
      .def_property_readonly("namespace_id", [](P& a) { return a.get().namespace_id(); })
      .def_property_readonly("instance_id", [](P& a) { return a.get().monitor().instance_id(); })
      .def("ready", [](P& a) { a.get().ready(); }, "The engine is ready: opens the warmup gate (pings start).")
      .def_property_readonly("gate_open", [](P& a) { return a.get().monitor().gate().is_open(); })
      .def("on_event", &P::on_event, py::arg("fn"),
           "fn(event) for every health event of the link, run inside Runtime.poll().")
      .def("ping", &P::ping, py::arg("timeout") = py::none(),
           "Sends one PING now and waits for it; the round trip in seconds. Raises kvlink.Error.")
      .def("metrics", [](P& a) { return metrics_dict(a.get().metrics()); }, "Counters and health, as a dict.")
      .def(
          "metrics_text", [](P& a) { return adapter::prometheus_text(a.get().metrics()); },
          "The adapter's metrics as Prometheus text.");
}

// A TransferSpec's chunk hashes as 16-byte strings (lo then hi, little-endian).
py::list hashes_to_python(const std::vector<wire::ChunkHash>& hashes) {
  py::list out;
  for (const auto& h : hashes) out.append(py::bytes(reinterpret_cast<const char*>(&h), sizeof h));
  return out;
}
std::vector<wire::ChunkHash> hashes_from_python(const py::iterable& items) {
  std::vector<wire::ChunkHash> out;
  for (auto item : items) {
    const std::string b = py::cast<py::bytes>(item);
    if (b.size() != sizeof(wire::ChunkHash))
      throw py::value_error("a chunk hash is 16 bytes, got " + std::to_string(b.size()));
    wire::ChunkHash h;
    std::memcpy(&h, b.data(), sizeof h);
    out.push_back(h);
  }
  return out;
}

}  // namespace

template <class Adapter>
PyAdapter<Adapter>::PyAdapter(py::object runtime, std::shared_ptr<Adapter> adapter)
    : runtime_(std::move(runtime)), adapter_(std::move(adapter)) {
  // Events reach Python through the host queue: the monitor's callback runs
  // on the io thread and only posts a copy.
  auto hex = runtime_.cast<PyRuntime&>().get().host_executor();
  asio::post(adapter_->get_executor(),
             [monitor = adapter_->shared_monitor(), hex, weak = std::weak_ptr<PyObjects>(events_)] {
               monitor->on_event([hex, weak](const health::Event& e) {
                 asio::post(hex, [weak, e = to_py_event(e)] {
                   auto callbacks = weak.lock();
                   if (!callbacks || callbacks->empty()) return;
                   py::object event = py::cast(e);
                   for (const auto& fn : callbacks->items()) {
                     try {
                       fn(event);
                     } catch (py::error_already_set& err) {
                       err.discard_as_unraisable("kvlink on_event callback");
                     }
                   }
                 });
               });
             });
}

template <class Adapter>
void PyAdapter<Adapter>::on_event(py::object fn) {
  events_->add(std::move(fn));
}

template <class Adapter>
double PyAdapter<Adapter>::ping(std::optional<double> timeout) {
  const Duration limit = timeout ? deadline(timeout) : get().config().call_timeout;
  auto monitor = get().shared_monitor();
  Error error;
  Duration rtt{};
  {
    py::gil_scoped_release release;
    if (auto conn = monitor->connection()) {
      const auto start = Clock::now();
      try {
        conn->async_call(wire::PingRequest{}, limit, asio::use_future).get();
        rtt = Clock::now() - start;
      } catch (const std::system_error& e) {
        error = Error(e.code());
      }
    } else {
      error = Error(errc::not_connected, "no connection to the kvlink server now (it is down or not reached yet)");
    }
  }
  if (error) raise(error);
  return std::chrono::duration<double>(rtt).count();
}

template class PyAdapter<SchedulerAdapter>;
template class PyAdapter<WorkerAdapter>;

void bind_adapters(py::module_& m) {
  Record<PyEvent>(m, "Event", "A health event of an adapter's link (on_event).")
      .field("kind", &PyEvent::kind, "transition, notice, connected or disconnected")
      .field("from_state", &PyEvent::from)
      .field("to_state", &PyEvent::to)
      .field("reason", &PyEvent::reason)
      .field("notice", &PyEvent::notice)
      .field("outage", &PyEvent::outage, "degraded -> healthy: seconds the outage lasted")
      .done();
  using adapter::LookupStatus;
  Record<LookupStatus>(m, "LookupStatus", "check_lookup's answer: pending, or ready with the matched prefix.")
      .field("ready", &LookupStatus::ready)
      .field("matched_tokens", &LookupStatus::matched_tokens)
      .done();
  Record<wire::StoreResult>(m, "StoreResult")
      .field("stored_chunks", &wire::StoreResult::stored_chunks)
      .field("skipped_chunks", &wire::StoreResult::skipped_chunks, "present, locked, or no room")
      .done();
  Record<wire::RetrieveResult>(m, "RetrieveResult").field("retrieved_chunks", &wire::RetrieveResult::retrieved_chunks).done();
  using adapter::FinishedSets;
  Record<FinishedSets>(m, "FinishedSets", "get_finished's answer: request ids whose stores / retrieves finished.")
      .field("stores", &FinishedSets::stores)
      .field("retrieves", &FinishedSets::retrieves)
      .done();
  using adapter::TransferSpec;
  Record<TransferSpec>(m, "TransferSpec",
                       "One store or retrieve of one request: token ids (their full chunks are hashed) or chunk "
                       "hashes, and the engine blocks holding each chunk, chunk after chunk.")
      .field("request_id", &TransferSpec::request_id)
      .field("tokens", &TransferSpec::tokens)
      .field("block_ids", &TransferSpec::block_ids)
      .field("skip_first_n_tokens", &TransferSpec::skip_first_n_tokens, "retrieve only: tokens already in the engine")
      .property(
          "hashes", [](const TransferSpec& s) { return hashes_to_python(s.hashes); },
          [](TransferSpec& s, const py::iterable& h) { s.hashes = hashes_from_python(h); }, "16-byte chunk hashes")
      .property(
          "engine_event",
          [](const TransferSpec& s) {
            return py::bytes(reinterpret_cast<const char*>(s.engine_event.data()), s.engine_event.size());
          },
          [](TransferSpec& s, const py::bytes& b) {
            const std::string v = b;
            s.engine_event.assign(reinterpret_cast<const std::byte*>(v.data()),
                                  reinterpret_cast<const std::byte*>(v.data()) + v.size());
          },
          "CUDA: the EngineEvent handle recorded before this call")
      .done();

  // Each call: name(args..., timeout=None) blocks with the GIL released and
  // raises kvlink.Error; async_name(args...) returns a kvlink.Call.
  py::class_<PyScheduler> sched(m, "SchedulerAdapter",
                                "The scheduler side: prefix lookups, lookup locks, session ends (docs/adapters.md).");
  sched.def(py::init([](py::object rt, adapter::SchedulerConfig config) {
              auto& runtime = rt.cast<PyRuntime&>();
              if (runtime.stopped()) raise(Error(errc::shutting_down, "the Runtime is stopped: create a new one"));
              auto a = SchedulerAdapter::create(runtime.get().executor(), std::move(config));
              return std::make_unique<PyScheduler>(rt, std::move(a));
            }),
            py::arg("runtime"), py::arg("config"));
  bind_common(sched);
  sched
      .def("stop", [](PyScheduler& a) { a.get().stop(); }, "Stops the monitor it owns. Idempotent.")
      .def(
          "submit_lookup",
          [](PyScheduler& a, std::string id, std::vector<store::Token> tokens, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.submit_lookup(std::move(id), std::move(tokens), d); });
          },
          py::arg("request_id"), py::arg("tokens"), py::arg("timeout") = py::none(),
          "Starts a lookup of the tokens' full chunks (a second one for the same id is ignored).")
      .def(
          "async_submit_lookup",
          [](PyScheduler& a, std::string id, std::vector<store::Token> tokens) {
            return start_call<adapter::Done>(a.runtime(), [&](auto h) {
              a.get().async_submit_lookup(std::move(id), std::move(tokens), std::move(h));
            });
          },
          py::arg("request_id"), py::arg("tokens"))
      .def(
          "check_lookup",
          [](PyScheduler& a, std::string id, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.check_lookup(std::move(id), d); });
          },
          py::arg("request_id"), py::arg("timeout") = py::none(),
          "LookupStatus: pending, or ready with the matched tokens. Unknown id: not_found.")
      .def(
          "async_check_lookup",
          [](PyScheduler& a, std::string id) {
            return start_call<adapter::LookupStatus>(
                a.runtime(), [&](auto h) { a.get().async_check_lookup(std::move(id), std::move(h)); });
          },
          py::arg("request_id"))
      .def(
          "free_lookup_locks",
          [](PyScheduler& a, std::string id, std::uint32_t start, std::uint32_t end, Timeout t) {
            return run_blocking(
                [&, d = deadline(t), &ad = a.get()] { return ad.free_lookup_locks(std::move(id), start, end, d); });
          },
          py::arg("request_id"), py::arg("start_chunk"), py::arg("end_chunk"), py::arg("timeout") = py::none(),
          "Releases the lookup's read locks on chunks [start_chunk, end_chunk).")
      .def(
          "async_free_lookup_locks",
          [](PyScheduler& a, std::string id, std::uint32_t start, std::uint32_t end) {
            return start_call<adapter::Done>(a.runtime(), [&](auto h) {
              a.get().async_free_lookup_locks(std::move(id), start, end, std::move(h));
            });
          },
          py::arg("request_id"), py::arg("start_chunk"), py::arg("end_chunk"))
      .def(
          "end_session",
          [](PyScheduler& a, std::string id, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.end_session(std::move(id), d); });
          },
          py::arg("request_id"), py::arg("timeout") = py::none(), "END_SESSION, then drops the request's state.")
      .def(
          "async_end_session",
          [](PyScheduler& a, std::string id) {
            return start_call<adapter::Done>(a.runtime(),
                                             [&](auto h) { a.get().async_end_session(std::move(id), std::move(h)); });
          },
          py::arg("request_id"))
      .def(
          "report_block_allocation",
          [](PyScheduler& a, std::string id, std::uint32_t allocated, std::uint32_t total, Timeout t) {
            return run_blocking(
                [&, d = deadline(t), &ad = a.get()] { return ad.report_block_allocation(std::move(id), allocated, total, d); });
          },
          py::arg("request_id"), py::arg("allocated_blocks"), py::arg("total_blocks"), py::arg("timeout") = py::none())
      .def(
          "async_report_block_allocation",
          [](PyScheduler& a, std::string id, std::uint32_t allocated, std::uint32_t total) {
            return start_call<adapter::Done>(a.runtime(), [&](auto h) {
              a.get().async_report_block_allocation(std::move(id), allocated, total, std::move(h));
            });
          },
          py::arg("request_id"), py::arg("allocated_blocks"), py::arg("total_blocks"))
      .def(
          "cleanup",
          [](PyScheduler& a, std::string id, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.cleanup(std::move(id), d); });
          },
          py::arg("request_id"), py::arg("timeout") = py::none(), "Drops the request's local state (nothing is sent).")
      .def(
          "async_cleanup",
          [](PyScheduler& a, std::string id) {
            return start_call<adapter::Done>(a.runtime(),
                                             [&](auto h) { a.get().async_cleanup(std::move(id), std::move(h)); });
          },
          py::arg("request_id"));

  py::class_<PyWorker> worker(m, "WorkerAdapter",
                              "The worker side: KV-cache registration, stores, retrieves, get_finished "
                              "(docs/adapters.md).");
  worker.def(py::init([](py::object rt, adapter::WorkerConfig config) {
               auto& runtime = rt.cast<PyRuntime&>();
               if (runtime.stopped()) raise(Error(errc::shutting_down, "the Runtime is stopped: create a new one"));
               auto a = WorkerAdapter::create(runtime.get().executor(), std::move(config));
               return std::make_unique<PyWorker>(rt, std::move(a));
             }),
             py::arg("runtime"), py::arg("config"));
  bind_common(worker);
  using Specs = std::vector<TransferSpec>;
  worker
      .def_property_readonly("reregistrations", [](PyWorker& a) { return a.get().metrics().reregistrations; },
                             "Registrations sent again without the engine asking (a server had lost it).")
      .def_property_readonly("registered", [](PyWorker& a) { return a.get().metrics().registered; },
                             "A server holds this worker's registration.")
      .def(
          "register_kv_caches",
          [](PyWorker& a, wire::KvLayout layout, int memfd, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.register_kv_caches(std::move(layout), memfd, d); });
          },
          py::arg("layout"), py::arg("memfd") = -1, py::arg("timeout") = py::none(),
          "Registers the engine's KV memory (a cpu_memfd layout with its memfd, or a cuda_ipc layout). The memfd "
          "is duplicated: close yours when you like.")
      .def(
          "async_register_kv_caches",
          [](PyWorker& a, wire::KvLayout layout, int memfd) {
            return start_call<adapter::Done>(a.runtime(), [&](auto h) {
              a.get().async_register_kv_caches(std::move(layout), memfd, std::move(h));
            });
          },
          py::arg("layout"), py::arg("memfd") = -1)
      .def(
          "unregister_kv_caches",
          [](PyWorker& a, Timeout t) { return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.unregister_kv_caches(d); }); },
          py::arg("timeout") = py::none())
      .def("async_unregister_kv_caches",
           [](PyWorker& a) {
             return start_call<adapter::Done>(a.runtime(),
                                              [&](auto h) { a.get().async_unregister_kv_caches(std::move(h)); });
           })
      .def(
          "submit_store",
          [](PyWorker& a, TransferSpec spec, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.submit_store(std::move(spec), d); });
          },
          py::arg("spec"), py::arg("timeout") = py::none(), "STORE; StoreResult once the server finished it.")
      .def(
          "async_submit_store",
          [](PyWorker& a, TransferSpec spec) {
            return start_call<wire::StoreResult>(
                a.runtime(), [&](auto h) { a.get().async_submit_store(std::move(spec), std::move(h)); });
          },
          py::arg("spec"))
      .def(
          "submit_retrieve",
          [](PyWorker& a, TransferSpec spec, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.submit_retrieve(std::move(spec), d); });
          },
          py::arg("spec"), py::arg("timeout") = py::none(),
          "RETRIEVE; RetrieveResult. On failure its blocks become load errors.")
      .def(
          "async_submit_retrieve",
          [](PyWorker& a, TransferSpec spec) {
            return start_call<wire::RetrieveResult>(
                a.runtime(), [&](auto h) { a.get().async_submit_retrieve(std::move(spec), std::move(h)); });
          },
          py::arg("spec"))
      .def(
          "submit_stores",
          [](PyWorker& a, Specs specs, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.submit_stores(std::move(specs), d); });
          },
          py::arg("specs"), py::arg("timeout") = py::none(),
          "Every STORE at once; one entry per spec: None or the kvlink.Error it failed with.")
      .def(
          "async_submit_stores",
          [](PyWorker& a, Specs specs) {
            return start_call<WorkerAdapter::BatchResult>(
                a.runtime(), [&](auto h) { a.get().async_submit_stores(std::move(specs), std::move(h)); });
          },
          py::arg("specs"))
      .def(
          "submit_retrieves",
          [](PyWorker& a, Specs specs, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.submit_retrieves(std::move(specs), d); });
          },
          py::arg("specs"), py::arg("timeout") = py::none(),
          "Every RETRIEVE at once; one entry per spec: None or the kvlink.Error it failed with.")
      .def(
          "async_submit_retrieves",
          [](PyWorker& a, Specs specs) {
            return start_call<WorkerAdapter::BatchResult>(
                a.runtime(), [&](auto h) { a.get().async_submit_retrieves(std::move(specs), std::move(h)); });
          },
          py::arg("specs"))
      .def(
          "get_finished",
          [](PyWorker& a, std::vector<std::string> finished, Timeout t) {
            return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.get_finished(std::move(finished), d); });
          },
          py::arg("engine_finished"), py::arg("timeout") = py::none(),
          "FinishedSets (stores, retrieves) given the request ids the engine reports finished.")
      .def(
          "async_get_finished",
          [](PyWorker& a, std::vector<std::string> finished) {
            return start_call<FinishedSets>(
                a.runtime(), [&](auto h) { a.get().async_get_finished(std::move(finished), std::move(h)); });
          },
          py::arg("engine_finished"))
      .def(
          "take_load_errors",
          [](PyWorker& a, Timeout t) { return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.take_load_errors(d); }); },
          py::arg("timeout") = py::none(), "Block ids whose load failed since the last call (sorted).")
      .def("async_take_load_errors",
           [](PyWorker& a) {
             return start_call<std::vector<std::uint32_t>>(
                 a.runtime(), [&](auto h) { a.get().async_take_load_errors(std::move(h)); });
           })
      .def(
          "shutdown", [](PyWorker& a, Timeout t) { return run_blocking([&, d = deadline(t), &ad = a.get()] { return ad.shutdown(d); }); },
          py::arg("timeout") = py::none(),
          "Stops the heartbeat and new transfers, sends UNREGISTER, closes the connection.")
      .def("async_shutdown", [](PyWorker& a) {
        return start_call<adapter::Done>(a.runtime(), [&](auto h) { a.get().async_shutdown(std::move(h)); });
      });
}

}  // namespace kvlink::python
