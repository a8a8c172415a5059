// `zinf bench model`: forward + backward throughput of the model on the CPU backend (tokens/s,
// achieved FLOP/s) and where the time goes per op, for a Hugging Face config.json. The measurement
// is runtime::bench_model_step (runtime/src/model_bench.cpp); this prints it.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/summary.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/runtime/model_bench.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::tools {
namespace {

using config::Json;
using runtime::DType;

struct BenchModelOptions {
  std::string model;
  std::int64_t seq = 512;
  std::int64_t batch = 2;
  std::string dtype_text = "bf16";
  std::string backend = "cpu";
  int device = 0;
  int steps = 3;
  int warmup = 1;
  bool no_checkpoint = false;
  bool json = false;
};

std::string config_path(const std::string& model) {
  std::error_code ec;
  if (std::filesystem::is_directory(model, ec)) return (std::filesystem::path(model) / "config.json").string();
  return model;
}

int run_bench_model(const BenchModelOptions& o) {
  runtime::ModelBenchOptions b;
  b.model = runtime::load_model_config(config_path(o.model));
  b.seq = o.seq;
  b.batch = o.batch;
  b.dtype = o.dtype_text == "fp32" ? DType::kF32 : DType::kBF16;
  b.backend = o.backend;
  b.device = o.device;
  b.steps = o.steps;
  b.warmup = o.warmup;
  b.checkpoint_activations = !o.no_checkpoint;
  const bool progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  const runtime::ModelBenchResult r = runtime::bench_model_step(b, [&](const std::string& what) {
    if (progress) std::cerr << "\r  " << what << std::flush;
  });
  if (progress) std::cerr << fmt::format("\r{:40}\r", "");
  const runtime::ModelConfig& cfg = b.model;
  const std::int64_t n = r.tokens;
  const double median = r.median_seconds, flops = r.flops, total_profiled = r.profiled_seconds, in_ops = r.in_ops_seconds;
  const float loss = r.loss;
  const auto& rows = r.ops;
  const std::string date = utc_timestamp();
  if (o.json) {
    Json j;
    j["date"] = date;
    j["model"] = cfg.summary();
    j["config"] = config_path(o.model);
    j["parameters"] = r.parameters;
    j["backend"] = r.backend;
    j["cpu"] = kernels::describe(kernels::cpu_features());
    j["dtype"] = o.dtype_text;
    j["checkpoint_activations"] = !o.no_checkpoint;
    j["batch"] = o.batch;
    j["seq"] = o.seq;
    j["steps"] = o.steps;
    j["step_seconds_median"] = median;
    j["step_seconds_min"] = r.step_seconds.front();
    j["tokens_per_s"] = static_cast<double>(n) / median;
    j["model_tflops"] = flops / median / 1e12;
    j["loss"] = loss;
    j["activation_bytes"] = r.activation_bytes;
    Json ops = Json::array();
    for (const auto& row : rows) {
      ops.push_back({{"op", row.op},
                     {"calls_per_step", row.e.calls / o.steps},
                     {"seconds_per_step", row.e.seconds / o.steps},
                     {"fraction", row.e.seconds / total_profiled},
                     {"gflops", row.e.flops > 0 ? row.e.flops / row.e.seconds / 1e9 : 0.0}});
    }
    j["ops"] = ops;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("zinf bench model: {}\n", cfg.summary());
  std::cout << fmt::format("  {}; {} weights, activation checkpointing {}\n", r.backend, o.dtype_text,
                           o.no_checkpoint ? "off" : "on");
  std::cout << fmt::format("  cpu: {}\n", kernels::describe(kernels::cpu_features()));
  std::cout << fmt::format("  batch {} x seq {} = {} tokens; median of {} steps after {} warm-up\n\n", o.batch, o.seq,
                           n, o.steps, o.warmup);
  std::cout << fmt::format("forward+backward  {:>9.3f} s/step  {:>10.1f} tokens/s  {:>7.3f} model TFLOP/s  loss {:.4f}\n",
                           median, static_cast<double>(n) / median, flops / median / 1e12, loss);
  std::cout << fmt::format("activations       {:>9.1f} MiB\n\n", static_cast<double>(r.activation_bytes) / (1 << 20));
  std::cout << fmt::format("{:<22} {:>9} {:>11} {:>7} {:>9}\n", "op", "calls", "ms/step", "share", "GFLOP/s");
  for (const auto& row : rows) {
    std::cout << fmt::format("{:<22} {:>9} {:>11.2f} {:>6.1f}% {:>9}\n", row.op, row.e.calls / o.steps,
                             1e3 * row.e.seconds / o.steps, 100.0 * row.e.seconds / total_profiled,
                             row.e.flops > 0 ? fmt::format("{:.1f}", row.e.flops / row.e.seconds / 1e9) : std::string("-"));
  }
  std::cout << fmt::format("{:<22} {:>9} {:>11.2f} {:>6.1f}%\n", "(outside ops)", "",
                           1e3 * (total_profiled - in_ops) / o.steps, 100.0 * (total_profiled - in_ops) / total_profiled);
  std::cout << "\nmodel TFLOP/s counts 6 FLOPs per parameter per token plus attention, not the recomputation of\n"
               "checkpointed layers; the GFLOP/s of an op counts the FLOPs it performs.\n";
  return kExitOk;
}

}  // namespace

void add_bench_model_command(CLI::App& bench, Action& action) {
  auto o = std::make_shared<BenchModelOptions>();
  auto* cmd = bench.add_subcommand("model", "Model forward+backward on the CPU backend: tokens/s and time per op");
  cmd->add_option("--model", o->model, "Hugging Face config.json (or a directory holding one)")->required();
  cmd->add_option("--seq", o->seq, "sequence length (default 512)")->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  cmd->add_option("--batch", o->batch, "sequences per step (default 2)")->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  cmd->add_option("--dtype", o->dtype_text, "parameter dtype: bf16 (default; bf16 products, fp32 accumulation) or fp32")
      ->check(CLI::IsMember({"bf16", "fp32"}));
  cmd->add_option("--steps", o->steps, "timed steps (default 3)")->check(CLI::Range(1, 1000));
  cmd->add_option("--warmup", o->warmup, "untimed steps first (default 1)")->check(CLI::Range(0, 100));
  cmd->add_flag("--no-checkpoint", o->no_checkpoint, "keep every layer's activations (no recomputation)");
  cmd->add_option("--backend", o->backend, "cpu (default) or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--device", o->device, "GPU for --backend cuda (default 0)")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback([o, &action] { action = [o] { return run_bench_model(*o); }; });
}

}  // namespace zinf::tools
