// kvlink.Runtime: kvlink's io thread (runtime::Runtime, mode (b) of
// runtime.hpp) as Python sees it. Adapters run on its thread; their
// completions and events wait in its host queue until poll() runs them on
// the Python thread that calls it (kvlink.aio does so from the asyncio
// loop whenever host_fd() is readable).
#pragma once

#include <unistd.h>

#include <memory>

#include "bindings.hpp"
#include "kvlink/runtime/runtime.hpp"

namespace kvlink::python {

class PyRuntime {
 public:
  PyRuntime() : rt_(std::make_unique<runtime::Runtime>()) {}
  // Joins the io thread with the GIL released: the thread may need the GIL
  // to drop a Python callback (PyObjects), and would wait for it forever.
  // In a child forked since, the thread does not exist: nothing to join,
  // and the runtime is left as it is (leaked).
  ~PyRuntime() {
    if (forked()) {
      (void)rt_.release();
      return;
    }
    py::gil_scoped_release release;
    rt_.reset();
  }
  PyRuntime(const PyRuntime&) = delete;
  PyRuntime& operator=(const PyRuntime&) = delete;

  // The runtime, in the process that created it. A forked child has no io
  // thread: kvlink.Error(shutting_down) tells it to make its own runtime.
  runtime::Runtime& get() {
    if (forked())
      raise(Error(errc::shutting_down, "this kvlink.Runtime was created in process " + std::to_string(pid_) +
                                           ", before a fork: its io thread does not exist here; create a new "
                                           "Runtime (and adapters) in this process"));
    return *rt_;
  }
  bool forked() const { return getpid() != pid_; }
  // Stops the io thread (idempotent). Adapters on it stop working; their
  // pending calls never complete.
  void stop() {
    if (forked()) return;
    py::gil_scoped_release release;
    rt_->stop();
    stopped_ = true;
  }
  bool stopped() const { return stopped_; }

 private:
  std::unique_ptr<runtime::Runtime> rt_;
  pid_t pid_ = getpid();
  bool stopped_ = false;
};

}  // namespace kvlink::python
