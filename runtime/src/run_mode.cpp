// The run's mode decisions: see run_mode.hpp.
#include "zinf/runtime/run_mode.hpp"

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "sharding.hpp"

namespace zinf::runtime {

using kernels::cpu::DType;

RunModeInputs RunModeInputs::from_config(const config::DeepSpeedConfig& ds) {
  RunModeInputs in;
  const config::ZeroConfig& z = ds.zero;
  in.stage = z.stage;
  in.grad_accum = ds.batch.gas;
  in.bf16 = ds.bf16.enabled;
  in.fp16 = ds.fp16.enabled;
  in.communication_data_type = ds.communication_data_type;
  if (z.offload_optimizer && z.offload_optimizer->device == config::OffloadDevice::kCpu && z.offload_optimizer->ratio < 1.0) {
    in.gpu_optimizer_fraction = 1.0 - z.offload_optimizer->ratio;
  }
  in.params_on_nvme = z.param_device() == config::OffloadDevice::kNvme;
  return in;
}

std::uint64_t RunMode::pinned_gradient_bytes(std::size_t u) const {
  if (!pipeline || grads_in_params || on_gpu[u]) return 0;
  return static_cast<std::uint64_t>(shard[u]) * kernels::cpu::dtype_bytes(grad_dtype);
}

std::uint64_t RunMode::pageable_gradient_bytes(std::size_t u) const {
  // (A LoRA run's frozen base has no gradients: at stage 3 `sharded` is only the partitioning of
  // its parameters.)
  if (pipeline || lora || !(sharded || partition_grads)) return 0;
  return static_cast<std::uint64_t>(shard[u]) * sizeof(float);
}

RunMode decide_run_mode(const RunModeInputs& in) {
  if (in.lora && in.fp16) {
    throw Error("LoRA trains adapters on a bf16 base: fp16 (loss scaling) is not available with --lora-rank; enable "
                "bf16 in the config instead");
  }
  RunMode m;
  const std::size_t units = in.units.size();
  m.world = in.world;
  m.numel = in.units;
  m.stage3 = in.stage == 3;
  // LoRA: the frozen base has neither gradients nor optimizer state; at stage 3 its parameters are
  // still partitioned over the ranks and gathered per use; the adapters are replicated.
  m.sharded = in.world > 1 && (in.lora ? m.stage3 : in.stage >= 1);
  m.partition_grads = in.stage >= 2 && !in.lora;
  m.lora = in.lora;
  m.param_dtype = in.bf16 || in.lora ? DType::kBF16 : DType::kF32;
  for (const auto n : in.units) m.shard.push_back(m.sharded ? shard_size(n, in.world) : n);

  // The GPU pipeline: one GPU at stages 2-3, or several at stage 3 over NCCL; no fp16 loss
  // scaling; several GPUs with gradient accumulation have not run on a multi-GPU machine yet and
  // take the synchronous path.
  if (in.device == "cuda") {
    if (!m.partition_grads) {
      m.no_pipeline = in.lora ? "LoRA steps its adapters after backward" : "it needs ZeRO stage 2 or 3";
    } else if (in.world > 1 && !m.stage3) {
      m.no_pipeline = "several GPUs need ZeRO stage 3";
    } else if (in.world > 1 && in.grad_accum > 1) {
      m.no_pipeline = "several GPUs with gradient accumulation have not run on a multi-GPU machine yet";
    } else if (in.fp16) {
      m.no_pipeline = "fp16 loss scaling skips steps after backward";
    } else if (!in.gpu_overlap) {
      m.no_pipeline = "turned off (--gpu-overlap off)";
    } else if (in.gradient_hook) {
      m.no_pipeline = "a gradient hook is set";
    } else if (in.world > 1 && !in.nccl_usable) {
      m.no_pipeline = "NCCL cannot be used by every rank";
    } else {
      m.pipeline = true;
    }
  }
  m.nccl = m.pipeline && in.world > 1;

  // communication_data_type bf16 (DeepSpeed's gradient communication dtype): the pipeline's
  // gradients are rounded to bf16 on the GPU and travel, and are stepped, as bf16.
  if (in.communication_data_type && *in.communication_data_type != config::Dtype::kFp32) {
    const bool bf16 = *in.communication_data_type == config::Dtype::kBf16;
    if (m.pipeline && bf16 && in.grad_accum == 1) {
      m.grad_dtype = DType::kBF16;
      m.notes.push_back("communication_data_type bf16: gradients are rounded to bf16 on the GPU and come down as bf16");
    } else if (m.pipeline && bf16) {
      m.notes.push_back("communication_data_type bf16 with gradient accumulation: the micro-batches' gradients are "
                        "summed, and travel, in fp32 (a bf16 sum would lose their low bits)");
    } else {
      m.notes.push_back(fmt::format("communication_data_type {} is honoured by the one-GPU pipeline with bf16 only; "
                                    "gradients travel as fp32 here",
                                    bf16 ? "bf16" : "fp16"));
    }
  }

  // offload_optimizer.ratio < 1 with device cpu (DeepSpeed's partial offload): the first units in
  // forward order, the fraction 1 - ratio of the parameters (to the nearest unit), keep their
  // optimizer state on the GPU and are stepped there once the gradient norm is known; the CPU
  // steps the rest as usual.
  m.on_gpu.assign(units, 0);
  if (in.gpu_optimizer_fraction > 0.0 && !in.lora) {
    const double ratio = 1.0 - in.gpu_optimizer_fraction;
    if (m.pipeline && m.stage3 && in.world == 1) {
      double total = 0;
      for (const auto n : in.units) total += static_cast<double>(n);
      const double want = in.gpu_optimizer_fraction * total;
      for (std::size_t u = 0; u < units; ++u) {
        const auto n = static_cast<double>(in.units[u]);
        if (static_cast<double>(m.gpu_elements) + n / 2 > want) break;
        m.on_gpu[u] = 1;
        m.gpu_elements += static_cast<std::uint64_t>(in.units[u]);
        ++m.gpu_units;
      }
      if (m.gpu_units == 0) {
        m.notes.push_back(fmt::format("offload_optimizer.ratio {}: {:.1f}% of the parameters is less than half of the "
                                      "first unit: the whole optimizer state stays in host memory",
                                      ratio, 100.0 * in.gpu_optimizer_fraction));
      } else {
        m.notes.push_back(fmt::format("offload_optimizer.ratio {}: the optimizer state of {} unit(s) ({:.1f}% of the "
                                      "parameters) lives on the GPU and is stepped there; the rest in host memory",
                                      ratio, m.gpu_units, 100.0 * static_cast<double>(m.gpu_elements) / total));
      }
    } else {
      m.notes.push_back(fmt::format("offload_optimizer.ratio {} with device cpu: a GPU share of the optimizer state needs "
                                    "the one-GPU pipeline at ZeRO stage 3 (one GPU, docs/gpu.md); this run keeps all "
                                    "of it in host memory",
                                    ratio));
    }
  }

  // bf16 gradients of bf16 parameters land in the unit's own bf16 parameter shard in the store
  // (page-locked host memory), which the optimizer step then overwrites element by element with
  // the new parameters: no separate gradient shards, 2 bytes per parameter less host memory. Safe
  // because nothing reads a unit's shard between its gradient landing and its step: backward has
  // read it already, and every later gather waits for the unit's update. (Parameters on NVMe come
  // through staging buffers: those units keep their own shards.)
  m.grads_in_params = m.pipeline && m.stage3 && m.grad_dtype == DType::kBF16 && m.param_dtype == DType::kBF16 &&
                      !in.params_on_nvme && m.gpu_units < units;
  return m;
}

}  // namespace zinf::runtime
