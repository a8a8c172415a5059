#pragma once
// Logging through spdlog with the rank in every line (STYLE.md, rule 9). Library code logs through
// spdlog's default logger; tools call zinf::log::init once. Log lines go to stderr so that a
// tool's stdout stays machine-readable (`--json`).

#include <spdlog/spdlog.h>

#include <optional>
#include <string>

namespace zinf::log {

struct Options {
  // Rank shown in each line; empty = detect from RANK / OMPI_COMM_WORLD_RANK / PMI_RANK / SLURM_PROCID.
  std::optional<int> rank;
  // trace, debug, info, warn, error, critical, off. Empty = ZINF_LOG_LEVEL or "info".
  std::string level;
  // Also append to this file (e.g. <output-dir>/zinf.log); empty = stderr only.
  std::string file;
};

// Sets spdlog's default logger. Safe to call again (replaces the previous one). Throws zinf::Error on
// a bad level name or an unwritable log file.
void init(const Options& options = {});

// The rank found in the environment (launcher variables), or 0.
int rank_from_environment();

// Parses "info", "warn", "warning", ...; throws zinf::Error listing the valid names.
spdlog::level::level_enum parse_level(const std::string& name);

}  // namespace zinf::log
