#pragma once
// What a run reports: one row of training_metrics.csv per optimizer step (the columns defined
// once, below, in metrics.cpp) and summary.json at the end. Progress for a person goes to the
// caller's TrainOptions::on_progress; this library never prints. Internal to zinf_runtime.

#include <chrono>
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "zinf/runtime/run_mode.hpp"
#include "zinf/runtime/trainer.hpp"


namespace zinf::runtime {

// Seconds of one step by phase (the CSV's *_s columns).
struct PhaseTimes {
  double data = 0, forward = 0, backward = 0, optimizer = 0, offload_io = 0;
};

// One row of training_metrics.csv (docs/train.md lists the columns).
struct StepMetrics {
  std::int64_t step = 0;
  double epoch = 0;
  double loss = 0;
  double eval_loss = 0;  // NaN: no eval this step (an empty cell)
  double lr = 0, grad_norm = 0, loss_scale = 1;
  bool skipped = false;  // fp16 overflow: the step changed nothing
  std::uint64_t tokens = 0;  // seen so far, all ranks
  double tokens_per_s = 0, tflops = 0, step_s = 0;
  PhaseTimes phases;
  std::uint64_t gpu_mem_bytes = 0;   // the GPU's peak of zinf's allocations so far (0: CPU backend)
  std::uint64_t host_mem_bytes = 0;  // pinned (or pageable) host memory of the offload store
  std::uint64_t nvme_bytes = 0;      // offloaded state and parameters on NVMe
  std::int64_t live_params_hwm = 0;  // stage 3: the step's high-water mark of gathered elements
  std::uint64_t prefetch_hits = 0, prefetch_misses = 0;
  double param_wait_s = 0;
};

// training_metrics.csv, flushed row by row.
class MetricsCsv {
 public:
  // keep_through >= 0: continue an earlier file, keeping its rows of steps up to that one (rows
  // written after the checkpoint the run resumes from, and a torn last line, are dropped).
  MetricsCsv(const std::string& path, std::int64_t keep_through);
  void write(const StepMetrics& m);

  static std::string header();           // the column names, comma-separated
  static std::string row(const StepMetrics& m);

 private:
  std::string path_;
  std::ofstream out_;
};

class Backend;
class GradientPath;
struct GpuMemoryPlan;
class ParamCoordinator;

// A run's reporting: the log's opening lines, each step's CSV row (rank 0), progress (rank 0,
// through TrainOptions::on_progress), the wall-clock breakdown, and summary.json at the end. The
// trainer hands each step's outcome in; the memory, throughput and coordinator columns are read
// here from the components.
class RunReport {
 public:
  struct Sources {
    const TrainOptions* options = nullptr;
    const RunMode* mode = nullptr;
    const ModelLayout* layout = nullptr;
    Backend* backend = nullptr;
    offload::Offload* offload = nullptr;
    ParamCoordinator* coord = nullptr;  // stage 3
    const GradientPath* path = nullptr;
    int rank = 0, world = 1;
    std::int64_t total_steps = 1;
    std::uint64_t tokens_per_step = 0;  // all ranks
    double flops_per_token = 0;
    const GpuMemoryPlan* gpu_plan = nullptr;  // a GPU run's plan (null on the CPU backend)
  };
  explicit RunReport(const Sources& s);
  // Rank 0: deepspeed_config_auto.json and the CSV (a resumed run's kept up to `step`); the log's
  // description of the run.
  void open(bool resumed, std::int64_t step, const Sampler& sampler, double loss_scale);
  // A step is done: `row` holds its outcome (step, loss, lr, norm, phases, ...); `last`: the run
  // ends or stops after it.
  void step(StepMetrics row, bool last);
  void summary(const TrainResult& r, std::int64_t first_step, std::uint64_t tokens_seen, const Sampler& sampler);

 private:
  std::uint64_t nvme_bytes() const;
  Sources s_;
  std::optional<MetricsCsv> csv_;
  CoordinatorStats run_params_;  // the run's totals
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::int64_t first_step_ = 0;
};

// What summary.json says of a run (docs/train.md).
struct RunSummary {
  const TrainResult* result = nullptr;
  std::string model_source;
  config::Json model;  // model_config_json()
  std::int64_t parameters = 0;
  std::string param_dtype;
  std::string data_source;
  std::uint64_t data_tokens = 0;
  std::int64_t seq_len = 0;
  std::uint64_t train_samples = 0, eval_samples = 0;
  std::int64_t steps_this_run = 0;
  std::uint64_t tokens_seen = 0;
  double tokens_this_run = 0;
  double flops_per_token = 0;
  double wall_seconds = 0;
  std::uint64_t gpu_peak_bytes = 0, host_pinned_bytes = 0, nvme_bytes = 0;
  const config::ZeroConfig* zero = nullptr;
  int world = 1;
  std::uint64_t buckets_reduced = 0;
  CoordinatorStats params;  // the run's totals
  std::int64_t largest_unit = 0;
  std::string backend;
  config::Json gpu_memory;  // null on the CPU backend
  const RunMode* mode = nullptr;
  const config::Json* deepspeed_config = nullptr;
  config::Json path_sections = config::Json::object();  // the gradient path's own (LoRA's "lora")
};
config::Json run_summary(const RunSummary& s);

}  // namespace zinf::runtime
