// `zinf bench adam`: throughput of the CPU optimizer kernels (params/s and bytes/s actually moved)
// for each ISA, next to a STREAM-style copy and triad measured in the same run with the same
// threads, so each kernel's bandwidth reads as a fraction of what the memory system delivers. The
// measurement is kernels::cpu::bench_optimizers (kernels/cpu/optim_bench.cpp); this prints it.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/cpu_optim_bench.hpp"

namespace zinf::tools {

// Element counts: "256M" = 256 x 2^20, "1G", "1000000".
std::size_t parse_count(const std::string& text, const std::string& option) {
  std::size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw CLI::ValidationError(option, fmt::format("'{}' is not a count (examples: 256M, 1G, 1000000)", text));
  }
  const std::string unit = text.substr(pos);
  double mult = 1;
  if (unit == "K" || unit == "k") mult = 1024.0;
  else if (unit == "M" || unit == "m") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "g") mult = 1024.0 * 1024 * 1024;
  else if (!unit.empty()) throw CLI::ValidationError(option, fmt::format("'{}': unknown unit '{}' (K, M, G)", text, unit));
  if (!(v * mult >= 1) || v * mult > 1e12) throw CLI::ValidationError(option, fmt::format("'{}' is out of range", text));
  return static_cast<std::size_t>(v * mult);
}

namespace {

using config::Json;
namespace kc = kernels::cpu;
using Clock = std::chrono::steady_clock;

struct BenchAdamOptions {
  std::string params_text = "256M";
  std::size_t params = 256u << 20;
  unsigned threads = 0;
  std::string grad_dtype_text = "bf16";
  kc::DType grad_dtype = kc::DType::kBF16;
  std::vector<std::string> isas_text;
  unsigned repeat = 5;
  bool json = false;
};

kc::DType parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "f32") return kc::DType::kF32;
  if (s == "bf16") return kc::DType::kBF16;
  if (s == "fp16" || s == "f16") return kc::DType::kF16;
  throw CLI::ValidationError("--grad-dtype", fmt::format("'{}': choose fp32, bf16 or fp16", s));
}

int run_bench_adam(const BenchAdamOptions& o) {
  kc::OptimBenchOptions b;
  b.params = o.params;
  b.threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  b.grad_dtype = o.grad_dtype;
  b.repeat = o.repeat;
  for (const auto& s : o.isas_text) b.isas.push_back(kc::parse_isa(s));
  const bool show_progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  const std::vector<kc::KernelTiming> results = kc::bench_optimizers(b, [&](const std::string& what) {
    if (show_progress) std::cerr << fmt::format("\r  {:<48}", what) << std::flush;
  });
  const unsigned threads = b.threads;
  const std::size_t n = o.params;
  if (show_progress) std::cerr << fmt::format("\r{:50}\r", "");

  double triad = 0;
  for (const auto& r : results) {
    if (r.kernel == "stream_triad") triad = r.bytes_per_s();
  }
  const auto& f = kernels::cpu_features();
  const std::string date = utc_timestamp();
  if (o.json) {
    Json j;
    j["date"] = date;
    j["cpu"] = kernels::describe(f);
    j["threads"] = threads;
    j["params"] = n;
    j["grad_dtype"] = kc::dtype_name(o.grad_dtype);
    j["repeat"] = o.repeat;
    j["stream_triad_GBps"] = triad / 1e9;
    Json ks = Json::array();
    for (const auto& r : results) {
      ks.push_back({{"kernel", r.kernel},
                    {"isa", r.isa},
                    {"params_per_s", r.params_per_s()},
                    {"bytes_per_s", r.bytes_per_s()},
                    {"bytes_per_param", r.bytes_per_param},
                    {"seconds_best", r.best_seconds},
                    {"seconds_median", r.median_seconds},
                    {"fraction_of_triad", r.bytes_per_s() / triad}});
    }
    j["kernels"] = ks;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("zinf bench adam: {} parameters, {} threads, {} gradients, best of {} (cpu: {})\n\n", n,
                           threads, kc::dtype_name(o.grad_dtype), o.repeat, kernels::describe(f));
  std::cout << fmt::format("{:<34} {:<7} {:>10} {:>9} {:>9} {:>10}\n", "kernel", "isa", "Gparam/s", "B/param",
                           "GB/s", "of triad");
  for (const auto& r : results) {
    std::cout << fmt::format("{:<34} {:<7} {:>10.3f} {:>9.0f} {:>9.1f} {:>9.0f}%\n", r.kernel, r.isa,
                             r.params_per_s() / 1e9, r.bytes_per_param, r.bytes_per_s() / 1e9,
                             100.0 * r.bytes_per_s() / triad);
  }
  std::cout << "\nbytes are those each kernel must move (reads + writes, no write-allocate), as STREAM counts them.\n";
  return kExitOk;
}

}  // namespace

void add_bench_adam_command(CLI::App& bench, Action& action) {
  auto o = std::make_shared<BenchAdamOptions>();
  auto* cmd = bench.add_subcommand("adam", "CPU optimizer kernels (params/s, bytes/s) against a same-run STREAM triad");
  cmd->add_option("--params", o->params_text, "parameters per kernel call (default 256M = 256 x 2^20)");
  cmd->add_option("--threads", o->threads, "threads (default: all cores)")->check(CLI::Range(1u, 4096u));
  cmd->add_option("--grad-dtype", o->grad_dtype_text, "gradient dtype of the host step: bf16 (default), fp16, fp32");
  cmd->add_option("--isa", o->isas_text,
                  "ISAs to run (default: ZINF_CPU_ISA if set, else every one this CPU has): avx512, avx2, scalar")
      ->delimiter(',');
  cmd->add_option("--repeat", o->repeat, "timed runs per kernel after one warm-up (default 5)")
      ->check(CLI::Range(1u, 1000u));
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback([o, &action] {
    o->params = parse_count(o->params_text, "--params");
    o->grad_dtype = parse_dtype(o->grad_dtype_text);
    action = [o] { return run_bench_adam(*o); };
  });
}

}  // namespace zinf::tools
