#pragma once
// Subcommand registration for the `zinf` tool. Each subcommand adds itself to the CLI11 app and
// sets `action`, which main() runs after parsing; actions return the process exit code.

#include <CLI/CLI.hpp>

#include <functional>

#include "zinf/configs/resolve.hpp"

namespace zinf::tools {

using Action = std::function<int()>;

void add_config_commands(CLI::App& app, Action& action);
void add_bench_commands(CLI::App& app, Action& action);  // bench io, tune nvme
void add_bench_adam_command(CLI::App& bench, Action& action);  // bench adam

// Adds --micro-batch, --grad-accum, --world-size, --lr, ... to `cmd`, writing into `args`.
void add_training_args(CLI::App& cmd, config::TrainingArgs& args);
bool any_training_arg(const config::TrainingArgs& args);

}  // namespace zinf::tools
