// zinf plan's memory tiers: see plan_memory.hpp.
#include "plan_memory.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "zinf/common/error.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/offload/placement.hpp"
#include "zinf/runtime/model.hpp"
#include "gpu_memory_plan.hpp"

namespace zinf::runtime {
namespace {

std::string gib(std::uint64_t b) { return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1ull << 30)); }

// The run as the trainer would build it: its mode (run_mode.hpp) and sizes.
PlannedRun planned_run(const PlanInputs& in, const ModelLayout& layout) {
  PlannedRun r;
  r.gpu = in.device == "cuda";
  r.W = static_cast<std::uint64_t>(in.gpus);
  r.lora = in.lora.enabled();
  if (r.lora) {
    r.lora_layout.emplace(make_lora_layout(in.model, in.lora));
    r.lora_numel = static_cast<std::uint64_t>(r.lora_layout->numel);
  }
  RunModeInputs mi = RunModeInputs::from_config(in.ds);
  mi.world = in.gpus;
  mi.lora = r.lora;
  mi.device = in.device;
  mi.grad_accum = in.grad_accum;
  for (const auto& u : layout.units) mi.units.push_back(u.numel);
  r.mode = decide_run_mode(mi);
  r.stage3 = r.mode.stage3;
  r.nccl = r.mode.nccl;
  r.pb = r.mode.param_dtype == kernels::cpu::DType::kBF16 ? 2 : 4;  // (fp16 runs keep fp32 copies)
  r.gbytes = kernels::cpu::dtype_bytes(r.mode.grad_dtype);
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    r.E += static_cast<std::uint64_t>(layout.units[u].numel);
    r.S += static_cast<std::uint64_t>(r.mode.shard[u]);
  }
  r.gpu_share = r.mode.gpu_elements;
  return r;
}

// Per GPU: the trainer's own plan (gpu_memory_plan.cpp), the same function.
TierPlan gpu_tier(const PlanInputs& in, const PlannedRun& r, Plan& p) {
  TierPlan g{"gpu", {}, in.gpu_mem};
  if (!r.gpu) return g;
  GpuMemoryInputs gi;
  gi.model = &in.model;
  gi.mode = &r.mode;
  gi.zero = &in.ds.zero;
  gi.micro = in.micro_batch;
  gi.seq = in.seq_len;
  gi.grad_accum = in.grad_accum;
  gi.model_options.param_dtype = r.mode.param_dtype;
  gi.model_options.checkpoint_activations = true;
  gi.model_options.lora = in.lora;
  gi.lora_numel = r.lora_numel;
  gi.lora_state_on_gpu = !in.lora_offload_optimizer;
  const GpuMemoryPlan gp = plan_gpu_memory(gi);
  g.items = {{"parameters (live budget + one unit)", gp.params},
             {"gradient buffers", gp.grads},
             {"activations (checkpointed)", gp.activations},
             {"scratch", gp.scratch}};
  if (gp.optimizer > 0) g.items.push_back({"optimizer share (offload_optimizer.ratio)", gp.optimizer});
  if (gp.adapters > 0) {
    g.items.push_back({in.lora_offload_optimizer ? "LoRA adapters and their gradients (fp32)"
                                                 : "LoRA adapters, gradients and Adam moments (fp32)",
                       gp.adapters});
  }
  g.items.push_back({"other", gp.other});
  p.notes.push_back("GPU bytes are zinf's own allocations; the CUDA context and NCCL take about 0.5-1 GiB more");
  return g;
}

// All ranks on this machine: the partition store's placement of each rank's shards
// (offload/placement.cpp), the gradient shards the path allocates, the CPU backend's model.
void host_tiers(const PlanInputs& in, const ModelLayout& layout, PlannedRun& r, Plan& p) {
  const config::ZeroConfig& z = in.ds.zero;
  const std::uint64_t W = r.W;
  offload::StoreOptions so = offload::store_options(in.ds);
  so.gpu_units = r.mode.on_gpu;
  if (r.lora) {  // the frozen base: bf16 shards only, per offload_param
    so.frozen = true;
    so.nvme_ratio = 0.0;
  }
  std::vector<offload::UnitSpec> specs;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    specs.push_back({layout.units[u].name, static_cast<std::uint64_t>(r.mode.shard[u])});
  }
  const offload::Placement placed = offload::place_units(specs, so);
  r.nvme_state = placed.nvme_state_elems * 12;
  r.nvme_params = placed.nvme_param_elems * 2;
  std::uint64_t pinned_grads = 0, pageable = 0;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    pinned_grads += r.mode.pinned_gradient_bytes(u);
    pageable += r.mode.pageable_gradient_bytes(u);
  }
  TierPlan hp{"host_pinned", {}, 0};
  TierPlan hpage{"host_pageable", {}, 0};
  const bool pin = !((z.offload_optimizer && !z.offload_optimizer->pin_memory) || (z.offload_param && !z.offload_param->pin_memory));
  (pin ? hp : hpage).items = {{"optimizer state (fp32 master, m, v)", placed.host_state_bytes * W},
                              {"parameters (bf16)", placed.host_param_bytes * W},
                              {"gradient shards", pinned_grads * W},
                              {"NVMe staging buffers", placed.staging_bytes() * W}};
  if (!r.gpu) {
    // The CPU backend holds the model, its gradients and activations in ordinary memory.
    ModelOptions mo;
    mo.param_dtype = r.mode.param_dtype;
    mo.checkpoint_activations = true;
    hpage.items.push_back({r.lora ? "CPU backend: parameters (frozen, no gradients)" : "CPU backend: parameters + gradients",
                           r.E * (r.pb + (r.lora ? 0 : 4)) * W});
    hpage.items.push_back({"CPU backend: activations", Model::activation_bytes_for(in.model, in.micro_batch, in.seq_len, mo) * W});
  }
  if (pageable > 0) hpage.items.push_back({"gradient shards (synchronous path)", pageable * W});
  if (r.lora && (in.lora_offload_optimizer || !r.gpu)) {
    hpage.items.push_back({"LoRA adapters' Adam state (master, m, v) and gradients", r.lora_numel * 16 * W});
  }
  // One capacity for both host tiers, less what the trainer's preflight keeps free for the
  // process and the OS (offload::host_memory_reserve_bytes); the pinned tier is judged against
  // it, the pageable one against what the pinned one leaves.
  if (in.host_mem > 0) {
    const std::uint64_t reserve = offload::host_memory_reserve_bytes(in.host_mem);
    const std::uint64_t usable = in.host_mem > reserve ? in.host_mem - reserve : 1;
    hp.capacity = usable;
    hpage.capacity = usable > hp.total() ? usable - hp.total() : 1;
    p.notes.push_back(fmt::format("host memory: {} of {} counted usable ({} stays free for the process and the OS, as "
                                  "the trainer's preflight requires)",
                                  gib(usable), gib(in.host_mem), gib(reserve)));
  }
  p.tiers.push_back(hp);
  p.tiers.push_back(hpage);
}

}  // namespace

PlannedRun plan_memory(const PlanInputs& in, Plan& p) {
  const ModelLayout layout = make_layout(in.model);
  PlannedRun r = planned_run(in, layout);
  p.pipeline = r.mode.pipeline;
  for (const auto& n : r.mode.notes) {
    if (n.rfind("offload_optimizer.ratio", 0) == 0) p.notes.push_back(n);
  }
  p.tiers.push_back(gpu_tier(in, r, p));
  host_tiers(in, layout, r, p);
  TierPlan nv{"nvme", {}, in.nvme};
  if (r.nvme_state > 0) nv.items.push_back({"optimizer state (offload_optimizer.ratio)", r.nvme_state * r.W});
  if (r.nvme_params > 0) nv.items.push_back({"parameters (offload_param nvme)", r.nvme_params * r.W});
  p.tiers.push_back(nv);
  return r;
}

}  // namespace zinf::runtime
