#pragma once
// JSON document -> typed DeepSpeedConfig, with every problem collected and reported by path.

#include <cstdint>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/configs/diagnostics.hpp"
#include "zinf/configs/document.hpp"

namespace zinf::config {

struct ParseOptions {
  // Data-parallel world size for the batch rule.
  std::int64_t world_size = 1;
  // Accept "auto" values left after resolution, keeping the default and recording the key in
  // DeepSpeedConfig::auto_keys (`zinf config check` without training arguments). Otherwise an
  // unresolved "auto" is an error, except inside zero_optimization, where it falls back to the
  // default as DeepSpeed does.
  bool allow_auto = false;
};

struct ParseResult {
  DeepSpeedConfig config;
  Diagnostics diagnostics;
  bool ok() const noexcept { return !diagnostics.has_errors(); }
};

ParseResult parse_config(const Json& json, const ParseOptions& options = {});

// Derives the missing batch keys with DeepSpeed's rule; errors use DeepSpeed's texts.
void resolve_batch(BatchConfig& batch, std::int64_t world_size, Diagnostics& diagnostics);

// The typed config back as a complete DeepSpeed JSON document (every default spelled out).
Json to_json(const DeepSpeedConfig& config);

}  // namespace zinf::config
