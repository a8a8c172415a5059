#include "zinf/offload/offload.hpp"

#include <algorithm>
#include <filesystem>
#include <limits>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"

namespace zinf::offload {

using config::OffloadDevice;

std::vector<std::string> split_nvme_paths(const std::string& value) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= value.size()) {
    std::size_t comma = value.find(',', start);
    if (comma == std::string::npos) comma = value.size();
    std::string p = value.substr(start, comma - start);
    const auto first = p.find_first_not_of(" \t");
    const auto last = p.find_last_not_of(" \t");
    if (first != std::string::npos) out.push_back(p.substr(first, last - first + 1));
    start = comma + 1;
  }
  return out;
}

namespace {

// Paths as the file system resolves them ("/nvme/" and "/nvme/./" are "/nvme"), sorted.
std::vector<std::string> canonical(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  for (const std::string& p : paths) {
    std::error_code ec;
    const auto c = std::filesystem::weakly_canonical(p, ec);
    out.push_back(ec ? p : c.lexically_normal().string());
    while (out.back().size() > 1 && out.back().back() == '/') out.back().pop_back();
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

StoreOptions store_options(const config::DeepSpeedConfig& c) {
  StoreOptions o;
  const config::ZeroConfig& z = c.zero;
  if (z.sub_group_size < 1) throw Error("zero_optimization.sub_group_size must be at least 1, not {}", z.sub_group_size);
  o.slice_elems = static_cast<std::uint64_t>(z.sub_group_size);
  if (z.offload_optimizer) {
    o.optimizer_buffers = static_cast<unsigned>(std::clamp<std::int64_t>(z.offload_optimizer->buffer_count, 1, 1024));
    if (z.offload_optimizer->device == OffloadDevice::kNvme) o.nvme_ratio = z.offload_optimizer->ratio;
  }
  if (z.offload_param && z.offload_param->device == OffloadDevice::kNvme) {
    const config::OffloadParamConfig& p = *z.offload_param;
    o.params_on_nvme = true;
    o.param_buffers = static_cast<unsigned>(std::clamp<std::int64_t>(p.buffer_count, 1, 1024));
    o.param_buffer_elems = static_cast<std::uint64_t>(std::max<std::int64_t>(p.buffer_size, 1));
    o.max_in_cpu = static_cast<std::uint64_t>(std::max<std::int64_t>(p.max_in_cpu, 0));
  }
  return o;
}

OffloadSettings offload_settings(const config::DeepSpeedConfig& c) {
  OffloadSettings s;
  const config::ZeroConfig& z = c.zero;
  s.optimizer_device = z.optimizer_device();
  s.param_device = z.param_device();
  s.store = store_options(c);
  bool pin_opt = true, pin_param = true;
  if (z.offload_optimizer) {
    const config::OffloadOptimizerConfig& o = *z.offload_optimizer;
    pin_opt = o.pin_memory;
    if (o.device == OffloadDevice::kNvme) {
      s.optimizer_paths = split_nvme_paths(o.nvme_path);
      if (s.optimizer_paths.empty()) throw Error("offload_optimizer.nvme_path is empty: give the NVMe directory");
    } else if (o.device == OffloadDevice::kCpu && o.ratio < 1.0) {
      s.gpu_optimizer_fraction = 1.0 - o.ratio;
    }
    if (o.fast_init) s.notes.push_back("offload_optimizer.fast_init has no effect: zinf initializes swap state in one pass");
  }
  if (z.offload_param) {
    const config::OffloadParamConfig& p = *z.offload_param;
    pin_param = p.pin_memory;
    if (p.device == OffloadDevice::kNvme) {
      s.param_paths = split_nvme_paths(p.nvme_path);
      if (s.param_paths.empty()) throw Error("offload_param.nvme_path is empty: give the NVMe directory");
    }
  }
  // One host memory pool: pinned unless a section asks otherwise.
  s.pin_memory = pin_opt && pin_param;
  if (pin_opt != pin_param && z.offload_optimizer && z.offload_param) {
    s.notes.push_back("offload_param.pin_memory and offload_optimizer.pin_memory differ: zinf uses one host pool, "
                      "left pageable");
  }
  s.aio.block_size = static_cast<std::uint64_t>(c.aio.block_size);
  s.aio.queue_depth = static_cast<unsigned>(c.aio.queue_depth);
  s.aio.intra_op_parallelism = static_cast<unsigned>(c.aio.intra_op_parallelism);
  s.aio.single_submit = c.aio.single_submit;
  s.aio.overlap_events = c.aio.overlap_events;
  io::validate(s.aio);
  s.stepper = stepper_options_from_env();
  return s;
}

// ---------------------------------------------------------------------------------------------

Offload::Offload(const OffloadSettings& settings, std::vector<UnitSpec> units, int rank, tbb::task_arena& arena) {
  const bool opt_nvme = settings.optimizer_device == OffloadDevice::kNvme && settings.store.nvme_ratio > 0.0;
  const bool param_nvme = settings.store.params_on_nvme;
  for (const std::string& note : settings.notes) spdlog::warn("{}", note);
  if (opt_nvme || param_nvme) {
    engine_ = std::make_unique<io::IoEngine>(settings.aio);
    if (opt_nvme) optimizer_swap_ = std::make_unique<io::SwapStore>(*engine_, io::SwapStoreOptions{settings.optimizer_paths, rank});
    // One store when both name the same directories (two would fight over the directory lock).
    if (param_nvme && !(opt_nvme && canonical(settings.param_paths) == canonical(settings.optimizer_paths))) {
      param_swap_ = std::make_unique<io::SwapStore>(*engine_, io::SwapStoreOptions{settings.param_paths, rank});
    }
  }
  memory_ = std::make_unique<HostMemory>(settings.host_budget_bytes, default_pin_mode(settings.pin_memory));
  StoreOptions store_options = settings.store;
  if (!opt_nvme) store_options.nvme_ratio = 0.0;
  io::SwapStore* param_swap = param_swap_ ? param_swap_.get() : (param_nvme ? optimizer_swap_.get() : nullptr);
  store_ = std::make_unique<PartitionStore>(std::move(units), store_options, *memory_, optimizer_swap_.get(), param_swap);
  stepper_ = std::make_unique<OptimizerStepper>(*store_, arena, settings.stepper);
  spdlog::info("offload: {}; host memory {}", store_->describe(), memory_->report());
}

Offload::~Offload() = default;

}  // namespace zinf::offload
