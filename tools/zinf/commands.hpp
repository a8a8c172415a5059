#pragma once
// Subcommand registration for the `zinf` tool. Each subcommand adds itself to the CLI11 app and
// sets `action`, which main() runs after parsing; actions return the process exit code.

#include <CLI/CLI.hpp>

#include <functional>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/configs/resolve.hpp"

namespace zinf::tools {

using Action = std::function<int()>;

void add_config_commands(CLI::App& app, Action& action);
void add_bench_commands(CLI::App& app, Action& action);  // bench io and the other benches
void add_bench_adam_command(CLI::App& bench, Action& action);  // bench adam
void add_bench_offload_command(CLI::App& bench, Action& action);  // bench offload
void add_bench_model_command(CLI::App& bench, Action& action);    // bench model
void add_bench_suite_commands(CLI::App& bench, Action& action);   // bench pcie, gemm, mem, all
void add_plan_command(CLI::App& app, Action& action);              // plan
void add_tune_command(CLI::App& app, Action& action);              // tune --report, tune nvme
void add_tune_config_options(CLI::App& tune, Action& action);     // tune --report
void add_tune_nvme_command(CLI::App& tune, Action& action);       // tune nvme (the io sweep)
void add_train_commands(CLI::App& app, Action& action);  // train
void add_data_commands(CLI::App& app, Action& action);   // data tokenize
void add_ckpt_commands(CLI::App& app, Action& action);   // ckpt export, ckpt merge
void add_launch_commands(CLI::App& app, Action& action);  // launch
void add_bench_comm_command(CLI::App& bench, Action& action);  // bench comm

// Shared by the bench commands. Sizes in bytes: "4G", "512M", "1048576" (binary units); counts
// of elements: "256M" = 256 x 2^20. Both throw CLI::ValidationError naming the option.
std::uint64_t parse_size(const std::string& text, const std::string& option);
std::size_t parse_count(const std::string& text, const std::string& option);
// "4G", "256M", "64K" for a byte count that is a whole number of those units, else the bytes.
std::string size_label(std::uint64_t bytes);
// The Python that draws plots (matplotlib): ZINF_PYTHON, else /usr/bin/python3 (Debian's), else python3.
std::string python_for_plots();
// Date, host, CPU, kernel and the device, mount and file system holding `path`.
config::Json machine_json(const std::string& path);
// The current time as ISO 8601 UTC ("2026-11-21T21:17:00Z"), for benchmark records.
std::string utc_timestamp();
// A config file or preset, "auto" allowed; zinf::Error listing its errors.
config::DeepSpeedConfig load_bench_config(const std::string& path);

// A whole number within int64 (an unsigned one unless allow_negative): CLI11 alone would clamp
// "99999999999999999999999" to the largest value, and wrap "-1" for an unsigned option.
CLI::Validator whole_number(bool allow_negative = false);
// A finite number: CLI11's ranges let NaN through (every comparison with it is false).
CLI::Validator finite_number();

// Adds --micro-batch, --grad-accum, --world-size, --lr, ... to `cmd`, writing into `args`.
void add_training_args(CLI::App& cmd, config::TrainingArgs& args);
bool any_training_arg(const config::TrainingArgs& args);

// A config with every "auto" filled from `args` (or their defaults), parsed and validated for the
// arguments' world size. zinf::Error with the mismatch report, the unresolvable keys or the
// config's errors.
struct ResolvedConfig {
  config::Resolution resolution;
  config::ParseResult parsed;
};
ResolvedConfig resolve_and_parse(const config::LoadedDocument& doc, const config::TrainingArgs& args);

}  // namespace zinf::tools
