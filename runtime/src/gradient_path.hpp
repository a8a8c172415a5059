#pragma once
// Where a step's gradients go and how the optimizer consumes them. One implementation per path,
// each in its own file, chosen once from the run's mode (make_gradient_path):
//   sync_path.cpp     the synchronous reference: gradients accumulated whole (stages 0-1) or
//                     reduced unit by unit in reduce_bucket_size buckets into this rank's host
//                     shards (stages 2-3), summed over the ranks on the host, then one optimizer
//                     step; any backend, any rank count.
//   gpu_pipeline.cpp  the overlapped GPU pipeline (docs/gpu.md): each unit's gradient comes down
//                     into page-locked memory as its backward finishes (reduce-scattered over NCCL
//                     first with several GPUs) and the optimizer thread steps it as it lands;
//                     bit-identical to the synchronous path.
//   lora_path.cpp     LoRA: a frozen base, only the adapters have gradients and optimizer state.
// The trainer drives every path through the same phases:
//   begin_step -> per micro-batch [before_forward, after_forward, per unit in reverse
//   (before_unit_backward, backward, after_unit_backward), end_micro_batch] -> gradients_complete
//   -> reduce -> squared_norm -> apply -> (join at evaluations, checkpoints and the end).
// Internal to zinf_runtime.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include <oneapi/tbb/task_arena.h>

#include "zinf/offload/offload.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/checkpoint.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/nccl_comm.hpp"
#include "zinf/runtime/run_mode.hpp"
#include "zinf/runtime/trainer.hpp"
#include "param_gather.hpp"

namespace zinf::runtime {

// What the paths share with the trainer, which owns it all and outlives the path.
struct PathEnv {
  const TrainOptions& options;
  const RunMode& mode;
  Backend& backend;
  Model& model;
  const ModelLayout& layout;
  Communicator& comm;
  offload::Offload& offload;
  tbb::task_arena& arena;
  UnitVersions& versions;
  ParamGather& gather;
  UnitStorage* compute = nullptr;      // stages 0-2: the whole compute copy, refreshed after a step
  ParamCoordinator* coord = nullptr;   // stage 3
  DeviceCollectives* nccl = nullptr;   // several GPUs in the pipeline
};

// The step being computed.
struct StepInfo {
  std::int64_t done = 0;     // optimizer steps before this one (skipped ones included)
  std::int64_t applied = 0;  // steps that updated the weights before this one
  double lr = 0;
  bool clipping = false;     // gradient_clipping > 0: every unit waits for the global norm
  std::uint64_t seed = 0;    // the run's seed (the sample order's and LoRA dropout's)
};

class GradientPath {
 public:
  explicit GradientPath(PathEnv& env) : env_(env) {}
  virtual ~GradientPath() = default;
  GradientPath(const GradientPath&) = delete;
  GradientPath& operator=(const GradientPath&) = delete;

  // ---- one step
  virtual void begin_step(const StepInfo& step) = 0;
  // Micro-batch m's forward is next (training false: an evaluation).
  virtual void before_forward(std::int64_t /*m*/, bool /*training*/) {}
  // Micro-batch m's forward is done; returns the seconds spent finishing the previous step.
  virtual double after_forward(std::int64_t /*m*/) { return 0; }
  // The gradient buffers backward writes into (the units' being computed).
  virtual const UnitBuffers& gradients() = 0;
  virtual void before_unit_backward(std::size_t /*u*/, std::int64_t /*m*/) {}
  virtual void after_unit_backward(std::size_t /*u*/, std::int64_t /*m*/) {}
  virtual void end_micro_batch(std::int64_t /*m*/) {}
  // Backward of every micro-batch is done: each unit's accumulated gradient where the host can
  // read it (TrainOptions::after_backward sees these; empty for LoRA).
  virtual std::vector<void*> gradients_complete() = 0;
  // Summed over the ranks where backward has not done so (stages 0-1, LoRA's adapters).
  virtual void reduce() {}
  // The squared global norm of the summed gradient (every rank's share).
  virtual double squared_norm() = 0;
  // The optimizer step (gradients scaled by grad_scale), and the compute copy after it.
  virtual void apply(double grad_scale) = 0;
  // A step still in flight finishes (evaluations, checkpoints, the end).
  virtual void join() {}
  // Seconds of offload I/O waited for in the steps joined since the last call.
  double take_io_wait() { return std::exchange(io_wait_, 0.0); }
  // Stops work in flight (the trainer's destruction, before the coordinator goes).
  virtual void stop() {}

  // ---- state outside steps
  // Unit u of the initial weights has gone into the store: `full` the whole unit, `piece` this
  // rank's (LoRA fingerprints the frozen base).
  virtual void base_loaded(std::size_t /*u*/, std::span<const float> /*full*/, std::span<const float> /*piece*/) {}
  // A fresh run's trainable state beyond the store's (LoRA: the adapters).
  virtual void initialise(std::uint64_t /*seed*/) {}
  // After the state is in the store (initialised or loaded): the GPU's copies of it.
  virtual void from_store() {}
  // Before the store is read (checkpoints): the GPU's copies back into it.
  virtual void to_store() {}
  // What a checkpoint saves: every unit's optimizer state from the store; LoRA its adapters'.
  virtual StateSource checkpoint_state();
  virtual void add_to_checkpoint(CheckpointManifest& /*m*/, CheckpointSave& /*save*/) {}
  // Resume: the state from a checkpoint whose compatibility the trainer has checked.
  // `load_base` puts the initial weights into the store (LoRA's frozen base is read again).
  virtual void load_checkpoint(const CheckpointReader& ck, const std::function<void()>& load_base);
  // The end of the run (LoRA: the base is checked unchanged).
  virtual void finish_run() {}
  virtual std::uint64_t buckets_reduced() const { return 0; }
  virtual void describe(config::Json& /*summary*/) const {}

 protected:
  // The optimizer step's inputs (the gradient source is the caller's).
  offload::StepInputs step_inputs(const StepInfo& step, double grad_scale, kernels::cpu::DType grad_dtype) const;
  // A squared norm summed over the ranks in rank order (as doubles: a float sum could overflow).
  double sum_over_ranks(double sq);
  // The compute copy after an optimizer step: every unit at stages 0-2; at stage 3 units are
  // gathered when used, so only the persistent ones are dropped.
  void refresh_compute();
  PathEnv& env_;
  double io_wait_ = 0;
};

std::unique_ptr<GradientPath> make_sync_path(PathEnv& env);
std::unique_ptr<GradientPath> make_gpu_pipeline(PathEnv& env);
std::unique_ptr<GradientPath> make_lora_path(PathEnv& env);
// The run's path: LoRA, the GPU pipeline, or the synchronous path, per env.mode.
std::unique_ptr<GradientPath> make_gradient_path(PathEnv& env);

// Sum of squares of a unit's fp32 gradient, in fixed blocks so the result does not depend on the
// thread count.
double sum_squares(const float* g, std::int64_t n);

// Stages 2-3: the fp32 gradient buffers of the units in backward, pooled by size and reused once
// their last reader (a copy-down, a collective) is done.
class GradientBuffers {
 public:
  GradientBuffers(Backend& backend, const RunMode& mode);
  // Unit u's zeroed buffer for this micro-batch's backward (kept while it exists); padded to
  // every rank's shard with NCCL (the padding stays zero).
  void take(std::size_t u);
  const UnitBuffers& view() const { return view_; }
  DeviceBuffer& live(std::size_t u) { return live_[u]; }
  // Unit u's buffer goes back to the pool, free once `free_after` (if any) has happened.
  void release(std::size_t u, std::shared_ptr<Backend::Event> free_after = nullptr);
  // Unit u's buffer leaves the pool's care (held elsewhere until given back).
  DeviceBuffer take_out(std::size_t u);
  void give_back(DeviceBuffer b, std::shared_ptr<Backend::Event> free_after = nullptr);
  // A buffer of `bytes`, safe to write on the compute stream.
  DeviceBuffer pooled(std::size_t bytes);
  // The same, for a writer outside the compute stream: `busy` is the copy-down still reading the
  // buffer, if any, which the writer waits for.
  DeviceBuffer pooled_for_collective(std::size_t bytes, std::shared_ptr<Backend::Event>& busy);

 private:
  struct Pooled {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> free_after;  // the copy-down still reading it
  };
  Backend& backend_;
  const RunMode& mode_;
  UnitBuffers view_;
  std::vector<DeviceBuffer> live_;
  std::map<std::size_t, std::vector<Pooled>> pool_;
};

}  // namespace zinf::runtime
