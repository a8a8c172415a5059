#pragma once
// `zinf bench model`'s measurement: forward + backward of a model on a backend (random tokens, so
// the step does the same work whatever the text), timed over `steps` after `warmup`, then as many
// steps again with each op timed (a GPU waits for every op then, so those are not the ones timed).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

struct ModelBenchOptions {
  ModelConfig model;
  std::int64_t seq = 512, batch = 2;
  kernels::cpu::DType dtype = kernels::cpu::DType::kBF16;
  std::string backend = "cpu";  // or "cuda"
  int device = 0;
  int steps = 3, warmup = 1;
  bool checkpoint_activations = true;
};

struct ModelBenchResult {
  std::string backend;              // the backend's description
  std::int64_t parameters = 0;
  std::int64_t tokens = 0;          // per step
  std::vector<double> step_seconds;  // the timed steps, sorted
  double median_seconds = 0;
  float loss = 0;
  std::uint64_t activation_bytes = 0;
  double flops = 0;                 // model FLOPs of one step (no recomputation)
  struct Op {
    std::string op;
    OpProfile::Entry e;             // over the profiled steps
  };
  std::vector<Op> ops;              // slowest first
  double profiled_seconds = 0;      // the profiled steps' wall time (at least the ops' sum)
  double in_ops_seconds = 0;
};

// Throws zinf::Error for a backend that cannot run (no GPU, not in this build).
ModelBenchResult bench_model_step(const ModelBenchOptions& options, const std::function<void(const std::string&)>& progress);

}  // namespace zinf::runtime
