// kvlink.SchedulerAdapter and kvlink.WorkerAdapter: the C++ adapters on a
// kvlink.Runtime. PyAdapter is what both share: the runtime they run on,
// their events delivered inside poll(), health, ping and metrics.
#pragma once

#include <optional>

#include "bindings.hpp"
#include "py_objects.hpp"
#include "runtime.hpp"
#include "kvlink/adapter/scheduler.hpp"
#include "kvlink/adapter/worker.hpp"

namespace kvlink::python {

// A Python timeout (seconds, None: the adapter's default) as the adapters'
// deadline argument (zero: the default). ValueError if not a duration.
Duration deadline(std::optional<double> seconds);

template <class Adapter>
class PyAdapter {
 public:
  PyAdapter(py::object runtime, std::shared_ptr<Adapter> adapter);
  // Drops the adapter with the GIL released: its destructor stops the
  // monitor, which must not wait on a thread that waits for the GIL.
  // In a child forked since, the adapter belongs to an io thread that does
  // not exist here: it is left as it is (leaked).
  ~PyAdapter() {
    if (runtime_.cast<PyRuntime&>().forked()) {
      new std::shared_ptr<Adapter>(std::move(adapter_));
      return;
    }
    py::gil_scoped_release release;
    adapter_.reset();
  }
  PyAdapter(const PyAdapter&) = delete;
  PyAdapter& operator=(const PyAdapter&) = delete;

  // The adapter; kvlink.Error in a child forked since its runtime was made.
  Adapter& get() {
    runtime_.cast<PyRuntime&>().get();
    return *adapter_;
  }
  const std::shared_ptr<Adapter>& shared() { return adapter_; }
  const py::object& runtime() const { return runtime_; }
  void on_event(py::object fn);
  // One PING on the current connection, waited for with the GIL released;
  // its round trip in seconds.
  double ping(std::optional<double> timeout);

 private:
  py::object runtime_;
  std::shared_ptr<Adapter> adapter_;
  // The on_event callbacks: owned here, reached from poll() through a weak
  // pointer, so only ever touched under the GIL.
  std::shared_ptr<PyObjects> events_ = std::make_shared<PyObjects>();
};

using PyScheduler = PyAdapter<adapter::SchedulerAdapter>;
using PyWorker = PyAdapter<adapter::WorkerAdapter>;

}  // namespace kvlink::python
