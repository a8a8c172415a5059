#pragma once
// Where each unit's optimizer state and bf16 parameters live (host memory or NVMe), cut into the
// slices the optimizer step walks, and the host memory that takes: a pure function of the units
// and the store options. The partition store is built from it, and `zinf plan` counts its bytes,
// so the plan is the store's own arithmetic.

#include <cstdint>
#include <vector>

#include "zinf/offload/host_memory.hpp"
#include "zinf/offload/partition_store.hpp"

namespace zinf::offload {

struct Placement {
  std::uint64_t slice_elems = 0;  // sub_group_size on a kSliceAlign boundary (no more than a parameter staging buffer)
  std::vector<Slice> slices;      // in unit order; tiers set, swap ids and host pointers not yet
  std::vector<Tier> param_tier;   // per unit: its bf16 shard's tier
  std::uint64_t total_elems = 0, nvme_state_elems = 0, nvme_param_elems = 0;
  // Host memory, each piece 4 KiB-rounded as the store carves it.
  std::uint64_t host_state_bytes = 0;  // the host part of the state, [master | exp_avg | exp_avg_sq] per slice
  std::uint64_t host_param_bytes = 0;  // the bf16 shards kept in host memory, per unit
  std::uint64_t opt_state_bytes = 0;   // a staging buffer's state part (the largest staged slice)
  std::uint64_t opt_staging_each = 0;  // ... and with its bf16 parameters
  unsigned opt_buffers = 0;            // offload_optimizer.buffer_count, where a slice is staged
  std::uint64_t param_staging_elems = 0, param_staging_each = 0;
  unsigned param_buffers = 0;          // offload_param.buffer_count, where parameters are on NVMe
  std::uint64_t staging_bytes() const { return opt_staging_each * opt_buffers + param_staging_each * param_buffers; }
  // What the store's preflight checks: the above, and the caller's gradient shards.
  HostMemoryPlan host_plan(const StoreOptions& options) const;
};

// Throws zinf::Error for options that cannot place the units, saying what to change.
Placement place_units(const std::vector<UnitSpec>& units, const StoreOptions& options);

}  // namespace zinf::offload
