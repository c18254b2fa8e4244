#include "bindings.hpp"

#include "kvlink/adapter/metrics.hpp"

namespace kvlink::python {

py::object error_object(const Error& e) {
  if (!e) return py::none();
  // Defined in Python (kvlink/errors.py) so that Python code can raise and
  // catch it like any exception class of its own.
  py::object type = py::module_::import("kvlink.errors").attr("Error");
  return type(adapter::error_name(e.code()), e.message());
}

void raise(const Error& e) {
  py::object err = error_object(e);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
  throw py::error_already_set();
}

}  // namespace kvlink::python

PYBIND11_MODULE(_kvlink, m) {
  using namespace kvlink::python;
  m.doc() = "kvlink's engine side: runtime, scheduler and worker adapters, KV-cache helpers (use the kvlink package)";
  bind_calls(m);
  bind_runtime(m);
  bind_configs(m);
  bind_adapters(m);
  bind_kv(m);
}
