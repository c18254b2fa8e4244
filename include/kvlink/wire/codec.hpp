// Bounds-checked little-endian encoding. Reader never reads past its span;
// the first failure sticks and names the field that did not fit, so a bad
// message becomes one clear error instead of a crash.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kvlink::wire {

static_assert(std::endian::native == std::endian::little, "kvlink's codec assumes a little-endian host");

using Bytes = std::vector<std::byte>;

class Writer {
 public:
  explicit Writer(Bytes& out) : out_(out) {}

  template <class T>
    requires std::is_trivially_copyable_v<T>
  void num(T value) {
    raw(&value, sizeof value);
  }
  void boolean(bool value) { num<std::uint8_t>(value ? 1 : 0); }
  void raw(const void* data, std::size_t size) {
    const auto* p = static_cast<const std::byte*>(data);
    out_.insert(out_.end(), p, p + size);
  }
  void str(std::string_view s) {
    num(static_cast<std::uint32_t>(s.size()));
    raw(s.data(), s.size());
  }
  void blob(std::span<const std::byte> b) {
    num(static_cast<std::uint32_t>(b.size()));
    raw(b.data(), b.size());
  }
  // A vector of plain little-endian numbers or trivially copyable structs.
  template <class T>
    requires std::is_trivially_copyable_v<T>
  void array(const std::vector<T>& v) {
    num(static_cast<std::uint32_t>(v.size()));
    raw(v.data(), v.size() * sizeof(T));
  }
  std::size_t size() const { return out_.size(); }

 private:
  Bytes& out_;
};

class Reader {
 public:
  // `what` names the message for error texts ("HELLO", "STORE", ...).
  Reader(std::span<const std::byte> data, std::string_view what) : data_(data), what_(what) {}

  template <class T>
    requires std::is_trivially_copyable_v<T>
  void num(T& value, const char* field) {
    raw(&value, sizeof value, field);
  }
  void boolean(bool& value, const char* field) {
    std::uint8_t v = 0;
    num(v, field);
    if (ok() && v > 1) fail(field, "is not 0 or 1");
    value = v == 1;
  }
  void raw(void* dst, std::size_t size, const char* field) {
    if (!need(size, field) || size == 0) return;
    std::memcpy(dst, data_.data() + pos_, size);
    pos_ += size;
  }
  void str(std::string& s, const char* field, std::size_t max_size) {
    std::uint32_t n = 0;
    num(n, field);
    if (!ok()) return;
    if (n > max_size) return fail(field, "is " + std::to_string(n) + " bytes, more than the limit of " + std::to_string(max_size));
    if (!need(n, field)) return;
    s.assign(reinterpret_cast<const char*>(data_.data() + pos_), n);
    pos_ += n;
  }
  void blob(Bytes& b, const char* field, std::size_t max_size) {
    std::uint32_t n = 0;
    num(n, field);
    if (!ok()) return;
    if (n > max_size) return fail(field, "is " + std::to_string(n) + " bytes, more than the limit of " + std::to_string(max_size));
    if (!need(n, field)) return;
    b.assign(data_.begin() + static_cast<std::ptrdiff_t>(pos_), data_.begin() + static_cast<std::ptrdiff_t>(pos_ + n));
    pos_ += n;
  }
  template <class T>
    requires std::is_trivially_copyable_v<T>
  void array(std::vector<T>& v, const char* field, std::size_t max_count) {
    std::uint32_t n = 0;
    num(n, field);
    if (!ok()) return;
    if (n > max_count) return fail(field, "has " + std::to_string(n) + " elements, more than the limit of " + std::to_string(max_count));
    if (!need(std::size_t{n} * sizeof(T), field)) return;
    v.resize(n);
    if (n == 0) return;  // v.data() may be null: memcpy must not see it
    std::memcpy(v.data(), data_.data() + pos_, std::size_t{n} * sizeof(T));
    pos_ += std::size_t{n} * sizeof(T);
  }
  // An element count for a hand-decoded list whose elements take at least
  // `min_element_size` bytes each: checked against what is left, so a huge
  // count cannot make the decoder allocate.
  std::uint32_t count(const char* field, std::size_t max_count, std::size_t min_element_size) {
    std::uint32_t n = 0;
    num(n, field);
    if (!ok()) return 0;
    if (n > max_count) {
      fail(field, "has " + std::to_string(n) + " elements, more than the limit of " + std::to_string(max_count));
      return 0;
    }
    if (std::size_t{n} * min_element_size > remaining()) {
      fail(field, "claims " + std::to_string(n) + " elements but only " + std::to_string(remaining()) + " bytes remain");
      return 0;
    }
    return n;
  }
  // Called after the last field: trailing bytes are an error too.
  void finish() {
    if (ok() && pos_ != data_.size())
      error_ = std::string(what_) + ": " + std::to_string(data_.size() - pos_) + " unexpected trailing bytes";
  }
  void fail(const char* field, const std::string& why) {
    if (ok()) error_ = std::string(what_) + ": field '" + field + "' " + why;
  }

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::size_t remaining() const { return data_.size() - pos_; }

 private:
  bool need(std::size_t size, const char* field) {
    if (!ok()) return false;
    if (size > remaining()) {
      error_ = std::string(what_) + ": truncated at field '" + field + "' (needs " + std::to_string(size) + " bytes, " +
               std::to_string(remaining()) + " left)";
      return false;
    }
    return true;
  }

  std::span<const std::byte> data_;
  std::size_t pos_ = 0;
  std::string_view what_;
  std::string error_;
};

}  // namespace kvlink::wire
