#pragma once
// zinf plan's memory tiers (GPU, pinned and pageable host, NVMe), assembled from the functions the
// trainer itself calls: decide_run_mode, plan_gpu_memory, offload::place_units and the host
// memory reserve. Internal to zinf_runtime; plan.cpp adds the step-time model.

#include <cstdint>
#include <optional>

#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/plan.hpp"
#include "zinf/runtime/run_mode.hpp"

namespace zinf::runtime {

// What the step-time model needs to know of the planned run (per rank unless said).
struct PlannedRun {
  RunMode mode;
  bool gpu = false, lora = false, stage3 = false, nccl = false;
  std::uint64_t W = 1;          // ranks
  std::uint64_t E = 0;          // the model's elements
  std::uint64_t S = 0;          // this rank's elements (its shards)
  std::uint64_t gpu_share = 0;  // elements whose optimizer state lives on the GPU
  std::uint64_t pb = 2;         // bytes of a compute-copy parameter
  std::uint64_t gbytes = 4;     // bytes of a gradient as stepped
  std::uint64_t lora_numel = 0;
  std::optional<LoraLayout> lora_layout;
  std::uint64_t nvme_state = 0, nvme_params = 0;  // bytes on NVMe
};

// Fills p.tiers, p.pipeline and the notes about memory.
PlannedRun plan_memory(const PlanInputs& in, Plan& p);

}  // namespace zinf::runtime
