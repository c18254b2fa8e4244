// A plain C++ struct bound as a Python class of fields: keyword-argument
// construction (every field optional, defaulting to the C++ default; an
// unknown name is a TypeError naming the fields), read-write fields,
// durations in seconds, a repr listing the fields, and equality.
#pragma once

#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "kvlink/clock.hpp"

namespace kvlink::python {

template <class T>
class Record {
 public:
  Record(py::module_& m, const char* name, const char* doc = "") : cls_(m, name, doc) {}

  template <class M>
  Record& field(const char* name, M T::*member, const char* doc = "") {
    cls_.def_readwrite(name, member, doc);
    names_->push_back(name);
    return *this;
  }
  // A Duration field as float seconds (>= 0).
  Record& seconds(const char* name, Duration T::*member, const char* doc = "") {
    const std::string field = name;
    cls_.def_property(
        name, [member](const T& t) { return std::chrono::duration<double>(t.*member).count(); },
        [member, field](T& t, double s) {
          if (!std::isfinite(s) || s < 0 || s > 1e9)
            throw py::value_error(field + " must be a number of seconds between 0 and 1e9, got " + py::repr(py::float_(s)).cast<std::string>());
          t.*member = std::chrono::duration_cast<Duration>(std::chrono::duration<double>(s));
        },
        doc);
    names_->push_back(name);
    return *this;
  }
  // A field with its own getter and setter (conversions).
  template <class Get, class Set>
  Record& property(const char* name, Get get, Set set, const char* doc = "") {
    cls_.def_property(name, get, set, doc);
    names_->push_back(name);
    return *this;
  }
  // Defines __init__(**fields), __repr__ and __eq__ over the fields so far.
  py::class_<T>& done() {
    auto names = names_;
    const std::string type = py::str(cls_.attr("__name__"));
    cls_.def(py::init([names, type](py::kwargs kw) {
      py::object obj = py::cast(T{});
      for (auto [k, v] : kw) {
        const std::string key = py::str(k);
        if (std::find(names->begin(), names->end(), key) == names->end())
          throw py::type_error(type + "() got an unknown field '" + key + "'; its fields are: " + join(*names));
        py::setattr(obj, k, v);
      }
      return obj.cast<T>();
    }));
    cls_.def("__repr__", [names, type](py::object self) {
      std::string out = type + "(";
      for (std::size_t i = 0; i < names->size(); ++i)
        out += (i ? ", " : "") + (*names)[i] + "=" + py::repr(self.attr((*names)[i].c_str())).cast<std::string>();
      return out + ")";
    });
    cls_.def("__eq__", [names](py::object a, py::object b) {
      if (!py::isinstance(b, py::type::of(a))) return false;
      for (const auto& n : *names)
        if (!a.attr(n.c_str()).equal(b.attr(n.c_str()))) return false;
      return true;
    });
    return cls_;
  }

 private:
  static std::string join(const std::vector<std::string>& names) {
    std::string out;
    for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
    return out;
  }
  py::class_<T> cls_;
  std::shared_ptr<std::vector<std::string>> names_ = std::make_shared<std::vector<std::string>>();
};

}  // namespace kvlink::python
