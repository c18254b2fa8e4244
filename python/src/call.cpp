#include "call.hpp"

namespace kvlink::python {

void Call::check_done() const {
  if (!done_)
    throw std::runtime_error(
        "kvlink call not complete yet: completions run inside Runtime.poll() (kvlink.aio calls it on asyncio); "
        "check done() first or await the call");
}

py::object Call::result() {
  check_done();
  if (error_) raise(error_);
  return value();
}

py::object Call::exception() {
  check_done();
  return error_object(error_);
}

void Call::add_done_callback(py::object fn) {
  if (!done_) {
    callbacks_.add(std::move(fn));
    return;
  }
  fn(py::cast(shared_from_this()));
}

void Call::finish(std::error_code ec) {
  done_ = true;
  error_ = Error(ec);
  if (callbacks_.empty()) return;
  py::object self = py::cast(shared_from_this());
  for (auto& fn : callbacks_.take()) {
    // A failing callback must not stop the others, nor poll() itself:
    // report it the way asyncio reports a callback's exception.
    try {
      fn(self);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("kvlink.Call done callback");
    }
  }
}

void bind_calls(py::module_& m) {
  py::class_<Call, std::shared_ptr<Call>>(m, "Call", py::dynamic_attr(),
                                          "An adapter call started without waiting: poll it, give it callbacks, or "
                                          "await it (asyncio). It completes inside Runtime.poll().")
      .def("done", &Call::done, "True once it completed (inside Runtime.poll()).")
      .def("result", &Call::result, "The call's value; raises kvlink.Error if it failed.")
      .def("exception", &Call::exception, "The kvlink.Error it failed with, or None.")
      .def("add_done_callback", &Call::add_done_callback, py::arg("fn"),
           "fn(call) when it completes, inside Runtime.poll() (at once if it has).")
      .def("__await__", [](py::object self) {
        return py::module_::import("kvlink.aio").attr("call_future")(self).attr("__await__")();
      });
}

}  // namespace kvlink::python
