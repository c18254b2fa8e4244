#include "event_json.hpp"

#include <fmt/format.h>

#include <chrono>

#include "kvlink/json.hpp"

namespace kvlink::tools {

long long unix_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string event_json(const health::Event& e, std::string_view link) {
  using namespace std::chrono;
  std::string line = fmt::format(R"({{"ts_ms":{})", unix_ms());
  if (!link.empty()) line += fmt::format(R"(,"link":{})", json_string(link));
  if (e.kind == health::Event::Kind::transition) {
    const auto& t = e.transition;
    line += fmt::format(R"(,"event":"state","from":"{}","to":"{}","reason":{})", health::state_name(t.from),
                        health::state_name(t.to), json_string(t.reason));
    if (t.from == health::State::degraded && t.to == health::State::healthy)
      line += fmt::format(R"(,"outage_ms":{:.3f})", duration<double, std::milli>(t.outage).count());
  } else if (e.kind == health::Event::Kind::connected) {
    line += fmt::format(R"(,"event":"connected","boot_id":"{:016x}","registered":{},"draining":{})", e.hello.boot_id,
                        e.hello.registered != 0, e.hello.draining != 0);
  } else if (e.kind == health::Event::Kind::disconnected) {
    line += fmt::format(R"(,"event":"disconnected","message":{})", json_string(e.notice));
  } else {
    line += fmt::format(R"(,"event":"notice","message":{})", json_string(e.notice));
  }
  return line + "}";
}

}  // namespace kvlink::tools
