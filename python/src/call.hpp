// kvlink.Call: one adapter call started without waiting (async_xxx in
// Python). It completes inside Runtime.poll() on the polling thread, never
// on kvlink's io thread. Poll it (done(), result()), give it callbacks
// (add_done_callback), or await it on asyncio (kvlink.aio).
//
// Every adapter method comes in two forms built here: run_blocking (the
// blocking C++ call with the GIL released; raises kvlink.Error) and
// start_call (the C++ async_xxx with a completion bound to the runtime's
// host executor; returns a Call).
#pragma once

#include <asio/bind_executor.hpp>
#include <memory>
#include <optional>
#include <system_error>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "py_objects.hpp"
#include "runtime.hpp"
#include "kvlink/adapter/call.hpp"

namespace kvlink::python {

// Python value of what a call completes with.
template <class T>
py::object to_python(const T& v) {
  return py::cast(v);
}
inline py::object to_python(const adapter::Done&) { return py::none(); }
// A batch's per-spec codes: None for success, else a kvlink.Error.
inline py::object to_python(const std::vector<std::error_code>& codes) {
  py::list out;
  for (const auto& ec : codes) out.append(error_object(Error(ec)));
  return out;
}

class Call : public std::enable_shared_from_this<Call> {
 public:
  virtual ~Call() = default;
  bool done() const { return done_; }
  // The value; raises kvlink.Error if the call failed, RuntimeError while
  // it has not completed (poll the runtime).
  py::object result();
  // The kvlink.Error it failed with, or None.
  py::object exception();
  // fn(call) once it completes (at once if it has).
  void add_done_callback(py::object fn);

 protected:
  // The subclass stored its value: runs the callbacks. GIL held.
  void finish(std::error_code ec);
  virtual py::object value() const = 0;

 private:
  void check_done() const;

  bool done_ = false;
  Error error_;
  PyObjects callbacks_;
};

template <class T>
class TypedCall final : public Call {
 public:
  // The completion handler's body: inside Runtime.poll(), GIL held.
  void complete(std::error_code ec, T v) {
    value_ = std::move(v);
    finish(ec);
  }

 private:
  py::object value() const override { return to_python(*value_); }
  std::optional<T> value_;
};

// Starts an async adapter operation: `initiate(handler)` calls
// adapter->async_xxx(args..., handler). The handler runs on the runtime's
// host executor, i.e. inside poll().
// `runtime` is the kvlink.Runtime object: call.runtime, for kvlink.aio.
template <class T, class Initiate>
py::object start_call(const py::object& runtime, Initiate initiate) {
  auto call = std::make_shared<TypedCall<T>>();
  initiate(asio::bind_executor(runtime.cast<PyRuntime&>().get().host_executor(),
                               [call](std::error_code ec, T v) { call->complete(ec, std::move(v)); }));
  py::object obj = py::cast(std::shared_ptr<Call>(call));
  obj.attr("runtime") = runtime;
  return obj;
}

// Runs a blocking adapter call (returning kvlink::Result<T>) with the GIL
// released; its value, or kvlink.Error raised. `f` runs without the GIL:
// it must not touch Python (take the adapter, deadline... before).
template <class F>
py::object run_blocking(F f) {
  using R = decltype(f());
  std::optional<R> r;
  {
    py::gil_scoped_release release;
    r.emplace(f());
  }
  if (!*r) raise(r->error());
  return to_python(**r);
}

}  // namespace kvlink::python
