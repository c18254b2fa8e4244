// Prometheus text exposition: metric families collected by name, then
// rendered by prometheus-cpp's text serializer (Debian prometheus-cpp-dev),
// so the format (escaping, cumulative buckets, +Inf, HELP/TYPE lines) is
// the reference library's, not ours. The server's /metrics and an engine's
// adapters (appended to the host's own /metrics) both render through it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kvlink/metrics/histogram.hpp"

namespace kvlink::metrics {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Exposition {
 public:
  Exposition();
  ~Exposition();
  Exposition(Exposition&&) noexcept;
  Exposition& operator=(Exposition&&) noexcept;

  // Samples of one family share `name` and `help`; each call adds one
  // sample with its own labels. Names follow Prometheus conventions:
  // kvlink_ prefix, unit suffix (_bytes, _seconds), _total on counters.
  void counter(const std::string& name, const std::string& help, double value, Labels labels = {});
  void gauge(const std::string& name, const std::string& help, double value, Labels labels = {});
  void histogram(const std::string& name, const std::string& help, const Histogram& h, Labels labels = {});

  // The families in the order first added, as Prometheus text format 0.0.4.
  std::string text() const;

 private:
  struct Families;
  std::unique_ptr<Families> families_;
};

}  // namespace kvlink::metrics
