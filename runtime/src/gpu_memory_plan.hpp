#pragma once
// What a run allocates on the GPU, counted one way for the trainer's own plan (what
// --gpu-memory-limit enforces, and summary.json reports) and for `zinf plan`: the compute copies of
// the parameters, the gradient buffers as the reduction path pools them, the checkpointed
// activations, the CUDA backend's scratch, the GPU's share of the optimizer and LoRA's adapters.
// Internal to zinf_runtime.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/run_mode.hpp"

namespace zinf::runtime {

// The one-GPU pipeline's gradient buffers of one size being copied down at once (the trainer's
// gradient pool allocates no more: take_pooled_for_collective()).
inline constexpr std::size_t kGradBuffersInFlight = 3;
// Reduce-scatters posted behind the compute thread with several GPUs (post_reduction()).
inline constexpr std::size_t kReductionsInFlight = 2;
// Gradient accumulation in the pipeline: the uploaded sums of the earlier micro-batches, per size
// (upload_sum()).
inline constexpr std::size_t kSumBuffers = 2;

struct GpuBufferInputs {
  std::vector<std::uint64_t> numel;     // per unit, as the layout has it
  std::vector<std::uint64_t> resident;  // per unit: elements of its compute copy (padded when gathered over NCCL)
  std::vector<bool> on_gpu;             // units whose optimizer state is stepped on the GPU
  std::vector<bool> persistent;         // stage-3 units kept gathered
  std::uint64_t param_bytes = 2;        // per element of a compute copy
  std::uint64_t grad_bytes = 4;         // per element of a gradient as stepped (2: bf16 gradients)
  bool stage3 = false;
  bool partition_grads = false;         // stage >= 2
  bool pipeline = false;                // the overlapped GPU pipeline
  bool nccl = false;                    // several GPUs in the pipeline
  std::uint64_t grad_accum = 1;         // gradient_accumulation_steps
  std::uint64_t world = 1;
  bool tied_embedding = false;
  std::uint64_t max_live = 0;           // stage3_max_live_parameters
  std::uint64_t reduce_bucket = 0;      // reduce_bucket_size
  // LoRA: the base is frozen (no gradient buffers); the adapters (fp32 elements) with their
  // gradients and, unless their optimizer is offloaded, their Adam moments.
  bool frozen = false;
  std::uint64_t lora_numel = 0;
  bool lora_state_on_gpu = true;
};

struct GpuBuffers {
  std::uint64_t params = 0;     // compute copies: stage 3's live budget plus one unit plus the persistent ones
  std::uint64_t grads = 0;      // gradient buffers as the reduction path pools them
  std::uint64_t optimizer = 0;  // the GPU's share: fp32 state and the gradients held until the step
  std::uint64_t adapters = 0;   // LoRA: adapters, their gradients and (on the GPU) their moments
};

GpuBuffers plan_gpu_buffers(const GpuBufferInputs& in);

// A run's GPU bytes by kind.
struct GpuMemoryPlan {
  std::uint64_t params = 0, grads = 0, activations = 0, scratch = 0, other = 0;
  std::uint64_t optimizer = 0;  // the GPU's share of the optimizer: fp32 state and held gradients
  std::uint64_t adapters = 0;   // LoRA: adapters, their gradients and moments
  std::uint64_t total() const { return params + grads + activations + scratch + other + optimizer + adapters; }
  std::string describe() const;     // "parameters 1.23 GiB, ...: 9.87 GiB"
  config::Json to_json() const;     // summary.json's gpu_memory.planned
};

struct GpuMemoryInputs {
  const ModelConfig* model = nullptr;
  const RunMode* mode = nullptr;
  const config::ZeroConfig* zero = nullptr;
  std::int64_t micro = 1, seq = 1, grad_accum = 1;
  ModelOptions model_options;           // the activations' sizing (dtype, checkpointing, LoRA)
  std::uint64_t lora_numel = 0;         // LoRA: the adapters' elements
  bool lora_state_on_gpu = true;        // ... and whether their Adam moments live on the GPU
};

// The shape of one training step's products and attention (what the backend's scratch depends on).
StepShape step_shape(const ModelConfig& c, std::int64_t micro, std::int64_t seq, bool bf16);

// Upper bounds from the budgets: stage 3 holds at most the live budget plus one unit plus the
// persistent units (the coordinator's rule, with the GPU's share adopted); gradient buffers as
// the reduction path keeps them; activations as the model sizes them; the CUDA backend's scratch
// (kernels/cuda_scratch.hpp).
GpuMemoryPlan plan_gpu_memory(const GpuMemoryInputs& in);

}  // namespace zinf::runtime
