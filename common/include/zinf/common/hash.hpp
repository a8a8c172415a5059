#pragma once
// Small, stable hashes for seeding: the same value on every machine and run.

#include <cstdint>
#include <string_view>

namespace zinf {

// FNV-1a (64-bit) of a name: seeds per-tensor random streams (initialisation, LoRA adapters).
inline std::uint64_t fnv1a64(std::string_view s) {
  std::uint64_t h = 1469598103934665603ull;
  for (const unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

}  // namespace zinf
