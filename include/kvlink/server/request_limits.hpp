// How large one request may be: the checks shared by registration and
// lookups.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvlink/error.hpp"

namespace kvlink::server {

// Tensor-parallel sizes beyond this are refused as bad requests.
inline constexpr std::uint32_t max_world_size = 1024;

// Keys one request may make the server visit (chunks x ranks): keeps any
// single request from stalling the io thread.
inline constexpr std::uint64_t max_keys_per_request = std::uint64_t{1} << 22;

// bad_request unless 1 <= world_size <= max_world_size.
Error check_world_size(std::uint32_t world_size);
// bad_request if `chunks` x `world_size` keys pass max_keys_per_request.
Error check_keys(std::size_t chunks, std::uint32_t world_size);

}  // namespace kvlink::server
