// The units' placement over host memory and NVMe: see placement.hpp.
#include "zinf/offload/placement.hpp"

#include <algorithm>
#include <cmath>
#include <set>
#include <tuple>

#include "zinf/common/error.hpp"

namespace zinf::offload {
namespace {

constexpr std::uint64_t kPage = 4096;
std::uint64_t page_round(std::uint64_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }

void check_options(const std::vector<UnitSpec>& units, const StoreOptions& o) {
  if (!(o.nvme_ratio >= 0.0 && o.nvme_ratio <= 1.0)) {
    throw Error("offload_optimizer.ratio must be between 0 and 1, not {}", o.nvme_ratio);
  }
  if (o.slice_elems == 0) throw Error("zero_optimization.sub_group_size must be at least 1");
  if (o.optimizer_buffers == 0) throw Error("offload_optimizer.buffer_count must be at least 1");
  if (o.params_on_nvme) {
    if (o.param_buffers == 0) throw Error("offload_param.buffer_count must be at least 1");
    if (o.param_buffer_elems < kSliceAlign) {
      throw Error("offload_param.buffer_size is {} elements; it must be at least {}", o.param_buffer_elems, kSliceAlign);
    }
  }
  std::set<std::string> names;
  for (const UnitSpec& u : units) {
    if (!names.insert(u.name).second) throw Error("unit name '{}' is used twice", u.name);
    if (u.numel == 0) throw Error("unit '{}' has no elements", u.name);
  }
}

}  // namespace

HostMemoryPlan Placement::host_plan(const StoreOptions& options) const {
  HostMemoryPlan plan;
  plan.add(Purpose::kOptimizerState, host_state_bytes);
  plan.add(Purpose::kParameters, host_param_bytes);
  plan.add(Purpose::kStaging, staging_bytes());
  plan.add(Purpose::kGradients, options.caller_gradient_bytes);
  plan.pageable += options.caller_pageable_bytes;
  return plan;
}

Placement place_units(const std::vector<UnitSpec>& units, const StoreOptions& o) {
  check_options(units, o);
  Placement p;
  // Slice length: sub_group_size, and no more than one parameter staging buffer when parameters
  // come from NVMe, rounded to kSliceAlign.
  std::uint64_t slice = o.slice_elems;
  if (o.params_on_nvme) slice = std::min(slice, o.param_buffer_elems);
  p.slice_elems = std::max(kSliceAlign, slice / kSliceAlign * kSliceAlign);
  std::uint64_t host_param_elems = 0, largest_staged = 0, largest_param = 0;
  p.param_tier.assign(units.size(), Tier::kHost);
  for (std::size_t u = 0; u < units.size(); ++u) {
    const std::uint64_t n = units[u].numel;
    p.total_elems += n;
    // Parameters: whole units in host memory up to max_in_cpu elements, the rest on NVMe (the
    // GPU's units go there first: the units the CPU steps need the host memory more).
    const bool on_gpu = u < o.gpu_units.size() && o.gpu_units[u] != 0;
    if (o.params_on_nvme && (on_gpu || host_param_elems + n > o.max_in_cpu)) {
      p.param_tier[u] = Tier::kNvme;
      p.nvme_param_elems += n;
      const std::uint64_t needed = (n + p.slice_elems - 1) / p.slice_elems;
      if (needed > o.param_buffers) {
        throw Error("the parameters of unit '{}' ({} elements) need {} staging buffers of {} elements, but "
                    "offload_param.buffer_count is {}: raise buffer_count to at least {} or buffer_size to at "
                    "least {}",
                    units[u].name, n, needed, p.slice_elems, o.param_buffers, needed, (n + o.param_buffers - 1) / o.param_buffers);
      }
    } else {
      host_param_elems += n;
      p.host_param_bytes += page_round(n * 2);
    }
    // Optimizer state: the first `ratio` of the unit on NVMe (on a kSliceAlign boundary).
    const std::uint64_t nvme_n =
        o.frozen              ? 0
        : o.nvme_ratio >= 1.0 ? n
                              : std::min<std::uint64_t>(
                                    n, static_cast<std::uint64_t>(std::floor(o.nvme_ratio * static_cast<double>(n))) /
                                           kSliceAlign * kSliceAlign);
    p.nvme_state_elems += nvme_n;
    for (const auto& [lo, hi, tier] : {std::tuple{std::uint64_t{0}, nvme_n, Tier::kNvme}, std::tuple{nvme_n, n, Tier::kHost}}) {
      for (std::uint64_t b = lo; b < hi; b += p.slice_elems) {
        Slice s;
        s.unit = u;
        s.begin = b;
        s.end = std::min(hi, b + p.slice_elems);
        s.state_tier = tier;
        s.param_tier = p.param_tier[u];
        if (!o.frozen && tier == Tier::kHost) p.host_state_bytes += page_round(s.size() * 12);
        if (s.param_tier == Tier::kNvme) largest_param = std::max(largest_param, s.size());
        if (s.state_tier == Tier::kNvme || s.param_tier == Tier::kNvme) largest_staged = std::max(largest_staged, s.size());
        p.slices.push_back(s);
      }
    }
  }
  p.opt_state_bytes = o.frozen ? 0 : page_round(largest_staged * 12);
  p.opt_staging_each = p.opt_state_bytes + page_round(largest_staged * 2);
  // (A frozen store writes its NVMe parameters through the parameter staging buffers.)
  p.opt_buffers = largest_staged > 0 && !o.frozen ? o.optimizer_buffers : 0;
  p.param_staging_elems = largest_param;
  p.param_buffers = largest_param > 0 ? o.param_buffers : 0;
  p.param_staging_each = page_round(largest_param * 2);
  return p;
}

}  // namespace zinf::offload
