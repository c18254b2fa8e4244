#include "kvlink/metrics/exposition.hpp"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <limits>
#include <sstream>

namespace kvlink::metrics {

struct Exposition::Families {
  std::vector<prometheus::MetricFamily> list;
  std::map<std::string, std::size_t> index;  // name -> position in list

  prometheus::ClientMetric& add(const std::string& name, const std::string& help, prometheus::MetricType type,
                                Labels labels) {
    auto [it, fresh] = index.try_emplace(name, list.size());
    if (fresh) list.push_back(prometheus::MetricFamily{name, help, type, {}});
    auto& family = list[it->second];
    prometheus::ClientMetric m;
    for (auto& [k, v] : labels) m.label.push_back(prometheus::ClientMetric::Label{std::move(k), std::move(v)});
    family.metric.push_back(std::move(m));
    return family.metric.back();
  }
};

Exposition::Exposition() : families_(std::make_unique<Families>()) {}
Exposition::~Exposition() = default;
Exposition::Exposition(Exposition&&) noexcept = default;
Exposition& Exposition::operator=(Exposition&&) noexcept = default;

void Exposition::counter(const std::string& name, const std::string& help, double value, Labels labels) {
  families_->add(name, help, prometheus::MetricType::Counter, std::move(labels)).counter.value = value;
}

void Exposition::gauge(const std::string& name, const std::string& help, double value, Labels labels) {
  families_->add(name, help, prometheus::MetricType::Gauge, std::move(labels)).gauge.value = value;
}

void Exposition::histogram(const std::string& name, const std::string& help, const Histogram& h, Labels labels) {
  auto& m = families_->add(name, help, prometheus::MetricType::Histogram, std::move(labels));
  m.histogram.sample_count = h.count;
  m.histogram.sample_sum = h.sum_seconds;
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < Histogram::bounds.size(); ++i) {
    cumulative += h.buckets[i];
    m.histogram.bucket.push_back({cumulative, Histogram::bounds[i]});
  }
  m.histogram.bucket.push_back({h.count, std::numeric_limits<double>::infinity()});
}

std::string Exposition::text() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families_->list);
  return out.str();
}

}  // namespace kvlink::metrics
