#include "zinf/common/log.hpp"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <charconv>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "zinf/common/error.hpp"

namespace zinf::log {

namespace {

std::optional<int> parse_rank(const char* text) {
  if (text == nullptr || *text == '\0') return std::nullopt;
  int value = 0;
  std::string_view sv(text);
  auto [ptr, ec] = std::from_chars(sv.data(), sv.data() + sv.size(), value);
  if (ec != std::errc() || ptr != sv.data() + sv.size() || value < 0) return std::nullopt;
  return value;
}

}  // namespace

int rank_from_environment() {
  // torchrun, then Open MPI, MPICH/PMI, Slurm: the same order `zinf launch` will use.
  for (const char* name : {"RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"}) {
    if (auto rank = parse_rank(std::getenv(name))) return *rank;
  }
  return 0;
}

spdlog::level::level_enum parse_level(const std::string& name) {
  if (name == "warning") return spdlog::level::warn;
  const auto level = spdlog::level::from_str(name);
  // from_str maps unknown names to "off"; only accept "off" when it was asked for.
  if (level == spdlog::level::off && name != "off") {
    throw Error("unknown log level '{}': use one of trace, debug, info, warn, error, critical, off", name);
  }
  return level;
}

void init(const Options& options) {
  const int rank = options.rank.value_or(rank_from_environment());
  std::string level_name = options.level;
  if (level_name.empty()) {
    const char* env = std::getenv("ZINF_LOG_LEVEL");
    level_name = (env != nullptr && *env != '\0') ? env : "info";
  }
  const auto level = parse_level(level_name);

  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!options.file.empty()) {
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, /*truncate=*/false));
    } catch (const spdlog::spdlog_ex& e) {
      throw Error("cannot open log file '{}': {}; check that its directory exists and is writable", options.file,
                  e.what());
    }
  }
  auto logger = std::make_shared<spdlog::logger>("zinf", sinks.begin(), sinks.end());
  logger->set_pattern(fmt::format("[%Y-%m-%d %H:%M:%S.%e] [rank {}] [%^%l%$] %v", rank));
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(std::move(logger));
}

}  // namespace zinf::log
