// `zinf bench model`: forward + backward throughput of the model on the CPU backend (tokens/s,
// achieved FLOP/s) and where the time goes per op, for a Hugging Face config.json.
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
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/flops.hpp"
#include "zinf/runtime/weights.hpp"

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
  const runtime::ModelConfig cfg = runtime::load_model_config(config_path(o.model));
  const DType dtype = o.dtype_text == "fp32" ? DType::kF32 : DType::kBF16;
  auto backend = o.backend == "cuda" ? runtime::make_cuda_backend(runtime::CudaBackendOptions{o.device})
                                     : runtime::make_cpu_backend();
  runtime::Model model(cfg, *backend, runtime::ModelOptions{dtype, !o.no_checkpoint, {}});
  const runtime::ModelLayout& layout = model.layout();
  runtime::UnitStorage params(*backend, layout, dtype), grads(*backend, layout, DType::kF32);
  runtime::init_parameters(cfg, layout, 1234, *backend, params.view());

  // Random tokens, next-token targets: the step does the same work whatever the text.
  const std::int64_t n = o.batch * o.seq;
  std::mt19937 rng(42);
  std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(cfg.vocab_size - 1));
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(n)), targets(static_cast<std::size_t>(n));
  for (auto& t : tokens) t = tok(rng);
  for (std::int64_t i = 0; i < n; ++i) targets[i] = (i + 1) % o.seq == 0 ? -100 : tokens[i + 1];
  model.set_batch(tokens, targets, o.batch, o.seq);

  const bool progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  std::vector<double> times;
  double profiled_wall = 0;
  float loss = 0;
  // Warm-up, timed steps, then as many steps again with each op timed (the per-op table; a GPU
  // waits for every op then, so those steps are not the ones timed).
  for (int s = 0; s < o.warmup + 2 * o.steps; ++s) {
    if (progress) std::cerr << fmt::format("\r  step {}/{} ...", s + 1, o.warmup + 2 * o.steps) << std::flush;
    const bool timed = s >= o.warmup && s < o.warmup + o.steps;
    backend->set_profiling(s >= o.warmup + o.steps);
    const auto t0 = std::chrono::steady_clock::now();
    grads.zero();
    loss = model.forward(params.view());
    model.backward(params.view(), grads.view());
    backend->synchronize();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (timed) times.push_back(dt);
    if (backend->profiling()) profiled_wall += dt;
  }
  backend->set_profiling(false);
  if (progress) std::cerr << fmt::format("\r{:40}\r", "");

  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  double total_profiled = 0;  // wall time of the profiled steps
  for (const auto& [op, e] : backend->profile().ops) total_profiled += e.seconds;
  total_profiled = std::max(total_profiled, profiled_wall);
  // Model FLOPs of one training step (no recomputation).
  const double flops = static_cast<double>(n) * runtime::training_flops_per_token(cfg, o.seq);
  struct Row {
    std::string op;
    runtime::OpProfile::Entry e;
  };
  std::vector<Row> rows;
  for (const auto& [op, e] : backend->profile().ops) rows.push_back({op, e});
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.e.seconds > b.e.seconds; });
  const double in_ops = std::accumulate(rows.begin(), rows.end(), 0.0, [](double s, const Row& r) { return s + r.e.seconds; });

  const std::string date = utc_timestamp();
  if (o.json) {
    Json j;
    j["date"] = date;
    j["model"] = cfg.summary();
    j["config"] = config_path(o.model);
    j["parameters"] = layout.parameter_count();
    j["backend"] = backend->describe();
    j["cpu"] = kernels::describe(kernels::cpu_features());
    j["dtype"] = o.dtype_text;
    j["checkpoint_activations"] = !o.no_checkpoint;
    j["batch"] = o.batch;
    j["seq"] = o.seq;
    j["steps"] = o.steps;
    j["step_seconds_median"] = median;
    j["step_seconds_min"] = times.front();
    j["tokens_per_s"] = static_cast<double>(n) / median;
    j["model_tflops"] = flops / median / 1e12;
    j["loss"] = loss;
    j["activation_bytes"] = model.activation_bytes();
    Json ops = Json::array();
    for (const Row& r : rows) {
      ops.push_back({{"op", r.op},
                     {"calls_per_step", r.e.calls / o.steps},
                     {"seconds_per_step", r.e.seconds / o.steps},
                     {"fraction", r.e.seconds / total_profiled},
                     {"gflops", r.e.flops > 0 ? r.e.flops / r.e.seconds / 1e9 : 0.0}});
    }
    j["ops"] = ops;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("zinf bench model: {}\n", cfg.summary());
  std::cout << fmt::format("  {}; {} weights, activation checkpointing {}\n", backend->describe(), o.dtype_text,
                           o.no_checkpoint ? "off" : "on");
  std::cout << fmt::format("  cpu: {}\n", kernels::describe(kernels::cpu_features()));
  std::cout << fmt::format("  batch {} x seq {} = {} tokens; median of {} steps after {} warm-up\n\n", o.batch, o.seq,
                           n, o.steps, o.warmup);
  std::cout << fmt::format("forward+backward  {:>9.3f} s/step  {:>10.1f} tokens/s  {:>7.3f} model TFLOP/s  loss {:.4f}\n",
                           median, static_cast<double>(n) / median, flops / median / 1e12, loss);
  std::cout << fmt::format("activations       {:>9.1f} MiB\n\n", static_cast<double>(model.activation_bytes()) / (1 << 20));
  std::cout << fmt::format("{:<22} {:>9} {:>11} {:>7} {:>9}\n", "op", "calls", "ms/step", "share", "GFLOP/s");
  for (const Row& r : rows) {
    std::cout << fmt::format("{:<22} {:>9} {:>11.2f} {:>6.1f}% {:>9}\n", r.op, r.e.calls / o.steps,
                             1e3 * r.e.seconds / o.steps, 100.0 * r.e.seconds / total_profiled,
                             r.e.flops > 0 ? fmt::format("{:.1f}", r.e.flops / r.e.seconds / 1e9) : std::string("-"));
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
