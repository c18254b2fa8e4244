// The one JSON string escaper (status JSON, JSON log lines, the tools'
// event lines).
#pragma once

#include <string>
#include <string_view>

namespace kvlink {

// `s` as a JSON string literal, quotes included: ", \ and control
// characters escaped; other bytes (UTF-8) passed through.
std::string json_string(std::string_view s);

}  // namespace kvlink
