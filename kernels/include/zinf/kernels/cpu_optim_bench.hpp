#pragma once
// `zinf bench adam`'s measurement: the CPU optimizer kernels (bare AdamW, the fused host step with
// scaled gradients in and bf16 parameters out, the whole host step with its gradient statistics,
// bf16 state, Adagrad, Lion) on page-aligned arrays first touched by their threads, next to STREAM
// copy and triad over the same arena, for each ISA asked for. Bytes are those each kernel must move
// (reads + writes, no write-allocate), as STREAM counts them.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "zinf/kernels/cpu_optim.hpp"

namespace zinf::kernels::cpu {

struct OptimBenchOptions {
  std::size_t params = 256u << 20;
  unsigned threads = 1;
  DType grad_dtype = DType::kBF16;
  std::vector<Isa> isas;  // empty: every ISA this CPU runs (or only ZINF_CPU_ISA's, when set)
  unsigned repeat = 5;    // timed runs after one warm-up
};

struct KernelTiming {
  std::string kernel;
  std::string isa;
  double bytes_per_param = 0;
  double best_seconds = 0, median_seconds = 0;
  std::size_t n = 0;
  double params_per_s() const { return static_cast<double>(n) / best_seconds; }
  double bytes_per_s() const { return params_per_s() * bytes_per_param; }
};

// Throws zinf::Error when the arrays cannot be allocated (lower params) or an ISA asked for does
// not run here. `progress` hears each kernel as it starts.
std::vector<KernelTiming> bench_optimizers(const OptimBenchOptions& options,
                                           const std::function<void(const std::string&)>& progress);

}  // namespace zinf::kernels::cpu
