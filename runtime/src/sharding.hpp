#pragma once
// How a unit of n elements is split over W ranks (ZeRO stage >= 1): W equal shards of
// ceil(n / W) elements, the last padded with zeros. Every rank's piece, every checkpoint shard and
// every re-sharding read use these two functions. Internal to zinf_runtime.

#include <algorithm>
#include <cstdint>

namespace zinf::runtime {

// Elements of each rank's shard of a unit of n elements over `world` ranks.
inline std::int64_t shard_size(std::int64_t n, int world) { return (n + world - 1) / world; }

// The unit's elements [begin, begin + count) that shard `index` (of `shard` elements) holds;
// count is 0 for a shard wholly in the padding.
struct ShardRange {
  std::int64_t begin = 0, count = 0;
};
inline ShardRange shard_range(std::int64_t n, std::int64_t shard, std::int64_t index) {
  const std::int64_t begin = index * shard;
  return {begin, std::clamp<std::int64_t>(n - begin, 0, shard)};
}

}  // namespace zinf::runtime
