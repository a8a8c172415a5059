#pragma once
// How a run trains, decided once from the config, the model's units and the machine: the ZeRO
// partitioning, whether the overlapped GPU pipeline runs (and why not), NCCL between GPUs, the
// dtypes of parameters and gradients, where the pipeline's gradients land, which units the GPU
// steps itself (offload_optimizer.ratio), and each rank's shard of every unit. The trainer builds
// itself from a RunMode, and `zinf plan` plans from the same function, so the two cannot differ.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/kernels/cpu_optim.hpp"

namespace zinf::runtime {

struct RunModeInputs {
  int stage = 0;  // ZeRO stage
  int world = 1;  // ranks
  std::int64_t grad_accum = 1;
  bool bf16 = false, fp16 = false;
  bool lora = false;  // adapters on a frozen base
  std::string device = "cpu";  // "cpu" or "cuda"
  std::optional<config::Dtype> communication_data_type;
  // offload_optimizer.ratio < 1 with device cpu (DeepSpeed's partial offload): 1 - ratio.
  double gpu_optimizer_fraction = 0;
  bool params_on_nvme = false;  // offload_param.device nvme
  bool gpu_overlap = true;      // false: the synchronous path, for comparison (--gpu-overlap off)
  bool gradient_hook = false;   // a hook may change the gradients before the step: synchronous path
  bool nccl_usable = true;      // every rank can use NCCL (several GPUs in the pipeline)
  std::vector<std::int64_t> units;  // elements of each unit, in forward order

  // The config's part of the inputs (stage, accumulation, precision, communication dtype, the
  // GPU's optimizer fraction, parameters on NVMe); the caller adds the rest.
  static RunModeInputs from_config(const config::DeepSpeedConfig& ds);
};

struct RunMode {
  int world = 1;
  bool lora = false;             // adapters on a frozen base (no gradients, no optimizer state for it)
  bool stage3 = false;           // parameters gathered per use (the coordinator)
  bool sharded = false;          // optimizer state (and gradients) split across ranks
  bool partition_grads = false;  // stage >= 2: each unit's gradient reduced as its backward finishes
  bool pipeline = false;         // the overlapped GPU pipeline (docs/gpu.md)
  bool nccl = false;             // several GPUs in the pipeline: collectives GPU to GPU over NCCL
  std::string no_pipeline;       // on a GPU without the pipeline: why
  kernels::cpu::DType param_dtype = kernels::cpu::DType::kF32;  // of the compute copy
  kernels::cpu::DType grad_dtype = kernels::cpu::DType::kF32;   // of the gradients the pipeline steps
  bool grads_in_params = false;  // bf16 gradients land in the store's bf16 parameter shards
  std::vector<char> on_gpu;      // units whose optimizer state lives and is stepped on the GPU
  std::size_t gpu_units = 0;     // they are units 0 to gpu_units - 1
  std::uint64_t gpu_elements = 0;
  std::vector<std::int64_t> numel;  // per unit
  std::vector<std::int64_t> shard;  // per unit: this rank's piece (the whole unit when unsharded)
  std::vector<std::string> notes;   // what the log says about the choices

  // Elements a gather of unit u writes: with NCCL the unit padded to `world` shards (an in-place
  // all-gather); its gradient buffer is as long.
  std::int64_t gather_elements(std::size_t u) const { return nccl ? shard[u] * world : numel[u]; }
  // Gradient shards the store allocates beside the state: the pipeline's page-locked ones, or
  // the synchronous path's pageable fp32 ones (bytes per unit; 0 where a unit needs none).
  std::uint64_t pinned_gradient_bytes(std::size_t u) const;
  std::uint64_t pageable_gradient_bytes(std::size_t u) const;
};

// Throws zinf::Error for a combination that cannot train (LoRA with fp16).
RunMode decide_run_mode(const RunModeInputs& in);

}  // namespace zinf::runtime
