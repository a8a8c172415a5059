#pragma once
// A readable summary of a parsed config (`zinf config check`).

#include <string>

#include "zinf/configs/deepspeed_config.hpp"

namespace zinf::config {

// Lines of "label  value": stage, placement of each state, batch arithmetic, precision, optimizer,
// scheduler, clipping, I/O. Values still "auto" say so.
std::string summarize(const DeepSpeedConfig& config);

// Element counts for people: 5e8 -> "500M", 1500000 -> "1.5M", 530841 -> "530,841".
std::string human_count(std::int64_t n);

}  // namespace zinf::config
