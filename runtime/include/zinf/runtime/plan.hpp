#pragma once
// `zinf plan`: what a training run needs in each memory tier (GPU, pinned host, pageable host,
// NVMe), whether it fits the machine, and how long a step should take given measured (or default)
// bandwidths, naming what bounds it. The byte counts follow the trainer's own allocations (its GPU
// plan, the partition store's host plan); the step model follows the overlapped pipeline
// (docs/gpu.md). tests/unit/plan_test.cpp checks both against the runs recorded in bench/results/.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

// Rates the step prediction uses. Each has a source: "measured (FILE)" or "default".
struct MachineRates {
  double h2d_GBps = 25;            // pinned host -> GPU
  double d2h_GBps = 25;            // GPU -> pinned host
  double both_GBps = 40;           // both directions at once
  double host_mem_GBps = 100;      // STREAM triad, all cores
  double adam_params_per_s = 2e9;  // the host AdamW step (fp32 state, bf16 parameters out), all cores
  double nvme_read_GBps = 2.0;
  double nvme_write_GBps = 2.0;
  double gpu_model_tflops = 250;   // model TFLOP/s of a resident training step (zinf bench model)
  double gemm_peak_tflops = 0;     // bf16 GEMM peak (0: unknown)
  double nvlink_GBps = 150;        // GPU-to-GPU collective bandwidth (bus bandwidth)
  double cpu_model_tflops = 0.2;   // model TFLOP/s of the CPU backend (--device cpu)
  std::map<std::string, std::string> source;  // rate name -> "measured (...)" / "default"

  MachineRates();  // every source "default"
  // Rates from a `zinf bench all --json` report (or a single sub-bench's JSON); what the report
  // does not hold keeps its default. Throws zinf::Error when the file is unreadable or not a report.
  // `option` names the command-line option in errors (--bench, --report).
  static MachineRates from_report(const std::string& path, const std::string& option = "--bench");
  // The same from a report already read (read_report: the file parsed, errors naming `option`).
  static nlohmann::json read_report(const std::string& path, const std::string& option = "--bench");
  static MachineRates from_report_json(const nlohmann::json& report, const std::string& path, const std::string& option);
  nlohmann::json to_json() const;

 private:
  static MachineRates rates_of(const nlohmann::json& report, const std::string& path, const std::string& option);
};

struct PlanInputs {
  ModelConfig model;
  config::DeepSpeedConfig ds;  // resolved: no "auto"
  std::string device = "cuda";  // "cuda" or "cpu" (the backend)
  int gpus = 1;                 // ranks (GPUs) on this machine
  std::int64_t micro_batch = 1;
  std::int64_t seq_len = 2048;
  std::int64_t grad_accum = 1;
  // Capacities (bytes); 0 = not given, that tier's fit is not judged.
  std::uint64_t gpu_mem = 0;   // per GPU
  std::uint64_t host_mem = 0;  // the machine's RAM, all ranks together
  std::uint64_t nvme = 0;      // free space at the NVMe path(s)
  // LoRA (rank > 0): a frozen bf16 base (no gradients, no optimizer state) and the adapters, whose
  // Adam state is on the GPU unless lora_offload_optimizer.
  LoraConfig lora;
  bool lora_offload_optimizer = false;
};

struct PlanItem {
  std::string what;
  std::uint64_t bytes = 0;
};

struct TierPlan {
  std::string name;  // "gpu" (per GPU), "host_pinned", "host_pageable", "nvme" (all ranks)
  std::vector<PlanItem> items;
  std::uint64_t capacity = 0;  // 0: not given
  std::uint64_t total() const;
  // "fits", "does not fit", "unknown" (no capacity given), "unused" (nothing needed)
  std::string verdict() const;
};

struct StepPart {
  std::string name;  // "compute", "pcie", "host", "nvme", "gpu_collectives"
  double seconds = 0;
  std::string detail;
};

struct Plan {
  std::vector<TierPlan> tiers;   // gpu, host_pinned, host_pageable, nvme
  bool pipeline = false;         // the overlapped GPU pipeline applies
  std::vector<StepPart> parts;
  double lower_s = 0;            // everything overlapped: the longest part
  double upper_s = 0;            // nothing overlapped: the sum
  double predicted_s = 0;
  std::string bound;             // the part that sets predicted_s
  double tokens_per_step = 0;    // per rank
  std::vector<std::string> notes;
  MachineRates rates;

  bool fits() const;  // no tier "does not fit"
  nlohmann::json to_json() const;
  std::string text() const;
};

Plan make_plan(const PlanInputs& in, const MachineRates& rates);

}  // namespace zinf::runtime
