#include "runtime.hpp"

namespace kvlink::python {

void bind_runtime(py::module_& m) {
  py::class_<PyRuntime>(m, "Runtime",
                        "kvlink's io thread. Adapters run on it; their completions and events wait until poll() runs "
                        "them on the calling thread (kvlink.aio does so on the asyncio loop).")
      .def(py::init<>())
      .def("host_fd", [](PyRuntime& r) { return r.get().host_fd(); },
           "A file descriptor readable while completions wait for poll() (level-triggered).")
      .def("poll", [](PyRuntime& r) { return r.get().poll(); },
           "Runs the waiting completions and events on this thread, without blocking; returns how many ran.")
      .def("stop", &PyRuntime::stop, "Stops the io thread (idempotent); its adapters stop working.")
      .def_property_readonly("stopped", &PyRuntime::stopped)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyRuntime& r, py::args) { r.stop(); });
}

}  // namespace kvlink::python
