#include <doctest/doctest.h>

#include <ostream>
#include <string>

#include "kvlink/error.hpp"

using kvlink::errc;
using kvlink::Error;
using kvlink::Result;

TEST_CASE("Error: default is success, a code is failure") {
  Error ok;
  CHECK_FALSE(ok);
  CHECK_FALSE(ok.code());
  Error bad(errc::bad_request, "world_size 0: must be 1 or more");
  CHECK(bad);
  CHECK(bad == errc::bad_request);
  CHECK_FALSE(bad == errc::timed_out);
  CHECK(bad.message() == "world_size 0: must be 1 or more");
}

TEST_CASE("Error: message falls back to the code's text") {
  Error e(errc::timed_out);
  CHECK(e.detail().empty());
  CHECK(e.message() == kvlink::make_error_code(errc::timed_out).message());
}

TEST_CASE("Error: context prefixes failures only") {
  Error e(errc::bad_request, "block 9 out of range");
  e.context("chunk 3");
  CHECK(e.message() == "chunk 3: block 9 out of range");
  CHECK(e == errc::bad_request);
  Error ok;
  ok.context("chunk 3");
  CHECK_FALSE(ok);
  CHECK(ok.detail().empty());
}

TEST_CASE("Result: a value or an error") {
  Result<int> v = 7;
  REQUIRE(v);
  CHECK(*v == 7);
  CHECK_FALSE(v.error());
  Result<std::string> r(errc::not_found, "no such job");
  CHECK_FALSE(r);
  CHECK(r.error() == errc::not_found);
  CHECK(r.error().message() == "no such job");
  // A Result cannot hold "no value and no error".
  Result<int> odd{Error{}};
  CHECK_FALSE(odd);
  CHECK(odd.error());
}
