// STATS as a table: each row a name and how to read its value now. The
// reply lists every row in the order added, so adding a counter is one
// add() line.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>
#include <string>
#include <vector>

#include "kvlink/wire/messages.hpp"

namespace kvlink::server {

class StatsTable {
 public:
  using Read = std::function<std::uint64_t()>;

  StatsTable& add(std::string name, Read read) {
    rows_.push_back({std::move(name), std::move(read)});
    return *this;
  }
  // Every row as (name, value now).
  std::vector<wire::StatEntry> read() const;
  std::size_t size() const { return rows_.size(); }

 private:
  struct Row {
    std::string name;
    Read read;
  };
  std::vector<Row> rows_;
};

// The STATS name of a per-opcode counter: "op_" + lowercase opcode name + "_" + what.
std::string opcode_stat_name(std::uint8_t opcode, std::string_view what);

}  // namespace kvlink::server
