#include "kvlink/server/stats_table.hpp"

#include <cctype>

namespace kvlink::server {

std::vector<wire::StatEntry> StatsTable::read() const {
  std::vector<wire::StatEntry> r;
  r.reserve(rows_.size());
  for (const auto& row : rows_) r.push_back({row.name, static_cast<std::int64_t>(row.read())});
  return r;
}

std::string opcode_stat_name(std::uint8_t opcode, std::string_view what) {
  std::string name = wire::opcode_name(opcode);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return "op_" + name + "_" + std::string(what);
}

}  // namespace kvlink::server
