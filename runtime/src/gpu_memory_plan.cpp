#include "gpu_memory_plan.hpp"

#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "zinf/kernels/cuda_scratch.hpp"
#include "zinf/runtime/coordinator.hpp"

namespace zinf::runtime {

GpuBuffers plan_gpu_buffers(const GpuBufferInputs& in) {
  GpuBuffers p;
  const std::size_t units = in.numel.size();
  std::uint64_t total = 0, largest = 0, persistent = 0;
  for (std::size_t u = 0; u < units; ++u) {
    const std::uint64_t n = in.resident[u];
    if (in.on_gpu[u]) {
      // Its compute copy, fp32 master and moments, and its gradient held until the step.
      p.params += n * in.param_bytes;
      p.optimizer += n * (12 + in.grad_bytes);
      continue;
    }
    total += n;
    largest = std::max(largest, n);
    if (in.stage3 && in.persistent[u]) persistent += n;
  }
  p.params += (in.stage3 ? std::min(in.max_live, total - persistent) + largest + persistent : total) * in.param_bytes;
  p.adapters = in.lora_numel * (in.lora_state_on_gpu ? 16 : 8);
  if (in.frozen) return p;
  if (!in.partition_grads) {
    p.grads = total * 4;
    return p;
  }
  // Gradient buffers are pooled by size (elements -> units of that size).
  std::map<std::uint64_t, std::uint64_t> sizes;
  for (const std::uint64_t n : in.numel) ++sizes[n];
  const bool bf16 = in.grad_bytes == 2;
  for (const auto& [n, count] : sizes) {
    const auto at_most = [count = count](std::uint64_t k) { return std::min<std::uint64_t>(count, k); };
    // Gradient accumulation in the pipeline: the earlier micro-batches' sums uploaded to be added
    // (this rank's fp32 shards), kSumBuffers per size, or one per unit of the size if fewer
    // (upload_sum() allocates no more).
    if (in.pipeline && in.grad_accum > 1) p.grads += at_most(kSumBuffers) * (in.nccl ? (n + in.world - 1) / in.world : n) * 4;
    if (in.nccl) {
      // Several GPUs: the padded fp32 buffers, kReductionsInFlight + 1 per size (post_reduction()
      // finishes the oldest as soon as more are posted, and its buffer is the next unit's; the
      // one in use is among them; a tied embedding's is a size of its own); this rank's fp32
      // shards (as many as reductions in flight, and those being copied down); the bf16 shards
      // copied down, as for one GPU.
      const std::uint64_t sh = (n + in.world - 1) / in.world, rif = kReductionsInFlight + 1;
      p.grads += at_most(rif) * sh * in.world * 4;
      p.grads += bf16 ? at_most(rif + 1) * sh * 4 + at_most(kGradBuffersInFlight + 1) * sh * 2
                      : at_most(rif + kGradBuffersInFlight) * sh * 4;
    } else if (in.pipeline) {
      // take_pooled_for_collective() allocates a new buffer only while fewer than
      // kGradBuffersInFlight of a size are pooled, all still being copied down; the one in use is
      // one of them. So a size never has more than kGradBuffersInFlight, plus a tied embedding's,
      // held through backward, when a layer has the embedding's size. With bf16 gradients the
      // fp32 buffers are free as soon as they are rounded (on the compute stream, which reuses
      // them): one per size; the bf16 copies are the ones in flight.
      const std::uint64_t tied = in.tied_embedding && count > 1 && in.numel[0] == n ? 1 : 0;
      p.grads += bf16 ? at_most(1 + tied) * n * 4 + at_most(kGradBuffersInFlight) * n * 2
                      : at_most(kGradBuffersInFlight + tied) * n * 4;
    } else {
      // The bucketed path: a bucket's worth plus the one in use and a tied embedding's.
      p.grads += at_most((in.reduce_bucket + n - 1) / n + 2) * n * 4;
    }
  }
  return p;
}

std::string GpuMemoryPlan::describe() const {
  const auto g = [](std::uint64_t b) { return static_cast<double>(b) / (1u << 30); };
  return fmt::format("parameters {:.2f} GiB, gradient buffers {:.2f} GiB, activations {:.2f} GiB, scratch {:.2f} GiB, "
                     "{}{}other {:.2f} GiB: {:.2f} GiB",
                     g(params), g(grads), g(activations), g(scratch),
                     optimizer > 0 ? fmt::format("optimizer share {:.2f} GiB, ", g(optimizer)) : std::string(),
                     adapters > 0 ? fmt::format("LoRA adapters {:.3f} GiB, ", g(adapters)) : std::string(), g(other),
                     g(total()));
}

config::Json GpuMemoryPlan::to_json() const {
  return {{"parameters", params},   {"gradient_buffers", grads}, {"activations", activations}, {"scratch", scratch},
          {"optimizer_share", optimizer}, {"lora_adapters", adapters}, {"other", other}};
}

StepShape step_shape(const ModelConfig& c, std::int64_t micro, std::int64_t seq, bool bf16) {
  StepShape sh;
  sh.rows = micro * seq;
  sh.batch = micro;
  sh.seq = seq;
  sh.hidden = c.hidden_size;
  sh.q_dim = c.q_dim();
  sh.qkv_dim = c.qkv_dim();
  sh.intermediate = c.intermediate_size;
  sh.vocab = c.vocab_size;
  sh.heads = c.num_heads;
  sh.kv_heads = c.num_kv_heads;
  sh.head_dim = c.head_dim;
  sh.bf16 = bf16;
  return sh;
}

GpuMemoryPlan plan_gpu_memory(const GpuMemoryInputs& in) {
  const RunMode& m = *in.mode;
  const config::ZeroConfig& z = *in.zero;
  GpuBufferInputs b;
  std::vector<std::int64_t> gathered;
  std::vector<bool> adopted;
  for (std::size_t u = 0; u < m.numel.size(); ++u) {
    gathered.push_back(m.gather_elements(u));
    adopted.push_back(m.on_gpu[u] != 0);
  }
  const std::vector<bool> persistent =
      ParamCoordinator::persistent_units(gathered, adopted, z.param_persistence_threshold, z.model_persistence_threshold);
  for (std::size_t u = 0; u < m.numel.size(); ++u) {
    const auto n = static_cast<std::uint64_t>(m.numel[u]);
    b.numel.push_back(n);
    b.resident.push_back(m.stage3 ? static_cast<std::uint64_t>(m.gather_elements(u)) : n);
    b.on_gpu.push_back(m.on_gpu[u] != 0);
    b.persistent.push_back(m.stage3 && persistent[u]);
  }
  b.param_bytes = kernels::cpu::dtype_bytes(m.param_dtype);
  b.grad_bytes = kernels::cpu::dtype_bytes(m.grad_dtype);
  b.stage3 = m.stage3;
  b.partition_grads = m.partition_grads;
  b.pipeline = m.pipeline;
  b.nccl = m.nccl;
  b.grad_accum = static_cast<std::uint64_t>(in.grad_accum);
  b.world = static_cast<std::uint64_t>(m.world);
  b.tied_embedding = in.model->tie_word_embeddings;
  b.max_live = static_cast<std::uint64_t>(std::max<std::int64_t>(z.max_live_parameters, 0));
  b.reduce_bucket = static_cast<std::uint64_t>(std::max<std::int64_t>(z.reduce_bucket_size, 0));
  b.frozen = m.lora;
  b.lora_numel = in.lora_numel;
  b.lora_state_on_gpu = in.lora_state_on_gpu;
  const GpuBuffers buffers = plan_gpu_buffers(b);
  GpuMemoryPlan p;
  p.params = buffers.params;
  p.grads = buffers.grads;
  p.optimizer = buffers.optimizer;
  p.adapters = buffers.adapters;
  p.activations = Model::activation_bytes_for(*in.model, in.micro, in.seq, in.model_options);
  p.scratch = kernels::cuda_scratch::step_scratch_bytes(
      step_shape(*in.model, in.micro, in.seq, m.param_dtype == kernels::cpu::DType::kBF16));
  p.other = m.numel.size() * sizeof(double) + (1u << 20);  // norms, tokens, small buffers
  return p;
}

}  // namespace zinf::runtime
