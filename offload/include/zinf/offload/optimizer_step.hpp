#pragma once
// The pipelined optimizer step over a partition store, as one oneTBB parallel_pipeline:
//   1. read   (serial, in order): take a staging buffer (waiting for the write-back of the slice
//             that used it before); for a slice with NVMe state, start the swap read
//             [master | exp_avg | exp_avg_sq] into it (io_uring, checksummed);
//   2. step   (parallel): wait for the read (a corrupt slice stops the step before its data is
//             used), for the unit's gradient and for the gradient scale (1/loss_scale x clip
//             coefficient, known once the global norm is), then run the fused AdamW host step
//             (kernels/cpu), writing bf16 parameters to the unit's host shard or the staging buffer;
//   3. write  (serial, in order): start writing NVMe state and NVMe parameters back; hand the
//             buffer on (the next read that takes it waits for these writes); report a unit done
//             once all its slices are stepped and its NVMe parameters are on disk.
// Live tokens = staging buffers (offload_optimizer.buffer_count), so host memory is bounded by
// construction, and reading slice i+1 and writing slice i-1 overlap the step of slice i.
// StepperOptions::phased runs the same stages in batches instead, for drives that lose
// throughput when reads and writes are mixed.
//
// A failure anywhere (I/O error, checksum mismatch, a gradient source that fails) cancels the
// pipeline, waits for every I/O already started, and comes out of step() as zinf::Error naming the
// tensor and file. The state is then partly updated, so the stepper refuses further steps: the run
// resumes from its last checkpoint, which the swap files never touch.

#include <oneapi/tbb/task_arena.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/offload/partition_store.hpp"

namespace zinf::offload {

struct StepperOptions {
  // Overlap reads, steps and writes (the default). false: one slice at a time, each write waited
  // before the next read starts; a debugging aid (ZINF_OFFLOAD_OVERLAP=0).
  bool overlap = true;
  // How the NVMe reads and write-backs share the drive. Mixed: each slice's write-back starts as
  // soon as it has stepped, next to the reads of later slices (the three-stage pipeline). Phased:
  // batches of `buffer_count` slices; a batch's reads, then its write-backs, so the drive serves
  // runs of one direction (ZINF_OFFLOAD_IO=phased|mixed).
  bool phased = false;
  // Exact mode: bf16 parameters are rounded by the portable code even on CPUs with AVX512-BF16
  // instructions (which flush fp32 subnormals), so results are bit-identical on every machine and
  // ISA, for every placement of the state. The fp32 state is bit-identical across placements in
  // both modes.
  bool exact = false;
};

// The options from the environment: ZINF_OFFLOAD_OVERLAP=0 turns overlap off, ZINF_OFFLOAD_EXACT=1
// turns exact mode on, ZINF_OFFLOAD_IO=phased|mixed picks the I/O schedule. Throws zinf::Error
// for any other value.
StepperOptions stepper_options_from_env();

// Where gradients and the gradient scale come from while backward is still running: backward
// posts each unit's gradient shard as it lands and the scale once the global norm is known; the
// step waits for what it needs. A failure posted by backward ends the step with that error.
class StepFeed {
 public:
  explicit StepFeed(std::size_t units);
  void post_gradient(std::size_t unit, const void* grad);
  void post_grad_scale(float scale);
  void fail(const std::string& why);
  // Blocking getters (throw zinf::Error once fail() was called).
  const void* gradient(std::size_t unit);
  float grad_scale();
  // Forgets everything posted, for the next step.
  void reset();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<const void*> grads_;
  bool have_scale_ = false;
  float scale_ = 1.0f;
  std::string failure_;
};

struct StepInputs {
  // step, lr, betas, eps, weight decay, adam_w_mode; adam.grad_scale is used unless grad_scale is set.
  kernels::cpu::AdamConfig adam;
  kernels::cpu::DType grad_dtype = kernels::cpu::DType::kBF16;
  // The unit's gradient shard (numel elements of grad_dtype). May block until it has arrived.
  std::function<const void*(std::size_t unit)> gradient;
  // The gradient scale (1/loss_scale x clip coefficient). May block; called once per step, by the
  // first slice that needs it. Unset: adam.grad_scale.
  std::function<float()> grad_scale;
  // Called (from a pipeline thread, in stepping order) when a unit's bf16 shard is final: in host
  // memory, or written to NVMe.
  std::function<void(std::size_t unit)> unit_done;
  // Units in stepping order (default: 0, 1, 2, ...); each at most once.
  std::vector<std::size_t> order;

  // gradient and grad_scale from a StepFeed (which must outlive the step).
  void feed_from(StepFeed& feed);
};

struct StepStats {
  double seconds = 0;
  std::uint64_t bytes_read = 0;     // from NVMe
  std::uint64_t bytes_written = 0;  // to NVMe
  std::uint64_t elements = 0;
  std::uint64_t slices = 0;
  // Summed over pipeline threads: time spent in the optimizer kernel, and blocked on NVMe reads,
  // on write-backs (staging reuse and unit completion) and on gradients / the scale.
  double kernel_seconds = 0;
  double read_wait_seconds = 0;
  double write_wait_seconds = 0;
  double input_wait_seconds = 0;
};

class OptimizerStepper {
 public:
  // The arena runs the pipeline and the kernels (size it to this rank's share of the cores).
  OptimizerStepper(PartitionStore& store, tbb::task_arena& arena, StepperOptions options = {});
  // Runs one step over every slice of the units in `in.order`. Throws zinf::Error on I/O errors,
  // checksum mismatches, failed inputs or bad inputs; after a failure during the step every later
  // call throws too (the state is partly updated).
  StepStats step(const StepInputs& in);
  const StepperOptions& options() const noexcept { return options_; }

 private:
  PartitionStore& store_;
  tbb::task_arena& arena_;
  StepperOptions options_;
  std::string failed_;  // why an earlier step failed
};

}  // namespace zinf::offload
