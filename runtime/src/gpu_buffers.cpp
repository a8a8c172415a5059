#include "gpu_buffers.hpp"

#include <algorithm>
#include <map>

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

}  // namespace zinf::runtime
