// The _kvlink extension module (pybind11): one bind_* per concept, called
// by module.cpp. Python-facing rules every part follows:
//   - snake_case, keyword arguments, durations in seconds (float);
//   - failures raise kvlink.Error(code, message), code being kvlink's error
//     name ("timed_out", "unhealthy", ...);
//   - the GIL is released around anything that can wait;
//   - no Python runs on kvlink's io thread: completions and events run
//     inside Runtime.poll(), on the thread that polls.
#pragma once

#include <pybind11/pybind11.h>

#include "kvlink/error.hpp"

namespace kvlink::python {

namespace py = pybind11;

// Raises kvlink.Error for `e` (which must hold a failure).
[[noreturn]] void raise(const Error& e);
// kvlink.Error for `e` (None when it holds none), not raised.
py::object error_object(const Error& e);

void bind_calls(py::module_& m);
void bind_runtime(py::module_& m);
void bind_configs(py::module_& m);
void bind_adapters(py::module_& m);
void bind_kv(py::module_& m);

}  // namespace kvlink::python
