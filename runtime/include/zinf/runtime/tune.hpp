#pragma once
// `zinf tune --report`: a DeepSpeed config tuned to the machine a bench report measured (and, with
// a model, to the model): the aio block from the io bench; with a model, the stage-3 prefetch
// bucket, staging sizes, and the live-parameter budget and GPU share of the optimizer state
// (offload_optimizer.ratio) whose predicted step (zinf plan) is fastest while fitting the GPU,
// with bf16 gradients where the host memory needs them. Each choice comes with its reason.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "zinf/configs/document.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/plan.hpp"

namespace zinf::runtime {

struct TuneRequest {
  std::string base;                   // the config (file or preset) to start from
  nlohmann::json report;              // `zinf bench all --json`
  std::optional<ModelConfig> model;   // size the stage-3 budgets for it
  std::uint64_t gpu_mem = 0;          // per GPU; 0: the report's GPU
  int gpus = 1;
  std::string device = "cuda";
  std::int64_t seq_len = 2048;
  std::string nvme_path;              // set in the NVMe sections when given
  std::optional<double> max_grad_norm;
  // Plans a trial config against `gpu_mem` bytes per GPU (the caller's run options: batch,
  // precision, LoRA, host memory); used with a model.
  std::function<Plan(const config::LoadedDocument& trial, std::uint64_t gpu_mem)> plan;
};

struct TuneResult {
  config::Json config;            // parsed and valid ("auto" may remain)
  std::vector<std::string> why;   // one line per choice
  std::optional<Plan> plan;       // with a model: the chosen config's plan
};

// Throws zinf::Error when no budget fits the GPU, or the host memory cannot hold the state even
// with bf16 gradients (nothing is written then).
TuneResult tune_config(const TuneRequest& request);

}  // namespace zinf::runtime
