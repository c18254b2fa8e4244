// JSON lines shared by kvlink-cli watch and kvlink-engine-sim: one object
// per health event, the same fields in both tools, so one parser reads both.
#pragma once

#include <string>
#include <string_view>

#include "kvlink/health/monitor.hpp"

namespace kvlink::tools {

// A JSON string literal, escaped.
std::string json_string(std::string_view s);

// Wall-clock milliseconds since the Unix epoch (the lines' "ts_ms").
long long unix_ms();

// {"ts_ms":..,"event":"state","from":..,"to":..,"reason":..[,"outage_ms":..]}
// or {"ts_ms":..,"event":"notice","message":..}; with a non-empty `link`,
// a "link" field names which monitor it came from. No trailing newline.
std::string event_json(const health::Event& e, std::string_view link = {});

}  // namespace kvlink::tools
