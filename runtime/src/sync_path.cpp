// The synchronous gradient path, the reference every other path is compared with: stages 0-1
// accumulate each unit's whole gradient over the micro-batches and sum it over the ranks after
// backward (all-reduce, or reduce-scatter into this rank's shard at stage 1); stages 2-3 reduce
// each unit's gradient of each micro-batch as its backward finishes, in buckets of
// reduce_bucket_size elements, into this rank's fp32 host shards. Then the norm, and one optimizer
// step over the store (offload/). A GPU backend's gradients come down to the host for all of it.
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "zinf/kernels/cpu_model_ops.hpp"
#include "gradient_path.hpp"
#include "sharding.hpp"

namespace zinf::runtime {
namespace {

using kernels::cpu::DType;

class SyncPath final : public GradientPath {
 public:
  explicit SyncPath(PathEnv& env)
      : GradientPath(env), buffers_(env.backend, env.mode), host_backend_(env.backend.name() == "cpu") {
    const std::size_t units = env.layout.units.size();
    if (!env.mode.partition_grads) full_grads_.emplace(env.backend, env.layout, DType::kF32);
    if (env.mode.sharded || env.mode.partition_grads) {
      shards_.resize(units);
      for (std::size_t u = 0; u < units; ++u) shards_[u].resize(static_cast<std::size_t>(env.mode.shard[u]));
    }
    downloaded_.resize(units);
  }

  void begin_step(const StepInfo& step) override {
    step_ = step;
    if (full_grads_) full_grads_->zero();
    // The gradient shards start each step at zero: 4 bytes per parameter, so in parallel.
    for (auto& g : shards_) {
      float* p = g.data();
      tbb::parallel_for(tbb::blocked_range<std::size_t>(0, g.size(), 1 << 18),
                        [p](const tbb::blocked_range<std::size_t>& r) { std::fill(p + r.begin(), p + r.end(), 0.0f); });
    }
  }

  const UnitBuffers& gradients() override { return full_grads_ ? full_grads_->view() : buffers_.view(); }

  void before_unit_backward(std::size_t u, std::int64_t /*m*/) override {
    if (!env_.mode.partition_grads) return;
    for (const std::size_t r : env_.model.unit_reads(u)) buffers_.take(r);
  }
  // Stages 2-3: unit u's gradient of this micro-batch is complete: into the reduction bucket,
  // which is reduced once it holds reduce_bucket_size elements.
  void after_unit_backward(std::size_t u, std::int64_t /*m*/) override {
    if (!env_.mode.partition_grads) return;
    bucket_.push_back(u);
    bucket_elems_ += env_.mode.shard[u] * env_.mode.world;
    if (bucket_elems_ >= env_.options.ds.zero.reduce_bucket_size) flush_bucket();
  }
  void end_micro_batch(std::int64_t /*m*/) override { flush_bucket(); }

  std::vector<void*> gradients_complete() override {
    if (full_grads_ && !host_backend_) {  // stages 0-1 on a GPU: the accumulated gradients come down
      host_grads_.resize(env_.layout.units.size());
      for (std::size_t u = 0; u < host_grads_.size(); ++u) {
        host_grads_[u].resize(static_cast<std::size_t>(env_.layout.units[u].numel));
        env_.backend.download(host_grads_[u].data(), full_grads_->view().units[u], host_grads_[u].size() * sizeof(float));
      }
    }
    std::vector<void*> g;
    for (std::size_t u = 0; u < env_.layout.units.size(); ++u) g.push_back(full_grads_ ? host_grad(u) : shards_[u].data());
    return g;
  }

  // Stages 0-1: the accumulated gradients summed over ranks, in place for every unit (stage 0), or
  // into this rank's shard of each unit (stage 1; the unit padded with zeros to W shards).
  void reduce() override {
    if (env_.mode.world == 1 || env_.mode.partition_grads) return;
    for (std::size_t u = 0; u < env_.layout.units.size(); ++u) {
      float* g = host_grad(u);
      const auto n = static_cast<std::size_t>(env_.layout.units[u].numel);
      if (!env_.mode.sharded) {
        env_.comm.all_reduce_sum(std::span<float>(g, n));
        continue;
      }
      padded_.assign(static_cast<std::size_t>(env_.mode.shard[u] * env_.mode.world), 0.0f);
      std::memcpy(padded_.data(), g, n * sizeof(float));
      env_.comm.reduce_scatter_sum(padded_, shards_[u]);
    }
  }

  double squared_norm() override {
    double sq = 0;
    for (std::size_t u = 0; u < env_.layout.units.size(); ++u) {
      sq += shards_.empty() ? sum_squares(host_grad(u), env_.layout.units[u].numel)
                            : sum_squares(shards_[u].data(), env_.mode.shard[u]);
    }
    return sum_over_ranks(sq);
  }

  void apply(double grad_scale) override {
    offload::StepInputs in = step_inputs(step_, grad_scale, DType::kF32);
    in.gradient = [this](std::size_t u) -> const void* {
      return shards_.empty() ? static_cast<const void*>(host_grad(u)) : static_cast<const void*>(shards_[u].data());
    };
    const offload::StepStats ss = env_.offload.stepper().step(in);
    io_wait_ += ss.read_wait_seconds + ss.write_wait_seconds;
    refresh_compute();
  }

  std::uint64_t buckets_reduced() const override { return buckets_reduced_; }

 private:
  // Stages 0-1: unit u's accumulated gradient in host memory.
  float* host_grad(std::size_t u) {
    return host_backend_ ? static_cast<float*>(full_grads_->view().units[u]) : host_grads_[u].data();
  }
  // Stages 2-3: a bucket unit's gradient of this micro-batch in host memory (downloaded once per
  // flush from a GPU backend).
  const float* bucket_grad(std::size_t u) {
    if (host_backend_) return buffers_.live(u).f32();
    auto& h = downloaded_[u];
    if (h.size() != static_cast<std::size_t>(env_.layout.units[u].numel)) {
      h.resize(static_cast<std::size_t>(env_.layout.units[u].numel));
      env_.backend.download(h.data(), buffers_.live(u).data(), h.size() * sizeof(float));
    }
    return h.data();
  }

  // Sums the bucket's gradients over ranks into each rank's shards (accumulated over
  // micro-batches). The send buffer is laid out rank-major (every unit's shard r, then shard r+1)
  // so that one reduce-scatter hands each rank its shard of every unit in the bucket.
  void flush_bucket() {
    if (bucket_.empty()) return;
    const int world = env_.mode.world;
    const auto& shard = env_.mode.shard;
    if (world == 1) {
      for (const std::size_t u : bucket_) kernels::cpu::add_inplace(shards_[u].data(), bucket_grad(u), env_.layout.units[u].numel);
    } else {
      std::int64_t total = 0;
      for (const std::size_t u : bucket_) total += shard[u];
      send_.resize(static_cast<std::size_t>(total * world));
      recv_.resize(static_cast<std::size_t>(total));
      for (int r = 0; r < world; ++r) {
        float* out = send_.data() + static_cast<std::size_t>(r) * static_cast<std::size_t>(total);
        for (const std::size_t u : bucket_) {
          const ShardRange part = shard_range(env_.layout.units[u].numel, shard[u], r);
          if (part.count > 0) std::memcpy(out, bucket_grad(u) + part.begin, static_cast<std::size_t>(part.count) * sizeof(float));
          std::fill(out + part.count, out + shard[u], 0.0f);
          out += shard[u];
        }
      }
      env_.comm.reduce_scatter_sum(send_, recv_);
      const float* in = recv_.data();
      for (const std::size_t u : bucket_) {
        kernels::cpu::add_inplace(shards_[u].data(), in, shard[u]);
        in += shard[u];
      }
    }
    for (const std::size_t u : bucket_) {
      buffers_.release(u);
      if (!host_backend_) downloaded_[u].clear();  // the next micro-batch downloads afresh
    }
    ++buckets_reduced_;
    bucket_.clear();
    bucket_elems_ = 0;
  }

  GradientBuffers buffers_;
  bool host_backend_;
  StepInfo step_;
  std::optional<UnitStorage> full_grads_;       // stages 0-1: whole accumulated gradients
  std::vector<std::vector<float>> shards_;      // this rank's summed gradient shards (stages 1-3)
  std::vector<std::vector<float>> host_grads_;  // stages 0-1 on a GPU: the gradients brought down
  std::vector<std::vector<float>> downloaded_;  // stages 2-3 on a GPU: a bucket's gradients brought down
  std::vector<float> padded_, send_, recv_;     // reused every step
  std::vector<std::size_t> bucket_;
  std::int64_t bucket_elems_ = 0;
  std::uint64_t buckets_reduced_ = 0;
};

}  // namespace

std::unique_ptr<GradientPath> make_sync_path(PathEnv& env) { return std::make_unique<SyncPath>(env); }

}  // namespace zinf::runtime
