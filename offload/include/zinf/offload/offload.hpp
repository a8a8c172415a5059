#pragma once
// From a DeepSpeed config to a working offload: the settings (what `offload_optimizer`,
// `offload_param`, `sub_group_size` and `aio` mean for zinf) and the one place where the io_uring
// engine, the swap stores, host memory, the partition store and the optimizer stepper are built,
// in the order they depend on each other.

#include <oneapi/tbb/task_arena.h>

#include <memory>
#include <string>
#include <vector>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/io/engine.hpp"
#include "zinf/io/swap_store.hpp"
#include "zinf/offload/host_memory.hpp"
#include "zinf/offload/optimizer_step.hpp"
#include "zinf/offload/partition_store.hpp"

namespace zinf::offload {

struct OffloadSettings {
  config::OffloadDevice optimizer_device = config::OffloadDevice::kNone;
  config::OffloadDevice param_device = config::OffloadDevice::kNone;
  // Swap directories: `nvme_path`, several separated by commas to stripe over several drives.
  std::vector<std::string> optimizer_paths;
  std::vector<std::string> param_paths;
  bool pin_memory = true;
  std::uint64_t host_budget_bytes = 0;  // 0: no budget beyond what the machine has
  StoreOptions store;
  io::EngineOptions aio;
  StepperOptions stepper;
  // offload_optimizer.ratio < 1 with device cpu (DeepSpeed's partial offload): the fraction of the
  // optimizer state to keep on the GPU, 1 - ratio. The trainer honours it where it can (the one-GPU
  // pipeline at stage 3) and says so otherwise; the store still holds the whole state.
  double gpu_optimizer_fraction = 0.0;
  // Config keys accepted but not acted on, and why (one line each, for the log).
  std::vector<std::string> notes;
};

// The partition store's part of the config: slicing, NVMe ratio, parameter placement and
// staging (no paths: `zinf plan` places units without touching a drive). Throws zinf::Error for
// a sub_group_size below 1.
StoreOptions store_options(const config::DeepSpeedConfig& config);

// Maps the config (already validated by the configs module). Throws zinf::Error for values the
// offload cannot honour (a bad ZINF_OFFLOAD_* variable among them).
OffloadSettings offload_settings(const config::DeepSpeedConfig& config);

// Splits an nvme_path value on commas, dropping empty entries and surrounding spaces.
std::vector<std::string> split_nvme_paths(const std::string& value);

// Everything one rank's offload needs, built from settings. Members are destroyed in reverse:
// the stepper and store before the swap stores, the swap stores (which wait for their I/O and
// remove their files) before the engine.
class Offload {
 public:
  // `arena` runs the optimizer step (size it to this rank's share of the cores). Throws
  // zinf::Error when host memory, the memlock limit or the disk cannot hold the plan, naming the
  // numbers and the fix, before anything is allocated.
  Offload(const OffloadSettings& settings, std::vector<UnitSpec> units, int rank, tbb::task_arena& arena);
  ~Offload();
  Offload(const Offload&) = delete;
  Offload& operator=(const Offload&) = delete;

  PartitionStore& store() noexcept { return *store_; }
  OptimizerStepper& stepper() noexcept { return *stepper_; }
  HostMemory& memory() noexcept { return *memory_; }
  io::IoEngine* engine() noexcept { return engine_.get(); }

 private:
  std::unique_ptr<io::IoEngine> engine_;
  std::unique_ptr<io::SwapStore> optimizer_swap_;
  std::unique_ptr<io::SwapStore> param_swap_;  // null when it is the optimizer's
  std::unique_ptr<HostMemory> memory_;
  std::unique_ptr<PartitionStore> store_;
  std::unique_ptr<OptimizerStepper> stepper_;
};

}  // namespace zinf::offload
