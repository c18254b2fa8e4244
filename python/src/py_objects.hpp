// Python objects held by C++ state that kvlink's io thread may end up
// destroying (a completion handler dropped on shutdown). Dropping a Python
// reference needs the GIL: this takes it when the destroying thread lacks
// it, and leaks the references once the interpreter is finalizing (there
// is nobody left to free them for).
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace kvlink::python {

namespace py = pybind11;

class PyObjects {
 public:
  PyObjects() = default;
  PyObjects(const PyObjects&) = delete;
  PyObjects& operator=(const PyObjects&) = delete;
  ~PyObjects() {
    if (objects_.empty()) return;
    if (PyGILState_Check()) {
      objects_.clear();
    } else if (Py_IsInitialized() && !_Py_IsFinalizing()) {
      py::gil_scoped_acquire gil;
      objects_.clear();
    } else {
      for (auto& o : objects_) o.release();
    }
  }
  // GIL held.
  void add(py::object o) { objects_.push_back(std::move(o)); }
  std::vector<py::object> take() { return std::exchange(objects_, {}); }
  bool empty() const { return objects_.empty(); }
  const std::vector<py::object>& items() const { return objects_; }

 private:
  std::vector<py::object> objects_;
};

}  // namespace kvlink::python
