// JSON lines shared by kvlink-cli watch and kvlink-engine-sim: one object
// per health event, the same fields in both tools, so one parser reads both.
#pragma once

#include <string>
#include <string_view>

#include "kvlink/health/monitor.hpp"
#include "kvlink/json.hpp"

namespace kvlink::tools {

using kvlink::json_string;

// Wall-clock milliseconds since the Unix epoch (the lines' "ts_ms").
long long unix_ms();

// {"ts_ms":..,"event":"state","from":..,"to":..,"reason":..[,"outage_ms":..]}
// or {"ts_ms":..,"event":"notice","message":..}; with a non-empty `link`,
// a "link" field names which monitor it came from. No trailing newline.
std::string event_json(const health::Event& e, std::string_view link = {});

}  // namespace kvlink::tools
