// kvlink.Runtime: kvlink's io thread (runtime::Runtime, mode (b) of
// runtime.hpp) as Python sees it. Adapters run on its thread; their
// completions and events wait in its host queue until poll() runs them on
// the Python thread that calls it (kvlink.aio does so from the asyncio
// loop whenever host_fd() is readable).
#pragma once

#include <memory>

#include "bindings.hpp"
#include "kvlink/runtime/runtime.hpp"

namespace kvlink::python {

class PyRuntime {
 public:
  PyRuntime() : rt_(std::make_unique<runtime::Runtime>()) {}
  // Joins the io thread with the GIL released: the thread may need the GIL
  // to drop a Python callback (PyObjects), and would wait for it forever.
  ~PyRuntime() {
    py::gil_scoped_release release;
    rt_.reset();
  }
  PyRuntime(const PyRuntime&) = delete;
  PyRuntime& operator=(const PyRuntime&) = delete;

  runtime::Runtime& get() { return *rt_; }
  // Stops the io thread (idempotent). Adapters on it stop working; their
  // pending calls never complete.
  void stop() {
    py::gil_scoped_release release;
    rt_->stop();
    stopped_ = true;
  }
  bool stopped() const { return stopped_; }

 private:
  std::unique_ptr<runtime::Runtime> rt_;
  bool stopped_ = false;
};

}  // namespace kvlink::python
