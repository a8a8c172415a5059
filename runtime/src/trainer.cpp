// The training loop (see trainer.hpp). One rank, the CPU backend; the optimizer state lives in the
// offload module's partition store (host memory or NVMe, per the config).
#include "zinf/runtime/trainer.hpp"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <fcntl.h>
#include <stdio.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/cpu_model_ops.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/dropout.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "zinf/runtime/lr_schedule.hpp"
#include "zinf/runtime/loss_scaler.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/nccl_comm.hpp"
#include "zinf/runtime/run_mode.hpp"
#include "zinf/runtime/weights.hpp"
#include "gpu_buffers.hpp"
#include "metrics.hpp"
#include "sharding.hpp"

namespace zinf::runtime {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using config::Json;
using kernels::cpu::DType;

namespace {

// Barriers around work one rank may do much longer than the others (loading a checkpoint): a
// launcher ends the job if a rank dies meanwhile.
constexpr std::chrono::milliseconds kSlowWait = std::chrono::hours(2);

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string hex64(std::uint64_t v) { return fmt::format("{:016x}", v); }

// Sum of squares of a unit's fp32 gradient, in fixed blocks so the result does not depend on the
// thread count.
double sum_squares(const float* g, std::int64_t n) {
  constexpr std::int64_t kBlock = 1 << 16;
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<std::size_t>(blocks), 0.0);
  tbb::parallel_for(std::int64_t{0}, blocks, [&](std::int64_t b) {
    double s = 0;
    const std::int64_t end = std::min(n, (b + 1) * kBlock);
    for (std::int64_t i = b * kBlock; i < end; ++i) s += static_cast<double>(g[i]) * g[i];
    partial[static_cast<std::size_t>(b)] = s;
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

// Everything a checkpoint restores besides the optimizer state tensors.
struct TrainerState {
  std::int64_t step = 0;     // optimizer steps done, skipped ones included
  std::int64_t applied = 0;  // steps that updated the weights (the scheduler's and Adam's count)
  DataPosition data;
  std::uint64_t seed = 0;
  std::uint64_t tokens = 0;
  double first_loss = 0;
  double best_eval = 0;
  bool have_eval = false;
  std::uint64_t eval_samples = 0;  // held-out samples each eval covers, fixed for the run
};

}  // namespace

namespace {

// The optimizer step on a thread of its own, fed gradients as backward lands them (the GPU
// pipeline). Destroyed before join() (an error in forward or backward), it fails the feed so the
// step stops waiting, then joins.
class OverlappedStep {
 public:
  // on_fail: told why, from the step's thread, when the step fails (so waiters can stop waiting).
  OverlappedStep(offload::OptimizerStepper& stepper, offload::StepFeed& feed, offload::StepInputs in,
                 std::function<void(const std::string&)> on_fail)
      : feed_(feed) {
    thread_ = std::thread([this, &stepper, in = std::move(in), on_fail = std::move(on_fail)] {
      try {
        stats_ = stepper.step(in);
      } catch (const std::exception& e) {
        error_ = std::current_exception();
        on_fail(e.what());
      } catch (...) {
        error_ = std::current_exception();
        on_fail("the optimizer step failed");
      }
    });
  }
  OverlappedStep(const OverlappedStep&) = delete;
  OverlappedStep& operator=(const OverlappedStep&) = delete;
  ~OverlappedStep() {
    if (thread_.joinable()) {
      feed_.fail("the training step stopped before all its gradients were computed");
      thread_.join();
    }
  }
  offload::StepStats join() {
    thread_.join();
    if (error_) std::rethrow_exception(error_);
    return stats_;
  }

 private:
  offload::StepFeed& feed_;
  std::thread thread_;
  offload::StepStats stats_;
  std::exception_ptr error_;
};

// A reduce-scatter posted to the gather thread: done, with an error or without.
struct ReduceTicket {
  void finish(std::string error) {
    {
      std::lock_guard lock(mu);
      error_ = std::move(error);
      done_ = true;
    }
    cv.notify_all();
  }
  bool done() {
    std::lock_guard lock(mu);
    return done_;
  }
  // Waits (the collective itself is bounded by the communicator's timeout); the error, or "".
  std::string wait() {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return done_; });
    return error_;
  }

 private:
  std::mutex mu;
  std::condition_variable cv;
  bool done_ = false;
  std::string error_;
};

CudaBackendOptions cuda_options(const TrainOptions& o) {
  CudaBackendOptions c;
  c.device = o.gpu;
  c.memory_limit = static_cast<std::size_t>(o.gpu_memory_limit);
  return c;
}

// What a run allocates on the GPU, by kind (bytes), from the config and the shapes.
struct GpuPlan {
  std::uint64_t params = 0, grads = 0, activations = 0, scratch = 0, other = 0;
  std::uint64_t optimizer = 0;  // the GPU's share of the optimizer: fp32 state and held gradients
  std::uint64_t adapters = 0;   // LoRA: adapters, their gradients and moments
  std::uint64_t total() const { return params + grads + activations + scratch + other + optimizer + adapters; }
  std::string describe() const {
    const auto g = [](std::uint64_t b) { return static_cast<double>(b) / (1u << 30); };
    return fmt::format("parameters {:.2f} GiB, gradient buffers {:.2f} GiB, activations {:.2f} GiB, scratch {:.2f} GiB, "
                       "{}{}other {:.2f} GiB: {:.2f} GiB",
                       g(params), g(grads), g(activations), g(scratch),
                       optimizer > 0 ? fmt::format("optimizer share {:.2f} GiB, ", g(optimizer)) : std::string(),
                       adapters > 0 ? fmt::format("LoRA adapters {:.3f} GiB, ", g(adapters)) : std::string(), g(other),
                       g(total()));
  }
};

// The run's mode inputs from the options (run_mode.hpp decides).
RunModeInputs mode_inputs(const TrainOptions& o, int world) {
  RunModeInputs in = RunModeInputs::from_config(o.ds);
  in.world = world;
  in.lora = o.lora.enabled();
  in.device = o.device;
  in.gpu_overlap = o.gpu_overlap;
  in.gradient_hook = static_cast<bool>(o.after_backward);
  for (const auto& u : make_layout(o.model).units) in.units.push_back(u.numel);
  return in;
}

class Trainer {
 public:
  explicit Trainer(const TrainOptions& o)
      : o_(o),
        owned_comm_(o.comm == nullptr ? make_single_communicator() : nullptr),
        comm_(o.comm != nullptr ? o.comm : owned_comm_.get()),
        mode_(decide_run_mode(mode_inputs(o, comm_->size()))),
        backend_(o.device == "cuda" ? make_cuda_backend(cuda_options(o)) : make_cpu_backend()),
        model_(o.model, *backend_, ModelOptions{mode_.param_dtype, true, o.lora}),
        layout_(model_.layout()),
        sampler_(*o.data, o.seq_len, o.seed, o.eval_fraction),
        schedule_(o.ds.scheduler, o.ds.optimizer.lr),
        scaler_(o.ds.fp16),
        arena_(tbb::task_arena::automatic) {  // the cores this process may use (zinf launch divides them)
    fp16_ = o.ds.fp16.enabled;
    const auto type = o.ds.optimizer.type;
    if (type != config::OptimizerType::kAdamW && type != config::OptimizerType::kAdam) {
      throw Error("optimizer '{}' is not available in the trainer yet: use Adam or AdamW", o.ds.optimizer.type_name);
    }
    if (o.data->max_token() >= static_cast<std::uint32_t>(o.model.vocab_size)) {
      throw Error("data '{}' holds token {} but the model's vocabulary has {} entries (tokenized for another model?)",
                  o.data->name(), o.data->max_token(), o.model.vocab_size);
    }
    world_ = comm_->size();
    rank_ = comm_->rank();
    stage_ = o.ds.zero.stage;
    host_backend_ = backend_->name() == "cpu";
    grad_dl_.resize(layout_.units.size());
    grad_view_.dtype = DType::kF32;
    grad_view_.units.assign(layout_.units.size(), nullptr);
    grad_live_.resize(layout_.units.size());
    micro_ = o.ds.batch.micro;
    gas_ = o.ds.batch.gas;
    const std::uint64_t samples_per_step = static_cast<std::uint64_t>(micro_ * gas_ * world_);
    steps_per_epoch_ = std::max<std::int64_t>(1, static_cast<std::int64_t>(sampler_.train_samples() / samples_per_step));
    total_steps_ = o.max_steps > 0 ? o.max_steps
                                   : std::max<std::int64_t>(1, std::llround(o.epochs * static_cast<double>(steps_per_epoch_)));
    // The optimizer state, through the offload module (host memory, or NVMe per the config).
    offload::OffloadSettings settings = offload::offload_settings(o.ds);
    for (const auto& n : settings.notes) spdlog::info("offload: {}", n);
    // The GPU pipeline (docs/gpu.md; run_mode.hpp says when it runs): each unit's gradient is
    // copied down into page-locked memory as its backward finishes (with several GPUs, this rank's
    // shard of it, reduce-scattered over NCCL first), its sum of squares computed on the GPU, and
    // the optimizer step runs on its own thread, stepping each unit as its gradient lands. With
    // several GPUs each gather uploads this rank's shard and all-gathers the unit over NCCL. With
    // gradient accumulation the earlier micro-batches' sum waits in the page-locked shard: each
    // next micro-batch uploads it and adds its own gradient on the GPU before the copy down, and
    // the last one's sum is the one stepped (land_shard).
    if (mode_.nccl) join_gpu_ranks();
    for (const auto& n : mode_.notes) spdlog::info("{}", n);
    // The store, with the gradient shards allocated right after it in its preflight: the
    // pipeline's page-locked ones, or the host shards of stages 1-3.
    std::vector<offload::UnitSpec> units;
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      units.push_back({layout_.units[u].name, static_cast<std::uint64_t>(mode_.shard[u])});
      settings.store.caller_gradient_bytes += mode_.pinned_gradient_bytes(u);
      settings.store.caller_pageable_bytes += mode_.pageable_gradient_bytes(u);
    }
    settings.store.gpu_units = mode_.on_gpu;
    if (mode_.lora) {
      // The base: bf16 shards only, per offload_param. (offload_optimizer concerns the adapters.)
      settings.store.frozen = true;
      settings.store.nvme_ratio = 0.0;
    }
    offload_ = std::make_unique<offload::Offload>(settings, units, rank_, arena_);
    if (mode_.pipeline) {
      for (std::size_t u = 0; u < layout_.units.size(); ++u) {
        if (mode_.on_gpu[u] || mode_.grads_in_params) {
          gpinned_.emplace_back();  // its gradient stays on the GPU, or lands in its parameter shard
          continue;
        }
        gpinned_.push_back(offload_->memory().allocate(offload::Purpose::kGradients,
                                                       static_cast<std::uint64_t>(mode_.shard[u]) * kernels::cpu::dtype_bytes(mode_.grad_dtype),
                                                       "gradient of " + layout_.units[u].name));
      }
      feed_ = std::make_unique<offload::StepFeed>(layout_.units.size());
      landed_.resize(layout_.units.size());
      sum_up_.resize(layout_.units.size());
      if (gas_ > 1) {
        // No more uploaded sums of a size than units of that size (the GPU plan counts so).
        for (std::size_t u = 0; u < layout_.units.size(); ++u) {
          if (mode_.on_gpu[u]) continue;
          std::size_t& limit = sum_limit_[sum_bytes(u)];
          limit = std::min(limit + 1, kSumBuffers);
        }
      }
      unit_sq_.emplace(*backend_, layout_.units.size() * sizeof(double));
    } else if (!mode_.lora && (mode_.sharded || mode_.partition_grads)) {
      gshard_.resize(layout_.units.size());
      for (std::size_t u = 0; u < layout_.units.size(); ++u) gshard_[u].resize(static_cast<std::size_t>(mode_.shard[u]));
    }
    tokens_.resize(static_cast<std::size_t>(micro_ * world_ * o.seq_len));
    targets_.resize(tokens_.size());
    if (mode_.stage3) {
      // The prefetch thread gathers on a channel of its own, so its all-gathers never interleave
      // with the compute thread's reductions.
      if (!nccl_) gather_comm_ = comm_->split("stage3-gather");
      const auto& z = o.ds.zero;
      CoordinatorOptions co{z.max_live_parameters, z.prefetch_bucket_size, z.max_reuse_distance,
                            z.param_persistence_threshold, z.model_persistence_threshold, {}};
      if (nccl_) {
        for (std::size_t u = 0; u < layout_.units.size(); ++u) co.gather_elements.push_back(gather_elements(u));
      }
      coord_ = std::make_unique<ParamCoordinator>(*backend_, layout_, mode_.param_dtype, co,
                                                  [this](std::size_t u, void* dst, std::size_t next) {
                                                    try {
                                                      gather_unit(u, dst, gather_comm_ ? *gather_comm_ : *comm_, worker_scratch_, next);  // (NCCL: unused)
                                                    } catch (...) {
                                                      worker_scratch_.ahead.reset();  // its buffers go back
                                                      throw;
                                                    }
                                                  });
    }
    // A GPU run is planned before its large allocations, and refused when it cannot fit the limit.
    if (!host_backend_) {
      gpu_plan_ = plan_gpu_memory();
      spdlog::info("GPU memory plan: {}{}", gpu_plan_.describe(),
                   o.gpu_memory_limit > 0 ? fmt::format(" of the {:.2f} GiB limit", o.gpu_memory_limit / 1073741824.0) : "");
      if (o.gpu_memory_limit > 0 && gpu_plan_.total() > o.gpu_memory_limit) {
        throw Error("this run does not fit --gpu-memory-limit {:.2f} GiB: it needs {} (micro-batch {} x {} tokens). Lower "
                    "the micro-batch or the sequence length{}, or raise the limit",
                    o.gpu_memory_limit / 1073741824.0, gpu_plan_.describe(), micro_, o.seq_len,
                    mode_.stage3 ? ", or stage3_max_live_parameters" : ", or use ZeRO stage 3 (parameters gathered per layer)");
      }
    }
    // Stages 0-2 keep the whole compute copy of the parameters; stage 3 gathers each unit when it is
    // used (the coordinator). Stages 0-1 accumulate whole gradients; 2-3 reduce each unit's gradient
    // as its backward finishes and keep only this rank's shard.
    if (!mode_.stage3) params_.emplace(*backend_, layout_, mode_.param_dtype);
    if (!mode_.partition_grads && !mode_.lora) full_grads_.emplace(*backend_, layout_, DType::kF32);
    if (mode_.lora) setup_lora();
    // The GPU's share of the optimizer: each unit's state, and its compute copy, which the
    // coordinator uses in place of gathers (filled by upload_gpu_state()).
    gpu_state_.resize(layout_.units.size());
    gpu_param_.resize(layout_.units.size());
    gpu_grad_.resize(layout_.units.size());
    for (std::size_t u = 0; u < mode_.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      gpu_state_[u] = DeviceBuffer(*backend_, 3 * n * sizeof(float));
      gpu_param_[u] = DeviceBuffer(*backend_, n * kernels::cpu::dtype_bytes(mode_.param_dtype));
      coord_->adopt(u, gpu_param_[u].data());
    }
  }

  // Several GPUs in the pipeline: the ranks join an NCCL communicator (bootstrapped over comm_)
  // for the gather thread's all-gathers and reduce-scatters. The ranks first agree that every one of them can use NCCL; where any cannot, all
  // take the synchronous path (collectives on the host, over Gloo) and say why.
  void join_gpu_ranks() {
    std::string why;
    const float mine = nccl_usable(&why) ? 1.0f : 0.0f;
    std::vector<float> all(static_cast<std::size_t>(world_));
    comm_->all_gather(std::span<const float>(&mine, 1), all);
    std::string bad;
    for (int r = 0; r < world_; ++r) {
      if (all[static_cast<std::size_t>(r)] == 0.0f) { if (!bad.empty()) bad += ", "; bad += std::to_string(r); }
    }
    if (!bad.empty()) {
      spdlog::warn("NCCL cannot be used by rank(s) {}{}: the GPUs' collectives run on the host over Gloo (the "
                   "synchronous path, much slower); install NCCL 2.18 or later, or point ZINF_NCCL_LIBRARY at it",
                   bad, mine == 0.0f ? fmt::format(" (here: {})", why) : std::string());
      RunModeInputs in = mode_inputs(o_, world_);
      in.nccl_usable = false;
      mode_ = decide_run_mode(in);
      return;
    }
    // A collective waits for the other ranks' computation and optimizer step too (a gather
    // waits for its unit's update): 10 minutes unless ZINF_COMM_TIMEOUT says otherwise.
    NcclOptions no;
    if (std::getenv("ZINF_COMM_TIMEOUT") == nullptr) no.timeout = std::chrono::minutes(10);
    try {
      nccl_ = make_nccl_collectives(*comm_, o_.gpu, no);
    } catch (const Error& e) {
      throw Error("{} (with several GPUs each rank needs a GPU of its own: zinf launch gives rank r GPU LOCAL_RANK; "
                  "ZINF_GPU_OVERLAP=0 takes the synchronous path, over the host)",
                  e.what());
    }
    if (rank_ == 0) {
      spdlog::info("{} GPUs: each unit's parameters are all-gathered, and its gradient reduce-scattered, over NCCL {} "
                   "(GPU to GPU); each rank copies down and steps its own shard",
                   world_, nccl_version());
    }
  }
  std::int64_t gather_elements(std::size_t u) const { return mode_.gather_elements(u); }

  // What this run allocates on the GPU: see GpuPlan. Upper bounds from the budgets: stage 3 holds
  // at most the live budget plus one unit plus the persistent units; gradient buffers as the
  // reduction path keeps them; activations as the model sizes them; the backend's scratch bound.
  GpuPlan plan_gpu_memory() const {
    GpuPlan p;
    GpuBufferInputs in;
    const std::size_t units = layout_.units.size();
    for (std::size_t u = 0; u < units; ++u) {
      const auto n = static_cast<std::uint64_t>(layout_.units[u].numel);
      in.numel.push_back(n);
      in.resident.push_back(mode_.stage3 ? static_cast<std::uint64_t>(gather_elements(u)) : n);
      in.on_gpu.push_back(mode_.on_gpu[u] != 0);
      in.persistent.push_back(mode_.stage3 && coord_->persistent(u));
    }
    in.param_bytes = kernels::cpu::dtype_bytes(mode_.param_dtype);
    in.grad_bytes = kernels::cpu::dtype_bytes(mode_.grad_dtype);
    in.stage3 = mode_.stage3;
    in.partition_grads = mode_.partition_grads;
    in.pipeline = mode_.pipeline;
    in.nccl = nccl_ != nullptr;
    in.grad_accum = static_cast<std::uint64_t>(gas_);
    in.world = static_cast<std::uint64_t>(world_);
    in.tied_embedding = o_.model.tie_word_embeddings;
    in.max_live = static_cast<std::uint64_t>(std::max<std::int64_t>(o_.ds.zero.max_live_parameters, 0));
    in.reduce_bucket = static_cast<std::uint64_t>(std::max<std::int64_t>(o_.ds.zero.reduce_bucket_size, 0));
    in.frozen = mode_.lora;
    if (mode_.lora) {
      in.lora_numel = static_cast<std::uint64_t>(model_.lora().numel);
      in.lora_state_on_gpu = !o_.lora_offload_optimizer;
    }
    const GpuBuffers b = plan_gpu_buffers(in);
    p.params = b.params;
    p.grads = b.grads;
    p.optimizer = b.optimizer;
    p.adapters = b.adapters;
    p.activations = Model::activation_bytes_for(o_.model, micro_, o_.seq_len, model_.options());
    const ModelConfig& c = o_.model;
    StepShape sh;
    sh.rows = micro_ * o_.seq_len;
    sh.batch = micro_;
    sh.seq = o_.seq_len;
    sh.hidden = c.hidden_size;
    sh.q_dim = c.q_dim();
    sh.qkv_dim = c.qkv_dim();
    sh.intermediate = c.intermediate_size;
    sh.vocab = c.vocab_size;
    sh.heads = c.num_heads;
    sh.kv_heads = c.num_kv_heads;
    sh.head_dim = c.head_dim;
    sh.bf16 = mode_.param_dtype == DType::kBF16;
    p.scratch = backend_->scratch_bound(sh);
    p.other = layout_.units.size() * sizeof(double) + (1u << 20);  // norms, tokens, small buffers
    return p;
  }

  ~Trainer() {
    // A step still in flight stops first (a gather waiting for its updates is told why); then the
    // prefetch thread; a read-ahead lease goes back to the store while it exists.
    fail_units("training stopped");
    inflight_.reset();
    coord_.reset();
    // Copies still running (an error mid-backward) finish before their buffers go; the pinned
    // gradient shards go back to the host memory of offload_, which outlives them here.
    try {
      backend_->synchronize();
    } catch (...) {
    }
    gpinned_.clear();
    worker_scratch_.ahead.reset();
  }
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainResult run() {
    TrainResult result;
    const bool resumed = !o_.resume.empty();
    if (!resumed && fs::exists(fs::path(o_.output_dir) / "checkpoints" / "latest")) {
      throw Error("'{}' already holds a run with checkpoints: pass --resume to continue it, or choose another "
                  "--output-dir (nothing was changed)",
                  o_.output_dir);
    }
    std::string resumed_from;
    // Every rank loads its own piece; they agree before going on, so that a rank whose piece is
    // missing or damaged stops all of them with its reason (the others name it), instead of
    // leaving them in the next collective with a peer that has gone.
    std::string load_error;
    try {
      if (resumed) {
        resumed_from = resolve_checkpoint(o_.output_dir, o_.resume);
        load_checkpoint(resumed_from);
      } else {
        initialise();
      }
    } catch (const std::exception& e) {
      if (world_ == 1) throw;
      load_error = e.what();
    }
    if (world_ > 1) agree_or_throw(load_error, resumed ? "resume" : "initialise its state");
    // A run that trains nothing: the state it started from, no losses.
    const auto untrained = [&] {
      result.steps = st_.step;
      result.first_loss = st_.first_loss;
      result.final_loss = result.final_eval_loss = result.best_eval_loss = std::nan("");
      result.last_checkpoint = resumed_from;
      return result;
    };
    if (resumed && st_.step >= total_steps_) {
      spdlog::info("the checkpoint is at step {}, at or past the {} steps asked for: nothing to train", st_.step,
                   total_steps_);
      return untrained();
    }
    upload_gpu_state();
    if (world_ > 1) comm_->barrier(kSlowWait);  // every rank has its state, however long loading took
    // A stop asked for during the set-up (allocating, loading, initialising: minutes for a large
    // model) ends the run here, before a step and its checkpoint: nothing trained, nothing saved.
    if (stop_agreed()) {
      spdlog::info("a stop was requested during set-up: stopped before the first step; nothing was trained or saved");
      result.stopped_early = true;
      return untrained();
    }
    std::optional<MetricsCsv> csv;
    if (rank_ == 0) {
      fs::create_directories(o_.output_dir);
      write_file_atomic((fs::path(o_.output_dir) / "deepspeed_config_auto.json").string(), o_.ds_resolved.dump(2) + "\n");
      csv.emplace((fs::path(o_.output_dir) / "training_metrics.csv").string(), resumed ? st_.step : -1);
    }
    {
      std::lock_guard lock(unit_mu_);
      unit_steps_.assign(layout_.units.size(), st_.applied);
      steps_needed_ = st_.applied;
    }
    refresh_params();
    log_start();

    const double flops_per_token = model_flops_per_token();
    const auto run_start = Clock::now();
    const std::int64_t first_step = st_.step;
    double last_loss = 0, last_eval = std::nan("");
    bool stopped = false;
    while (st_.step < total_steps_) {
      const auto t0 = Clock::now();
      PhaseTimes tm;
      // The schedule advances only on applied steps (DeepSpeed skips it with the step).
      const double lr = st_.applied == 0 ? schedule_.initial_lr() : schedule_.lr_at(st_.applied - 1);
      const double loss_scale = fp16_ ? scaler_.scale() : 1.0;
      if (full_grads_) full_grads_->zero();
      if (mode_.lora) backend_->fill_zero(lora_grads_.data(), lora_grads_.bytes());
      // The gradient shards start each step at zero: 4 bytes per parameter, so in parallel.
      for (auto& g : gshard_) {
        float* p = g.data();
        tbb::parallel_for(tbb::blocked_range<std::size_t>(0, g.size(), 1 << 18),
                          [p](const tbb::blocked_range<std::size_t>& r) { std::fill(p + r.begin(), p + r.end(), 0.0f); });
      }
      if (mode_.stage3) {
        coord_->begin(ParamCoordinator::training_schedule(
            layout_.units.size(), gas_, [this](std::size_t u) { return model_.unit_reads(u); },
            [this](std::size_t u) { return model_.backward_param_reads(u); }));
      }
      std::size_t use = 0;  // the coordinator's position in the step's schedule
      double loss_sum = 0;
      // The GPU pipeline's step starts now (NVMe state is read ahead during forward), or, while
      // the previous step is still finishing (stage 3: this forward overlaps it, each gather
      // waiting for its unit's update), once this forward is done.
      const bool clipping = o_.ds.gradient_clipping > 0;
      bool step_started = false;
      if (mode_.pipeline) {
        if (!inflight_) {
          start_pipeline_step(lr, clipping);
          step_started = true;
        }
      }
      for (std::int64_t m = 0; m < gas_; ++m) {
        micro_i_ = m;
        auto td = Clock::now();
        // Every rank draws the same round of micro_ x W samples and takes its own micro_ of them.
        sampler_.next_batch(micro_ * world_, tokens_, targets_);
        const std::size_t mine = static_cast<std::size_t>(rank_ * micro_ * o_.seq_len);
        const std::size_t len = static_cast<std::size_t>(micro_ * o_.seq_len);
        model_.set_batch(std::span(tokens_).subspan(mine, len), std::span(targets_).subspan(mine, len), micro_, o_.seq_len);
        if (mode_.lora) bind_lora(micro_seed(m), true);
        tm.data += seconds_since(td);
        auto tf = Clock::now();
        float loss = 0;
        if (mode_.stage3) {
          for (std::size_t u = 0; u < layout_.units.size(); ++u, ++use) {
            model_.forward_unit(u, coord_->acquire(use));
            coord_->release(use);
          }
          loss = model_.loss();
        } else {
          loss = model_.forward(params_->view());
        }
        tm.forward += seconds_since(tf);
        if (mode_.pipeline && !step_started) {
          // Every unit was gathered, so the previous step has updated them all: it is finishing.
          const auto tj = Clock::now();
          finish_inflight();
          tm.optimizer += seconds_since(tj);
          start_pipeline_step(lr, clipping);
          step_started = true;
        }
        if (!std::isfinite(loss) && world_ == 1) {
          throw Error("the loss is {} at step {}: training diverged (lower the learning rate, or resume from an "
                      "earlier checkpoint)",
                      loss, st_.step + 1);
        }
        // With several ranks the step goes on (every rank's collectives must still match); the
        // loss's sum over ranks below carries the non-finite value to every rank, which then stop.
        auto tb = Clock::now();
        if (mode_.lora) {
          // The frozen base: activation gradients only; the adapters' gradients accumulate.
          for (std::size_t u = layout_.units.size(); u-- > 0; ++use) {
            const UnitBuffers& p = mode_.stage3 ? coord_->acquire(use) : params_->view();
            model_.backward_unit(u, p, frozen_grads_);
            if (mode_.stage3) coord_->release(use);
          }
        } else if (!mode_.partition_grads) {
          model_.backward(params_->view(), full_grads_->view(), static_cast<float>(loss_scale));
        } else {
          for (std::size_t u = layout_.units.size(); u-- > 0; ++use) {
            const UnitBuffers& p = mode_.stage3 ? coord_->acquire(use) : params_->view();
            for (const std::size_t r : model_.unit_reads(u)) take_grad_buffer(r);
            if (mode_.pipeline && micro_i_ > 0 && !mode_.on_gpu[u]) upload_sum(u);
            model_.backward_unit(u, p, grad_view_, static_cast<float>(loss_scale));
            if (mode_.stage3) coord_->release(use);
            if (mode_.pipeline) {
              land_gradient(u);
              if (u == 0 && micro_i_ == gas_ - 1) {
                // The last gradient: the units not yet stepped are next step's tail, stepped in
                // forward order so that the next forward can follow them.
                // (The GPU's units, 0 to mode_.gpu_units - 1, are stepped after the norm, before them.)
                std::lock_guard lock(unit_mu_);
                std::size_t left = mode_.gpu_units;
                for (std::size_t v = mode_.gpu_units; v < unit_steps_.size(); ++v) left += unit_steps_[v] <= st_.applied ? 1 : 0;
                tail_ = std::min(left > 0 ? left - 1 : 0, layout_.units.size() - 1);
              }
            } else {
              gradient_ready(u);  // unit u's gradient of this micro-batch is complete
            }
          }
          flush_gradient_bucket();
        }
        tm.backward += seconds_since(tb);
        loss_sum += loss;
      }
      if (mode_.stage3) coord_->end();
      if (world_ > 1) {
        float l = static_cast<float>(loss_sum);
        comm_->all_reduce_sum(std::span<float>(&l, 1));
        loss_sum = l;
      }
      if (!std::isfinite(loss_sum)) {
        throw Error("the loss is not finite at step {} on some rank: training diverged (lower the learning rate, or "
                    "resume from an earlier checkpoint)",
                    st_.step + 1);
      }
      const double loss = loss_sum / static_cast<double>(gas_ * world_);
      gradients_to_host();
      if (o_.after_backward && !mode_.lora) {
        std::vector<void*> g;
        if (full_grads_) {
          for (std::size_t u = 0; u < layout_.units.size(); ++u) g.push_back(host_grad(u));
        } else {
          for (std::size_t u = 0; u < layout_.units.size(); ++u) {
            if (mode_.pipeline) landed_[u]->synchronize();
            g.push_back(gshard(u));
          }
        }
        o_.after_backward(st_.step + 1, g);
      }
      // Gradients summed over ranks: all of each unit (stage 0), or this rank's shard of it (stage
      // 1; stages 2-3 reduced them during backward).
      auto to = Clock::now();
      reduce_gradients();
      // Global norm of the accumulated (averaged) gradient; DeepSpeed's clip coefficient.
      double sq = 0;
      if (mode_.lora) {
        sq = lora_grad_sq();  // of the gradient summed over the ranks: the same on every rank
      } else if (mode_.pipeline) {
        // Summed on the GPU as each gradient was complete.
        std::vector<double> unit_sq(layout_.units.size());
        backend_->download(unit_sq.data(), unit_sq_->data(), unit_sq.size() * sizeof(double));
        for (const double v : unit_sq) sq += v;
      } else {
        for (std::size_t u = 0; u < layout_.units.size(); ++u) {
          sq += have_shards() ? sum_squares(gshard(u), mode_.shard[u]) : sum_squares(host_grad(u), layout_.units[u].numel);
        }
      }
      if (mode_.sharded && !mode_.lora) {
        // Every rank's double, gathered and summed in rank order (a float sum could overflow).
        float mine[2];
        std::memcpy(mine, &sq, sizeof(sq));
        std::vector<float> all(2 * static_cast<std::size_t>(world_));
        comm_->all_gather(mine, all);
        sq = 0;
        for (int r = 0; r < world_; ++r) {
          double v = 0;
          std::memcpy(&v, all.data() + 2 * r, sizeof(v));
          sq += v;
        }
      }
      const double norm = std::sqrt(sq) / (static_cast<double>(gas_ * world_) * loss_scale);
      const bool overflow = !std::isfinite(norm);
      if (overflow && !fp16_) {
        throw Error("the gradient norm is {} at step {}: training diverged", norm, st_.step + 1);
      }
      double clip = 1.0;
      if (o_.ds.gradient_clipping > 0) {
        const double c = o_.ds.gradient_clipping / (norm + 1e-6);
        if (c < 1.0) clip = c;
      }
      const double grad_scale = clip / (static_cast<double>(gas_ * world_) * loss_scale);
      if (overflow) {
        // fp16: skip the step; the weights, the optimizer state and the schedule stay as they were.
        spdlog::info("step {}: fp16 gradients overflow at loss scale {}; step skipped", st_.step + 1, loss_scale);
      } else if (mode_.lora) {
        lora_step(lr, grad_scale);  // the base is frozen: nothing to refresh
        ++st_.applied;
      } else {
        if (mode_.pipeline) {
          if (clipping && inflight_) feed_->post_grad_scale(static_cast<float>(grad_scale));
          step_gpu_units(lr, grad_scale);
          // Stage 3 with bf16 parameters leaves the step running: the next forward's gathers wait
          // for each unit's bf16 shard (refresh_params drops the gathered copies). An fp32 gather
          // reads the master, whose NVMe write-back the step does not report per unit, and stage 2
          // keeps every unit on the GPU and uploads them all after the step: both join here.
          if (!mode_.stage3 || mode_.param_dtype != DType::kBF16) finish_inflight();
        } else {
          offload::StepInputs in = step_inputs(lr, grad_scale);
          in.grad_dtype = DType::kF32;
          in.gradient = [this](std::size_t u) -> const void* {
            return have_shards() ? static_cast<const void*>(gshard(u)) : static_cast<const void*>(host_grad(u));
          };
          const offload::StepStats ss = offload_->stepper().step(in);
          joined_io_ += ss.read_wait_seconds + ss.write_wait_seconds;
        }
        refresh_params();
        ++st_.applied;
        if (mode_.pipeline) {
          // From now on every gather (the coordinator's prefetch for the next step starts at its
          // begin()) waits for this step's update of its unit.
          std::lock_guard lock(unit_mu_);
          steps_needed_ = st_.applied;
        }
      }
      if (fp16_) scaler_.update(overflow);
      tm.optimizer += seconds_since(to);

      ++st_.step;
      const std::uint64_t step_tokens = static_cast<std::uint64_t>(micro_ * gas_ * world_ * o_.seq_len);
      st_.tokens += step_tokens;
      if (st_.step == 1) st_.first_loss = loss;
      if (st_.step == first_step + 1 && !resumed) result.first_loss = loss;
      last_loss = loss;
      double eval_loss = std::nan("");
      if ((o_.eval_every > 0 && st_.step % o_.eval_every == 0) || st_.step == total_steps_) {
        eval_loss = evaluate();
        last_eval = eval_loss;
        if (!st_.have_eval || eval_loss < st_.best_eval) st_.best_eval = eval_loss;
        st_.have_eval = true;
      }
      tm.offload_io += std::exchange(joined_io_, 0.0);  // the I/O waits of the steps joined so far
      const double step_s = seconds_since(t0);
      const CoordinatorStats cs = step_param_stats();
      const double tps = static_cast<double>(step_tokens) / step_s;
      const double epoch = static_cast<double>(sampler_.position().epoch) + sampler_.epoch_fraction();
      if (csv) {
        StepMetrics row;
        row.step = st_.step;
        row.epoch = epoch;
        row.loss = loss;
        row.eval_loss = eval_loss;
        row.lr = lr;
        row.grad_norm = norm;
        row.loss_scale = loss_scale;
        row.skipped = overflow;
        row.tokens = st_.tokens;
        row.tokens_per_s = tps;
        row.tflops = flops_per_token * tps / 1e12;
        row.step_s = step_s;
        row.phases = tm;
        row.gpu_mem_bytes = backend_->memory_peak();
        row.host_mem_bytes = offload_->memory().used();
        row.nvme_bytes = nvme_bytes();
        row.live_params_hwm = cs.live_high_water;
        row.prefetch_hits = cs.hits;
        row.prefetch_misses = cs.misses;
        row.param_wait_s = cs.wait_seconds;
        csv->write(row);
      }
      const bool stop = stop_agreed();
      stopped = stop && st_.step < total_steps_;
      if (rank_ == 0) progress(loss, eval_loss, lr, tps, run_start, first_step, tm, norm, stopped);
      if (stop) {
        if (stopped) {
          spdlog::info("stop requested: {} at step {}", o_.save ? "saving a checkpoint and exiting" : "exiting (--no-save: no checkpoint)", st_.step);
          break;
        }
      }
      if (o_.save && o_.save_every > 0 && st_.step % o_.save_every == 0 && st_.step < total_steps_) {
        result.last_checkpoint = save_checkpoint();
      }
    }
    finish_inflight();
    if (mode_.lora) verify_base();
    if (o_.save) result.last_checkpoint = save_checkpoint();
    result.steps = st_.step;
    result.first_loss = st_.first_loss;
    result.final_loss = last_loss;
    result.final_eval_loss = last_eval;
    result.best_eval_loss = st_.have_eval ? st_.best_eval : std::nan("");
    result.stopped_early = stopped;
    if (rank_ == 0) write_summary(result, seconds_since(run_start), first_step);
    return result;
  }

  // Collective: throws on every rank when any rank's `error` is not empty; a rank without an error
  // of its own names the ranks that failed (each of which reports its own reason).
  void agree_or_throw(const std::string& error, const char* what) {
    const float mine = error.empty() ? 0.0f : 1.0f;
    std::vector<float> all(static_cast<std::size_t>(world_));
    comm_->all_gather(std::span<const float>(&mine, 1), all);
    std::string bad;
    for (int r = 0; r < world_; ++r) {
      if (all[static_cast<std::size_t>(r)] != 0.0f) { if (!bad.empty()) bad += ", "; bad += std::to_string(r); }
    }
    if (bad.empty()) return;
    if (!error.empty()) throw Error("{}", error);
    throw Error("rank {}: rank(s) {} could not {} (see their errors); every rank stops", rank_, bad, what);
  }

  // Whether any rank was asked to stop (all ranks stop after the same step).
  bool stop_agreed() {
    float stop = o_.stop_requested && o_.stop_requested() ? 1.0f : 0.0f;
    if (world_ > 1) comm_->all_reduce_sum(std::span<float>(&stop, 1));
    return stop > 0;
  }

  // Sums the accumulated gradients over ranks: in place for every unit (stage 0), or into this
  // rank's shard of each unit (stages 1-3; the unit padded with zeros to W shards).
  void reduce_gradients() {
    if (mode_.lora) {
      lora_reduce();
      return;
    }
    if (world_ == 1 || mode_.partition_grads) return;
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      float* g = host_grad(u);
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      if (!mode_.sharded) {
        comm_->all_reduce_sum(std::span<float>(g, n));
        continue;
      }
      padded_.assign(static_cast<std::size_t>(mode_.shard[u] * world_), 0.0f);
      std::memcpy(padded_.data(), g, n * sizeof(float));
      comm_->reduce_scatter_sum(padded_, gshard_[u]);
    }
  }

  // This rank's piece of a full unit (zero padded past the unit's end).
  std::vector<float> my_shard(const float* full, std::size_t u) const {
    const auto n = layout_.units[u].numel;
    std::vector<float> out(static_cast<std::size_t>(mode_.shard[u]), 0.0f);
    const std::int64_t begin = static_cast<std::int64_t>(rank_) * mode_.shard[u];
    const std::int64_t count = std::clamp<std::int64_t>(n - begin, 0, mode_.shard[u]);
    if (count > 0) std::memcpy(out.data(), full + begin, static_cast<std::size_t>(count) * sizeof(float));
    return out;
  }

 private:
  void initialise() {
    load_base();
    st_.seed = o_.seed;
    st_.eval_samples = default_eval_samples();
    if (mode_.lora) init_lora_state();
  }

  // The model's weights into the store: from init_weights or the seed. (A LoRA run's frozen base
  // comes here on resume too, and its fingerprint is kept: see base_fingerprint().)
  void load_base() {
    // The fp32 master is made in host memory whatever the compute backend: from a checkpoint, the
    // whole model at once; a fresh initialisation a unit at a time (host memory for one unit, not
    // 4 bytes per parameter of the model, beyond the store).
    if (mode_.lora) {
      base_unit_hash_.assign(layout_.units.size(), 0);
      base_shard_hash_.assign(layout_.units.size(), 0);
    }
    const auto put = [this](std::size_t u, const float* full) {
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      std::vector<float> mine;
      if (mode_.sharded) mine = my_shard(full, u);
      const std::span<const float> piece = mode_.sharded ? std::span<const float>(mine) : std::span<const float>(full, n);
      offload_->store().set_state(u, piece);
      if (mode_.lora) {
        // The bf16 values the store now holds, hashed: the whole unit (the same on every rank) and
        // this rank's piece.
        std::vector<std::uint16_t> bf(n);
        kernels::cpu::convert(full, DType::kF32, bf.data(), DType::kBF16, n);
        base_unit_hash_[u] = XXH3_64bits(bf.data(), n * 2);
        base_shard_hash_[u] = base_unit_hash_[u];
        if (mode_.sharded) {
          bf.resize(piece.size());
          kernels::cpu::convert(piece.data(), DType::kF32, bf.data(), DType::kBF16, piece.size());
          base_shard_hash_[u] = XXH3_64bits(bf.data(), piece.size() * 2);
        }
      }
    };
    if (!o_.init_weights.empty()) {
      auto host = make_cpu_backend();
      UnitStorage master(*host, layout_, DType::kF32);
      load_weights(o_.init_weights, o_.model, layout_, *host, master.view());
      spdlog::info("weights from {}", o_.init_weights);
      for (std::size_t u = 0; u < layout_.units.size(); ++u) put(u, static_cast<const float*>(master.view().units[u]));
    } else {
      std::vector<float> unit;
      for (std::size_t u = 0; u < layout_.units.size(); ++u) {
        unit.resize(static_cast<std::size_t>(layout_.units[u].numel));
        init_unit(o_.model, layout_.units[u], o_.seed, unit);
        put(u, unit.data());
      }
    }
  }

  // ---- LoRA (TrainOptions::lora): the adapters' buffers, state, step and checks

  void setup_lora() {
    const LoraLayout& l = model_.lora();
    const auto n = static_cast<std::size_t>(l.numel);
    lora_offload_ = o_.lora_offload_optimizer && !host_backend_;
    lora_params_ = DeviceBuffer(*backend_, n * sizeof(float));
    lora_grads_ = DeviceBuffer(*backend_, n * sizeof(float));
    if (lora_offload_) {
      lora_host_.assign(3 * n, 0.0f);  // master | exp_avg | exp_avg_sq
    } else {
      lora_moments_ = DeviceBuffer(*backend_, 2 * n * sizeof(float));
    }
    lora_sq_ = DeviceBuffer(*backend_, sizeof(double));
    frozen_grads_.dtype = DType::kF32;  // no units: the base has no gradients
  }
  std::size_t lora_numel() const { return static_cast<std::size_t>(model_.lora().numel); }

  // The adapters at the start: PEFT's initialisation from the seed, or --lora-init's.
  void init_lora_state() {
    const LoraLayout& l = model_.lora();
    std::vector<float> v(lora_numel());
    if (!o_.lora_init.empty()) {
      LoadedAdapter a = load_adapter(o_.lora_init, o_.model);
      const LoraConfig& got = a.layout.config;
      const LoraConfig& want = l.config;
      if (got.rank != want.rank || got.targets != want.targets || got.alpha != want.alpha || got.rslora != want.rslora) {
        throw Error("--lora-init {} holds adapters of {}, but this run asks for {}: pass the same --lora-rank, "
                    "--lora-alpha and --lora-targets (or --lora-rslora) as the adapter",
                    o_.lora_init, got.describe(), want.describe());
      }
      v = std::move(a.params);
      spdlog::info("LoRA adapters from {}", o_.lora_init);
    } else {
      init_lora(l, st_.seed, v);
    }
    const std::vector<float> zero(v.size(), 0.0f);
    set_lora_state(v, zero, zero);
  }
  void set_lora_state(std::span<const float> master, std::span<const float> m, std::span<const float> v) {
    const std::size_t n = lora_numel();
    backend_->upload(lora_params_.data(), master.data(), n * sizeof(float));
    if (lora_offload_) {
      std::copy(master.begin(), master.end(), lora_host_.begin());
      std::copy(m.begin(), m.end(), lora_host_.begin() + static_cast<std::ptrdiff_t>(n));
      std::copy(v.begin(), v.end(), lora_host_.begin() + static_cast<std::ptrdiff_t>(2 * n));
    } else {
      backend_->upload(lora_moments_.data(), m.data(), n * sizeof(float));
      backend_->upload(lora_moments_.f32() + n, v.data(), n * sizeof(float));
    }
  }
  // [master | exp_avg | exp_avg_sq], 3 x numel.
  std::vector<float> lora_state() {
    const std::size_t n = lora_numel();
    if (lora_offload_) return lora_host_;
    std::vector<float> out(3 * n);
    backend_->download(out.data(), lora_params_.data(), n * sizeof(float));
    backend_->download(out.data() + n, lora_moments_.data(), 2 * n * sizeof(float));
    return out;
  }
  // The dropout masks of micro-batch m of this step on this rank (the same after a resume).
  std::uint64_t micro_seed(std::int64_t m) const {
    const std::uint64_t step = kernels::dropout_stream(st_.seed ^ 0x4C6F5241ull, static_cast<std::uint64_t>(st_.step));
    return kernels::dropout_stream(step, static_cast<std::uint64_t>(m * world_ + rank_));
  }
  void bind_lora(std::uint64_t seed, bool training) {
    model_.set_lora({lora_params_.f32(), training ? lora_grads_.f32() : nullptr, seed, training});
  }
  // The adapters' gradients summed over the ranks (they are replicated, as in data parallelism).
  // (lora_step() reuses the host copy this leaves in lora_grad_host_.)
  void lora_reduce() {
    if (world_ == 1) return;
    if (host_backend_) {  // the backend's memory is host memory: in place
      comm_->all_reduce_sum(std::span<float>(lora_grads_.f32(), lora_numel()));
      return;
    }
    lora_grad_host_.resize(lora_numel());
    backend_->download(lora_grad_host_.data(), lora_grads_.data(), lora_grad_host_.size() * sizeof(float));
    comm_->all_reduce_sum(std::span<float>(lora_grad_host_));
    backend_->upload(lora_grads_.data(), lora_grad_host_.data(), lora_grad_host_.size() * sizeof(float));
  }
  double lora_grad_sq() {
    backend_->sum_squares(static_cast<double*>(lora_sq_.data()), lora_grads_.data(), static_cast<std::int64_t>(lora_numel()));
    double sq = 0;
    backend_->download(&sq, lora_sq_.data(), sizeof(double));
    return sq;
  }
  void lora_step(double lr, double grad_scale) {
    const offload::StepInputs in = step_inputs(lr, grad_scale);
    const std::size_t n = lora_numel();
    kernels::cpu::AdamTensors t;
    t.grad_dtype = DType::kF32;
    t.state_dtype = DType::kF32;
    t.param_out = nullptr;
    t.n = n;
    if (lora_offload_) {
      // The CPU optimizer on the host copy; the new adapters go back up. (With several ranks
      // lora_reduce() has left the summed gradients in lora_grad_host_ already.)
      if (world_ == 1) {
        lora_grad_host_.resize(n);
        backend_->download(lora_grad_host_.data(), lora_grads_.data(), n * sizeof(float));
      }
      t.param = lora_host_.data();
      t.grad = lora_grad_host_.data();
      t.exp_avg = lora_host_.data() + n;
      t.exp_avg_sq = lora_host_.data() + 2 * n;
      kernels::cpu::adam_step(in.adam, t, kernels::cpu::Exec(kernels::cpu::active_isa(), &arena_));
      backend_->upload(lora_params_.data(), lora_host_.data(), n * sizeof(float));
    } else {
      t.param = lora_params_.f32();
      t.grad = lora_grads_.data();
      t.exp_avg = lora_moments_.f32();
      t.exp_avg_sq = lora_moments_.f32() + n;
      backend_->adam_step(in.adam, t);
    }
  }
  // One number for the frozen base as loaded (every rank computes the same).
  std::uint64_t base_fingerprint() const {
    return XXH3_64bits(base_unit_hash_.data(), base_unit_hash_.size() * sizeof(std::uint64_t));
  }
  std::string base_source() const {
    return o_.init_weights.empty() ? fmt::format("seeded initialisation (seed {})", o_.seed) : o_.init_weights;
  }
  // The LoRA options and the base, as checkpoints and summary.json record them.
  Json lora_json() const {
    const LoraConfig& c = model_.lora().config;
    return {{"rank", c.rank},
            {"alpha", c.alpha},
            {"dropout", c.dropout},
            {"targets", lora_targets_string(c.targets)},
            {"rslora", c.rslora},
            {"base", {{"source", base_source()}, {"fingerprint", hex64(base_fingerprint())}}}};
  }
  double model_flops_per_token() const {
    return mode_.lora ? lora_training_flops_per_token(o_.model, o_.seq_len, model_.lora())
                 : training_flops_per_token(o_.model, o_.seq_len);
  }
  // At the end of a LoRA run: the store's bf16 shards and the compute copies (stages 0-2) are
  // still the base as loaded, bit for bit. (Fails only on a bug: the base must never change.)
  void verify_base() {
    const auto t0 = Clock::now();
    main_scratch_.ahead.reset();  // read-aheads give their staging buffers back
    worker_scratch_.ahead.reset();
    std::vector<std::uint16_t> shard, copy;
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      shard.resize(static_cast<std::size_t>(mode_.shard[u]));
      offload_->store().fetch(u).copy_to(shard);
      copy.clear();
      if (params_) {
        copy.resize(static_cast<std::size_t>(layout_.units[u].numel));
        backend_->download(copy.data(), params_->view().units[u], copy.size() * 2);
      }
      if (o_.inspect_base) o_.inspect_base(u, shard, copy);
      const bool store_same = XXH3_64bits(shard.data(), shard.size() * 2) == base_shard_hash_[u];
      const bool copy_same = copy.empty() || XXH3_64bits(copy.data(), copy.size() * 2) == base_unit_hash_[u];
      if (!store_same || !copy_same) {
        throw Error("the frozen base's {} changed during LoRA training ({}); this is a zinf bug: please report it",
                    layout_.units[u].name, store_same ? "its compute copy" : "its stored shard");
      }
    }
    spdlog::info("LoRA: the frozen base is bit-identical to the one loaded ({} units checked in {:.1f}s)",
                 layout_.units.size(), seconds_since(t0));
  }

  // The compute copy of the parameters from the store, after an optimizer step: every unit at
  // stages 0-2; at stage 3 units are gathered when used, so only the persistent ones are dropped.
  void refresh_params() {
    if (mode_.stage3) {
      coord_->invalidate();
      return;
    }
    // The uploads run on the host-to-device stream: after any compute still reading the old values.
    if (!host_backend_) backend_->wait(Stream::kHostToDevice, *backend_->record(Stream::kCompute));
    for (std::size_t u = 0; u < layout_.units.size(); ++u) gather_unit(u, params_->view().units[u], *comm_, main_scratch_);
  }

  struct GatherScratch {
    std::vector<float> in, out, m, v;
    std::vector<std::byte> host;  // the whole unit, before its upload to a GPU backend
    std::optional<offload::ParamLease> ahead;  // NVMe reads of the next unit, started early
    std::size_t ahead_unit = ParamCoordinator::kNone;
  };

  // A unit's full compute parameters into `dst` (numel elements of the parameter dtype): the bf16
  // shard, or the fp32 master (fp16 runs round it to fp16 and widen it again, for the CPU
  // backend's fp32 products). With sharded state every rank's piece is all-gathered over `comm`
  // (bf16 pieces travel two to a float slot of the gather).
  // `next` (stage 3's prefetch thread): the unit gathered after this one; when its bf16 shard is
  // on NVMe its reads start now, if staging buffers are free, and overlap this unit's gather.
  void gather_unit(std::size_t u, void* device_dst, Communicator& comm, GatherScratch& s,
                   std::size_t next = ParamCoordinator::kNone) {
    const auto n = static_cast<std::size_t>(layout_.units[u].numel);
    if (host_backend_) {  // the CPU backend's memory is host memory: gather in place
      gather_unit_host(u, device_dst, comm, s, next);
      return;
    }
    wait_unit(u);  // the GPU pipeline's step may still be updating it
    if (nccl_) {
      // Several GPUs: this rank's shard goes up into its place in the padded buffer, then the
      // ranks all-gather the unit in place over NCCL (after the upload, and so after the compute
      // the upload's stream was ordered behind).
      const auto sh = static_cast<std::size_t>(mode_.shard[u]);
      const std::size_t pb = kernels::cpu::dtype_bytes(mode_.param_dtype);
      std::byte* mine = static_cast<std::byte*>(device_dst) + static_cast<std::size_t>(rank_) * sh * pb;
      if (mode_.param_dtype == DType::kBF16) {
        offload::ParamLease lease = take_lease(u, s, next);
        lease.wait();
        for (const auto& piece : lease.pieces()) {
          backend_->copy_to_device_async(mine + static_cast<std::size_t>(piece.begin) * 2, piece.data,
                                         static_cast<std::size_t>(piece.count) * 2, Stream::kHostToDevice);
        }
        backend_->record(Stream::kHostToDevice)->synchronize();
      } else {
        s.in.resize(sh);
        s.m.resize(sh);
        s.v.resize(sh);
        offload_->store().read_state(u, s.in, s.m, s.v);
        backend_->copy_to_device_async(mine, s.in.data(), sh * sizeof(float), Stream::kHostToDevice);
        backend_->record(Stream::kHostToDevice)->synchronize();
      }
      nccl_->all_gather(mine, device_dst, sh, mode_.param_dtype);
      return;
    }
    // A GPU: up on the host-to-device stream, which the caller has ordered after any compute
    // still reading the buffer. bf16 shards not split across ranks go straight from the store
    // (page-locked host memory, or the NVMe staging buffers); anything else is gathered on the
    // host first.
    if (mode_.param_dtype == DType::kBF16 && !mode_.sharded) {
      offload::ParamLease lease = take_lease(u, s, next);
      lease.wait();
      for (const auto& piece : lease.pieces()) {
        backend_->copy_to_device_async(static_cast<std::uint16_t*>(device_dst) + piece.begin, piece.data,
                                       static_cast<std::size_t>(piece.count) * 2, Stream::kHostToDevice);
      }
      backend_->record(Stream::kHostToDevice)->synchronize();
      return;
    }
    s.host.resize(n * kernels::cpu::dtype_bytes(mode_.param_dtype));
    gather_unit_host(u, s.host.data(), comm, s, next);
    backend_->copy_to_device_async(device_dst, s.host.data(), s.host.size(), Stream::kHostToDevice);
    backend_->record(Stream::kHostToDevice)->synchronize();
  }

  // Unit u's bf16 shard from the store: the read-ahead already started for it, or a new fetch;
  // then the read-ahead of `next` when its shard is on NVMe.
  offload::ParamLease take_lease(std::size_t u, GatherScratch& s, std::size_t next) {
    offload::ParamLease lease;
    const bool read_ahead = s.ahead && s.ahead_unit == u;
    if (read_ahead) lease = std::move(*s.ahead);
    // A read-ahead of another unit gives its buffers back before fetch() may wait for them.
    s.ahead.reset();
    s.ahead_unit = ParamCoordinator::kNone;
    if (!read_ahead) lease = offload_->store().fetch(u);
    // The read-ahead only of a unit the step in flight has finished (the store's rule).
    if (next != ParamCoordinator::kNone && offload_->store().param_tier(next) == offload::Tier::kNvme && unit_ready(next)) {
      s.ahead = offload_->store().try_fetch(next);
      if (s.ahead) s.ahead_unit = next;
    }
    return lease;
  }

  void gather_unit_host(std::size_t u, void* dst, Communicator& comm, GatherScratch& s, std::size_t next) {
    const auto n = static_cast<std::size_t>(layout_.units[u].numel);
    const auto sh = static_cast<std::size_t>(mode_.shard[u]);
    if (mode_.param_dtype == DType::kBF16) {
      auto* out = static_cast<std::uint16_t*>(dst);
      offload::ParamLease lease = take_lease(u, s, next);
      if (!mode_.sharded) {
        lease.copy_to(std::span<std::uint16_t>(out, n));
        return;
      }
      const std::size_t words = (sh + 1) / 2;
      s.in.assign(words, 0.0f);
      s.out.resize(words * static_cast<std::size_t>(world_));
      lease.copy_to(std::span<std::uint16_t>(reinterpret_cast<std::uint16_t*>(s.in.data()), sh));
      comm.all_gather(s.in, s.out);
      const auto* src = reinterpret_cast<const std::uint16_t*>(s.out.data());
      for (std::size_t begin = 0, r = 0; begin < n; begin += sh, ++r) {
        std::memcpy(out + begin, src + r * words * 2, std::min(sh, n - begin) * 2);
      }
      return;
    }
    auto* w = static_cast<float*>(dst);
    s.m.resize(sh);
    s.v.resize(sh);
    if (mode_.sharded) {
      s.in.resize(sh);
      s.out.resize(sh * static_cast<std::size_t>(world_));
      offload_->store().read_state(u, s.in, s.m, s.v);
      comm.all_gather(s.in, s.out);
      std::memcpy(w, s.out.data(), n * sizeof(float));
    } else {
      offload_->store().read_state(u, std::span<float>(w, n), s.m, s.v);
    }
    if (fp16_) {
      for (std::size_t i = 0; i < n; ++i) w[i] = kernels::f16_to_f32(kernels::f32_to_f16(w[i]));
    }
  }

  // Stages 2-3: a zeroed fp32 gradient buffer for unit u for this micro-batch's backward (reused
  // from earlier units of the same size).
  void take_grad_buffer(std::size_t u) {
    if (grad_live_[u].data() != nullptr) return;
    // (Padded to W shards with several GPUs in the pipeline: the padding stays zero.)
    const auto bytes = static_cast<std::size_t>(nccl_ ? gather_elements(u) : layout_.units[u].numel) * sizeof(float);
    grad_live_[u] = take_pooled(bytes);
    backend_->fill_zero(grad_live_[u].data(), bytes);
    grad_view_.units[u] = grad_live_[u].data();
  }

  // A device buffer of `bytes` from the gradient pool (or a new one), safe to write on the compute
  // stream.
  DeviceBuffer take_pooled(std::size_t bytes) {
    std::shared_ptr<Backend::Event> busy;
    DeviceBuffer b = take_pooled_for_collective(bytes, busy);
    if (busy) backend_->wait(Stream::kCompute, *busy);  // a buffer still being copied down
    return b;
  }
  // The same, for a writer outside the compute stream: `busy` is the copy-down still reading the
  // buffer, if any, which the writer waits for (as for compute-stream reads: a record() on the
  // compute stream after this call covers them).
  DeviceBuffer take_pooled_for_collective(std::size_t bytes, std::shared_ptr<Backend::Event>& busy) {
    busy.reset();
    auto it = grad_pool_.find(bytes);
    // A pooled buffer whose copy-down has finished; one still being copied is taken only while
    // the pool holds kGradBuffersInFlight of them (compute then waits for its copy), so the
    // next unit's backward does not queue behind the copy of the last one.
    std::vector<PooledGrad>* list = it != grad_pool_.end() && !it->second.empty() ? &it->second : nullptr;
    std::size_t pick = 0;
    if (list != nullptr) {
      while (pick < list->size() && (*list)[pick].free_after && !(*list)[pick].free_after->ready()) ++pick;
      if (pick == list->size()) {
        if (list->size() < kGradBuffersInFlight) {
          list = nullptr;  // all busy: a new buffer
        } else {
          pick = 0;  // the oldest
        }
      }
    }
    if (list == nullptr) return DeviceBuffer(*backend_, bytes);
    DeviceBuffer b = std::move((*list)[pick].buffer);
    if ((*list)[pick].free_after && !(*list)[pick].free_after->ready()) busy = (*list)[pick].free_after;
    list->erase(list->begin() + static_cast<std::ptrdiff_t>(pick));
    return b;
  }

  // This rank's summed gradient shard of unit u (stages 1-3, or the GPU pipeline's page-locked one).
  // (bf16 when the pipeline's gradients travel as bf16: see mode_.grad_dtype.)
  float* gshard(std::size_t u) {
    if (mode_.grads_in_params) return reinterpret_cast<float*>(offload_->store().host_params(u));
    return mode_.pipeline ? gpinned_[u].as<float>() : gshard_[u].data();
  }
  bool have_shards() const { return mode_.pipeline || !gshard_.empty(); }

  // The optimizer step's inputs for this step (the gradient source is the caller's).
  offload::StepInputs step_inputs(double lr, double grad_scale) const {
    offload::StepInputs in;
    const auto& oc = o_.ds.optimizer;
    in.adam.lr = lr;
    in.adam.beta1 = oc.beta1;
    in.adam.beta2 = oc.beta2;
    in.adam.eps = oc.eps;
    in.adam.weight_decay = oc.weight_decay;
    in.adam.adam_w_mode = oc.type == config::OptimizerType::kAdamW || oc.adam_w_mode;
    in.adam.bias_correction = oc.bias_correction;
    in.adam.step = st_.applied + 1;
    in.adam.grad_scale = static_cast<float>(grad_scale);
    in.grad_dtype = mode_.grad_dtype;
    return in;
  }

  // The GPU pipeline's step on its thread: gradients from the feed once their copy has landed; the
  // order is landing order (the head first) except the tail, the last units to be stepped in the
  // previous step, which go in forward order after the embedding; with clipping, forward order
  // (everything waits for the norm). The order changes nothing in the result.
  void start_pipeline_step(double lr, bool clipping) {
    feed_->reset();
    offload::StepInputs in = step_inputs(lr, 1.0);
    in.feed_from(*feed_);
    in.gradient = [this, from_feed = std::move(in.gradient)](std::size_t u) -> const void* {
      const void* g = from_feed(u);
      landed_[u]->synchronize();  // posted when its copy was queued: wait for the copy itself
      return g;
    };
    in.unit_done = [this](std::size_t u) { unit_stepped(u); };
    const std::size_t n = layout_.units.size();
    const std::size_t tail = clipping ? n - 1 : tail_;
    for (std::size_t u = n; u-- > tail + 1;) {
      if (!mode_.on_gpu[u]) in.order.push_back(u);
    }
    for (std::size_t u = 0; u <= tail; ++u) {
      if (!mode_.on_gpu[u]) in.order.push_back(u);
    }
    if (in.order.empty()) return;  // every unit's state is on the GPU: step_gpu_units() does it all
    if (!clipping) feed_->post_grad_scale(static_cast<float>(1.0 / static_cast<double>(gas_ * world_)));
    inflight_.emplace(offload_->stepper(), *feed_, std::move(in), [this](const std::string& why) { fail_units(why); });
  }
  // The GPU's share of the step, once the gradient scale is known: each unit's Adam step on the
  // compute stream (the CPU kernels' arithmetic: the same fp32 state as stepping it on the host,
  // and the same bf16 parameters except that fp32 subnormals are rounded, as the host's exact mode
  // does, where AVX512-BF16 hosts flush them to zero), writing its compute copy in place; the held
  // gradients go back to the pool. The kernels are only queued here: their time shows in the next
  // forward, not in the step's optimizer time.
  void step_gpu_units(double lr, double grad_scale) {
    if (mode_.gpu_units == 0) return;
    const offload::StepInputs in = step_inputs(lr, grad_scale);
    for (std::size_t u = 0; u < mode_.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      kernels::cpu::AdamTensors t;
      float* state = gpu_state_[u].f32();
      t.param = state;
      t.exp_avg = state + n;
      t.exp_avg_sq = state + 2 * n;
      t.state_dtype = DType::kF32;
      t.grad = gpu_grad_[u].data();
      t.grad_dtype = mode_.grad_dtype;
      t.param_out = gpu_param_[u].data();
      t.out_dtype = mode_.param_dtype;
      t.n = n;
      backend_->adam_step(in.adam, t);
      grad_pool_[gpu_grad_[u].bytes()].push_back({std::move(gpu_grad_[u]), nullptr});
      unit_stepped(u);
    }
  }
  // The GPU's units' state from the store (after initialise() or a checkpoint load), and their
  // compute copy as a gather would give it.
  void upload_gpu_state() {
    std::vector<float> st;
    std::vector<std::uint16_t> bf;
    for (std::size_t u = 0; u < mode_.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      st.resize(3 * n);
      offload_->store().read_state(u, std::span<float>(st.data(), n), std::span<float>(st.data() + n, n),
                                   std::span<float>(st.data() + 2 * n, n));
      backend_->upload(gpu_state_[u].data(), st.data(), 3 * n * sizeof(float));
      if (mode_.param_dtype == DType::kBF16) {
        bf.resize(n);
        offload_->store().fetch(u).copy_to(bf);
        backend_->upload(gpu_param_[u].data(), bf.data(), n * 2);
      } else {
        backend_->upload(gpu_param_[u].data(), st.data(), n * sizeof(float));
      }
    }
  }
  // ... and back into the store, which checkpoints read (after the steps queued so far).
  void gpu_state_to_store() {
    std::vector<float> st;
    for (std::size_t u = 0; u < mode_.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(layout_.units[u].numel);
      st.resize(3 * n);
      backend_->download(st.data(), gpu_state_[u].data(), 3 * n * sizeof(float));
      offload_->store().set_state(u, std::span<const float>(st.data(), n), std::span<const float>(st.data() + n, n),
                                  std::span<const float>(st.data() + 2 * n, n));
    }
  }

  // Waits for the step in flight (if any) and returns its statistics; its errors come out here.
  // A step joined outside the training loop's own join (evaluation, checkpoint, end) adds its I/O
  // wait to the next metrics row (joined_io_).
  offload::StepStats finish_inflight() {
    if (!inflight_) return {};
    struct Clear {
      std::optional<OverlappedStep>& s;
      ~Clear() { s.reset(); }
    } clear{inflight_};
    const offload::StepStats ss = inflight_->join();
    joined_io_ += ss.read_wait_seconds + ss.write_wait_seconds;
    return ss;
  }
  void unit_stepped(std::size_t u) {
    std::lock_guard lock(unit_mu_);
    ++unit_steps_[u];
    unit_cv_.notify_all();
  }
  void fail_units(const std::string& why) {
    std::lock_guard lock(unit_mu_);
    if (unit_error_.empty()) unit_error_ = why;
    unit_cv_.notify_all();
  }
  // Whether every step begun before this one has updated unit u (without waiting).
  // (Only the GPU pipeline steps units on another thread; elsewhere every unit is always ready.)
  bool unit_ready(std::size_t u) {
    if (!mode_.pipeline) return true;
    std::lock_guard lock(unit_mu_);
    return unit_steps_.empty() || unit_steps_[u] >= steps_needed_;
  }
  // Before unit u's parameters are read: every step begun before this one has updated them.
  void wait_unit(std::size_t u) {
    if (!mode_.pipeline) return;
    std::unique_lock lock(unit_mu_);
    if (unit_steps_.empty()) return;
    unit_cv_.wait(lock, [&] { return unit_steps_[u] >= steps_needed_ || !unit_error_.empty(); });
    if (unit_steps_[u] < steps_needed_) {
      throw Error("the parameters of {} were not updated: {}", layout_.units[u].name, unit_error_);
    }
  }

  // The GPU pipeline: unit u's gradient is complete on the compute stream. Its sum of squares is
  // computed there; the copy-down stream then brings it into the page-locked shard and the
  // optimizer thread, told now, waits for that copy. The buffer is reused only after the copy.
  // With bf16 gradients (communication_data_type bf16) it is rounded first, and the norm is that
  // of the rounded values, which the optimizer steps with.
  void land_gradient(std::size_t u) {
    const auto n = layout_.units[u].numel;
    if (mode_.on_gpu[u]) {
      // The GPU's share: the gradient stays for step_gpu_units(), rounded first like the others.
      // (With accumulation, gradients are fp32: later micro-batches add theirs to the first's.)
      if (micro_i_ > 0) {
        ZINF_ASSERT(mode_.grad_dtype == DType::kF32, "accumulated GPU-share gradients must be fp32");
        backend_->add(gpu_grad_[u].f32(), grad_live_[u].f32(), n);
        grad_pool_[grad_live_[u].bytes()].push_back({std::move(grad_live_[u]), nullptr});  // compute-ordered
      } else if (mode_.grad_dtype == DType::kBF16) {
        gpu_grad_[u] = take_pooled(static_cast<std::size_t>(n) * 2);
        backend_->round_to_bf16(static_cast<std::uint16_t*>(gpu_grad_[u].data()), grad_live_[u].f32(), n);
        grad_pool_[grad_live_[u].bytes()].push_back({std::move(grad_live_[u]), nullptr});  // compute-ordered
      } else {
        gpu_grad_[u] = std::move(grad_live_[u]);
      }
      if (micro_i_ == gas_ - 1) backend_->sum_squares(static_cast<double*>(unit_sq_->data()) + u, gpu_grad_[u].data(), n, mode_.grad_dtype);
      grad_view_.units[u] = nullptr;
      return;
    }
    if (nccl_) {
      post_reduction(u);
      return;
    }
    land_shard(u, n);
  }

  // Several GPUs: unit u's gradient (its padded buffer: W equal shards) is summed over the ranks
  // into this rank's shard by a reduce-scatter, which the gather thread runs in schedule order
  // once the unit's backward is done on the GPU. The compute thread goes on with the next unit;
  // finished reductions land in order (land_shard) as it passes here, at most
  // kReductionsInFlight behind, and all of them after the last unit.
  void post_reduction(std::size_t u) {
    const auto count = static_cast<std::size_t>(mode_.shard[u]);
    Reduction r;
    r.unit = u;
    r.full = std::move(grad_live_[u]);
    grad_view_.units[u] = nullptr;
    std::shared_ptr<Backend::Event> shard_busy;
    r.shard = take_pooled_for_collective(count * sizeof(float), shard_busy);
    r.ticket = std::make_shared<ReduceTicket>();
    // The unit's backward, and every compute-stream read of the shard buffer queued before it.
    std::shared_ptr<Backend::Event> computed = backend_->record(Stream::kCompute);
    coord_->post([c = nccl_.get(), t = r.ticket, computed, shard_busy, in = r.full.data(), out = r.shard.data(), count,
                  name = layout_.units[u].name](const std::exception_ptr& failed) {
      std::string error;
      try {
        if (failed) std::rethrow_exception(failed);  // a gather before it failed: its reason
        computed->synchronize();
        if (shard_busy) shard_busy->synchronize();  // its last copy-down
        c->reduce_scatter_sum(in, out, count, DType::kF32);
      } catch (const std::exception& e) {
        error = fmt::format("reduce-scatter of {}'s gradient: {}", name, e.what());
      } catch (...) {
        error = fmt::format("reduce-scatter of {}'s gradient failed", name);
      }
      t->finish(std::move(error));
    });
    reducing_.push_back(std::move(r));
    while (!reducing_.empty() && (reducing_.front().ticket->done() || reducing_.size() > kReductionsInFlight || u == 0)) {
      finish_reduction();
    }
  }
  // The oldest reduction posted: waits for it, then lands this rank's shard.
  void finish_reduction() {
    Reduction r = std::move(reducing_.front());
    reducing_.pop_front();
    const std::string error = r.ticket->wait();
    if (!error.empty()) throw Error("rank {}: {}", rank_, error);
    grad_pool_[r.full.bytes()].push_back({std::move(r.full), nullptr});  // the collective has read it
    grad_live_[r.unit] = std::move(r.shard);
    land_shard(r.unit, mode_.shard[r.unit]);
  }
  // Unit u's gradient (`count` elements in grad_live_[u]: the unit, or this rank's summed shard)
  // comes down: rounded to bf16 first when gradients travel as bf16; its sum of squares computed
  // on the compute stream; the copy on the copy-down stream; the optimizer thread told.
  // With gradient accumulation (fp32 gradients), a micro-batch after the first adds the sum so
  // far (uploaded while its backward ran: upload_sum) to its own; every micro-batch but the last
  // only copies its sum down. Each sum is (earlier + this) in fp32, the synchronous path's sum in
  // its order, so the two step the same gradients bit for bit.
  void land_shard(std::size_t u, std::int64_t count) {
    std::size_t bytes = static_cast<std::size_t>(count) * sizeof(float);
    if (micro_i_ > 0) {
      Uploaded up = std::move(sum_up_[u]);
      ZINF_ASSERT(up.landed != nullptr, "no sum of the earlier micro-batches was uploaded for unit {}", u);
      backend_->wait(Stream::kCompute, *up.landed);
      backend_->add(grad_live_[u].f32(), up.buffer.f32(), count);
      sum_pool_[bytes].push_back({std::move(up.buffer), backend_->record(Stream::kCompute)});
    }
    if (micro_i_ < gas_ - 1) {
      backend_->wait(Stream::kDeviceToHost, *backend_->record(Stream::kCompute));
      backend_->copy_to_host_async(gshard(u), grad_live_[u].data(), bytes, Stream::kDeviceToHost);
      landed_[u] = backend_->record(Stream::kDeviceToHost);
      grad_pool_[grad_live_[u].bytes()].push_back({std::move(grad_live_[u]), landed_[u]});
      grad_view_.units[u] = nullptr;
      return;
    }
    const void* g = grad_live_[u].data();
    DeviceBuffer rounded;
    if (mode_.grad_dtype == DType::kBF16) {
      bytes = static_cast<std::size_t>(count) * 2;
      rounded = take_pooled(bytes);
      backend_->round_to_bf16(static_cast<std::uint16_t*>(rounded.data()), grad_live_[u].f32(), count);
      g = rounded.data();
    }
    backend_->sum_squares(static_cast<double*>(unit_sq_->data()) + u, g, count, mode_.grad_dtype);
    backend_->wait(Stream::kDeviceToHost, *backend_->record(Stream::kCompute));
    backend_->copy_to_host_async(gshard(u), g, bytes, Stream::kDeviceToHost);
    landed_[u] = backend_->record(Stream::kDeviceToHost);
    feed_->post_gradient(u, gshard(u));
    // The copy-down reads the bf16 copy when there is one: the fp32 buffer is free for the next
    // unit at once (the rounding that read it is on the compute stream, where it is reused).
    const bool rounded_copy = rounded.data() != nullptr;
    grad_pool_[grad_live_[u].bytes()].push_back({std::move(grad_live_[u]), rounded_copy ? nullptr : landed_[u]});
    if (rounded_copy) grad_pool_[rounded.bytes()].push_back({std::move(rounded), landed_[u]});
    grad_view_.units[u] = nullptr;
  }

  // Gradient accumulation in the pipeline: the page-locked sum of unit u's gradients over the
  // earlier micro-batches goes up on the upload stream as unit u's backward starts, after its
  // copy down, into a buffer of sum_pool_ whose last add (on the compute stream) is done: two per
  // size, so the stream never waits for work queued after the add it needs.
  std::size_t sum_bytes(std::size_t u) const {
    return static_cast<std::size_t>(nccl_ ? mode_.shard[u] : layout_.units[u].numel) * sizeof(float);
  }
  void upload_sum(std::size_t u) {
    const std::size_t bytes = sum_bytes(u);
    auto& list = sum_pool_[bytes];
    std::size_t pick = 0;
    while (pick < list.size() && !list[pick].free_after->ready()) ++pick;
    Uploaded up;
    if (pick == list.size() && list.size() < sum_limit_.at(bytes)) {
      up.buffer = DeviceBuffer(*backend_, bytes);
    } else {
      if (pick == list.size()) pick = 0;  // the oldest
      backend_->wait(Stream::kHostToDevice, *list[pick].free_after);
      up.buffer = std::move(list[pick].buffer);
      list.erase(list.begin() + static_cast<std::ptrdiff_t>(pick));
    }
    backend_->wait(Stream::kHostToDevice, *landed_[u]);
    backend_->copy_to_device_async(up.buffer.data(), gshard(u), bytes, Stream::kHostToDevice);
    up.landed = backend_->record(Stream::kHostToDevice);
    sum_up_[u] = std::move(up);
  }

  // Stages 0-1: unit u's accumulated gradient in host memory (downloaded from a GPU backend by
  // gradients_to_host()).
  float* host_grad(std::size_t u) {
    return host_backend_ ? static_cast<float*>(full_grads_->view().units[u]) : grad_host_[u].data();
  }
  void gradients_to_host() {
    if (host_backend_ || !full_grads_) return;
    grad_host_.resize(layout_.units.size());
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      grad_host_[u].resize(static_cast<std::size_t>(layout_.units[u].numel));
      backend_->download(grad_host_[u].data(), full_grads_->view().units[u], grad_host_[u].size() * sizeof(float));
    }
  }
  // Stages 2-3: a bucket unit's gradient of this micro-batch in host memory (downloaded once per
  // flush from a GPU backend).
  const float* bucket_grad(std::size_t u) {
    if (host_backend_) return grad_live_[u].f32();
    auto& h = grad_dl_[u];
    if (h.size() != static_cast<std::size_t>(layout_.units[u].numel)) {
      h.resize(static_cast<std::size_t>(layout_.units[u].numel));
      backend_->download(h.data(), grad_live_[u].data(), h.size() * sizeof(float));
    }
    return h.data();
  }

  // Unit u's gradient of this micro-batch is complete: into the reduction bucket, which is
  // reduce-scattered once it holds reduce_bucket_size elements.
  void gradient_ready(std::size_t u) {
    bucket_.push_back(u);
    bucket_elems_ += mode_.shard[u] * world_;
    if (bucket_elems_ >= o_.ds.zero.reduce_bucket_size) flush_gradient_bucket();
  }

  // Sums the bucket's gradients over ranks into each rank's shards (gshard_, accumulated over
  // micro-batches). The send buffer is laid out rank-major (every unit's shard r, then shard r+1)
  // so that one reduce-scatter hands each rank its shard of every unit in the bucket.
  void flush_gradient_bucket() {
    if (bucket_.empty()) return;
    if (world_ == 1) {
      for (const std::size_t u : bucket_) kernels::cpu::add_inplace(gshard_[u].data(), bucket_grad(u), layout_.units[u].numel);
    } else {
      std::int64_t total = 0;
      for (const std::size_t u : bucket_) total += mode_.shard[u];
      send_.resize(static_cast<std::size_t>(total * world_));
      recv_.resize(static_cast<std::size_t>(total));
      for (int r = 0; r < world_; ++r) {
        float* out = send_.data() + static_cast<std::size_t>(r) * static_cast<std::size_t>(total);
        for (const std::size_t u : bucket_) {
          const std::int64_t sh = mode_.shard[u], n = layout_.units[u].numel, begin = r * sh;
          const std::int64_t count = std::clamp<std::int64_t>(n - begin, 0, sh);
          if (count > 0) std::memcpy(out, bucket_grad(u) + begin, static_cast<std::size_t>(count) * sizeof(float));
          std::fill(out + std::max<std::int64_t>(count, 0), out + sh, 0.0f);
          out += sh;
        }
      }
      comm_->reduce_scatter_sum(send_, recv_);
      const float* in = recv_.data();
      for (const std::size_t u : bucket_) {
        kernels::cpu::add_inplace(gshard_[u].data(), in, mode_.shard[u]);
        in += mode_.shard[u];
      }
    }
    for (const std::size_t u : bucket_) {
      grad_pool_[grad_live_[u].bytes()].push_back({std::move(grad_live_[u]), nullptr});
      grad_view_.units[u] = nullptr;
      if (!host_backend_) grad_dl_[u].clear();  // the next micro-batch downloads afresh
    }
    ++buckets_reduced_;
    bucket_.clear();
    bucket_elems_ = 0;
  }

  // The parameter coordinator's counters for the step just done (stages 0-2: every parameter is
  // gathered all the time), folded into the run's totals.
  CoordinatorStats step_param_stats() {
    CoordinatorStats s;
    if (mode_.stage3) {
      s = coord_->take_stats();
    } else {
      s.live_high_water = layout_.total_numel();
      s.persistent_elements = layout_.total_numel();
    }
    CoordinatorStats& t = run_param_stats_;
    t.live_high_water = std::max(t.live_high_water, s.live_high_water);
    t.ahead_high_water = std::max(t.ahead_high_water, s.ahead_high_water);
    t.persistent_elements = s.persistent_elements;
    t.adopted_elements = s.adopted_elements;
    t.hits += s.hits;
    t.misses += s.misses;
    t.gathers += s.gathers;
    t.gathered_elements += s.gathered_elements;
    t.wait_seconds += s.wait_seconds;
    return s;
  }

  // The first eval_max_batches micro-batches' worth of held-out samples. Fixed when the run starts
  // and kept in checkpoints, so a run resumed with another micro-batch evaluates the same samples.
  std::uint64_t default_eval_samples() const {
    return std::min<std::uint64_t>(sampler_.eval_samples(), static_cast<std::uint64_t>(micro_) *
                                                                static_cast<std::uint64_t>(std::max<std::int64_t>(1, o_.eval_max_batches)));
  }

  double evaluate() {
    finish_inflight();  // the GPU pipeline's step in flight completes first
    const std::uint64_t n = std::min<std::uint64_t>(st_.eval_samples, sampler_.eval_samples());
    if (n == 0) return std::nan("");
    const auto per_batch = static_cast<std::uint64_t>(micro_);
    const std::uint64_t batches = (n + per_batch - 1) / per_batch;
    double sum = 0;
    std::int64_t counted = 0;
    for (std::uint64_t b = 0; b < batches; ++b) {
      const std::uint64_t first = b * per_batch;
      const auto count = static_cast<std::int64_t>(std::min(per_batch, n - first));
      for (std::int64_t i = 0; i < count; ++i) {
        sampler_.eval_sample(first + i, std::span(tokens_).subspan(i * o_.seq_len, o_.seq_len),
                             std::span(targets_).subspan(i * o_.seq_len, o_.seq_len));
      }
      model_.set_batch(std::span(tokens_).first(count * o_.seq_len), std::span(targets_).first(count * o_.seq_len),
                       count, o_.seq_len);
      if (mode_.lora) bind_lora(0, false);  // no dropout
      float loss = 0;
      if (mode_.stage3) {
        coord_->begin(ParamCoordinator::forward_schedule(layout_.units.size(),
                                                         [this](std::size_t u) { return model_.unit_reads(u); }));
        for (std::size_t u = 0; u < layout_.units.size(); ++u) {
          model_.forward_unit(u, coord_->acquire(u));
          coord_->release(u);
        }
        coord_->end();
        loss = model_.loss();
      } else {
        loss = model_.forward(params_->view());
      }
      sum += static_cast<double>(loss) * count;
      counted += count;
    }
    return sum / static_cast<double>(counted);
  }

  std::string save_checkpoint() {
    finish_inflight();  // the GPU pipeline's step in flight completes first
    gpu_state_to_store();  // and the GPU's share of the state is copied into the store
    CheckpointSave save;
    save.output_dir = o_.output_dir;
    save.step = st_.step;
    save.keep_last = o_.keep_last;
    // (A LoRA run's state is the adapters', the same on every rank: rank 0 writes it.)
    save.shards = mode_.sharded && !mode_.lora ? world_ : 1;
    save.manifest = [this] { return manifest(); };
    StateSource state;
    std::vector<float> lora_all;
    if (mode_.lora) {
      // The adapters' master, exp_avg and exp_avg_sq, one flat tensor each ("lora.master", ...);
      // also in PEFT's format, so the checkpoint directory loads as a PEFT adapter.
      lora_all = lora_state();
      const std::size_t n = lora_numel();
      state.entries.emplace_back("lora", n);
      state.read = [&lora_all, n](std::size_t, std::span<float> m, std::span<float> a, std::span<float> v) {
        std::copy_n(lora_all.data(), n, m.data());
        std::copy_n(lora_all.data() + n, n, a.data());
        std::copy_n(lora_all.data() + 2 * n, n, v.data());
      };
      save.extra_files = [this, &lora_all](const std::string& dir) {
        save_adapter(dir, model_.lora(), std::span<const float>(lora_all.data(), lora_numel()), base_source());
      };
    } else {
      for (std::size_t u = 0; u < layout_.units.size(); ++u) {
        state.entries.emplace_back(layout_.units[u].name, static_cast<std::size_t>(mode_.shard[u]));
      }
      state.read = [this](std::size_t u, std::span<float> m, std::span<float> a, std::span<float> v) {
        offload_->store().read_state(u, m, a, v);
      };
    }
    return runtime::save_checkpoint(*comm_, save, state);
  }

  // trainer_state.json of a checkpoint at this step.
  CheckpointManifest manifest() {
    CheckpointManifest m;
    m.step = st_.step;
    m.applied_steps = st_.applied;
    st_.data = sampler_.position();
    m.data = st_.data;
    m.data_source = o_.data->name();
    m.data_tokens = o_.data->size();
    m.seq_len = o_.seq_len;
    m.eval_fraction = o_.eval_fraction;
    m.micro = micro_;
    m.grad_accum = gas_;
    m.precision = precision();
    m.param_dtype = kernels::cpu::dtype_name(mode_.param_dtype);
    m.seed = st_.seed;
    m.eval_samples = st_.eval_samples;
    m.tokens_seen = st_.tokens;
    m.first_loss = st_.first_loss;
    if (st_.have_eval) m.best_eval_loss = st_.best_eval;
    m.loss_scaler_enabled = fp16_;
    m.loss_scaler = scaler_.state();
    m.model = model_config_json(o_.model);
    for (const auto& u : layout_.units) m.units.emplace_back(u.name, u.numel);
    m.world_size = world_;
    m.zero_stage = o_.ds.zero.stage;
    if (mode_.lora) {
      m.lora = lora_json();
      m.lora["numel"] = model_.lora().numel;
    }
    return m;
  }
  std::string precision() const { return fp16_ ? "fp16" : kernels::cpu::dtype_name(mode_.param_dtype); }

  void load_checkpoint(const std::string& dir) {
    const CheckpointReader ck(dir, 0);
    ck.check_layout(layout_, o_.model);
    check_resumable(ck, {o_.seq_len, o_.data->name(), o_.data->size(), o_.eval_fraction, micro_, gas_, world_,
                         precision(), mode_.lora});
    const CheckpointManifest& m = ck.manifest();
    st_.step = m.step;
    st_.applied = m.applied_steps;
    if (fp16_ && m.loss_scaler_enabled) scaler_.set_state(m.loss_scaler);
    st_.data = m.data;
    st_.seed = m.seed;
    st_.eval_samples = m.eval_samples.value_or(default_eval_samples());
    st_.tokens = m.tokens_seen;
    st_.first_loss = m.first_loss;
    st_.have_eval = m.best_eval_loss.has_value();
    st_.best_eval = m.best_eval_loss.value_or(0.0);
    if (st_.seed != o_.seed) {
      spdlog::warn("the checkpoint was trained with --seed {}; continuing its sample order (not --seed {})", st_.seed,
                   o_.seed);
    }
    // The data order is the checkpoint's seed's.
    sampler_ = Sampler(*o_.data, o_.seq_len, st_.seed, o_.eval_fraction);
    sampler_.set_position(st_.data);
    if (mode_.lora) {
      load_lora_checkpoint(dir, ck);
    } else {
      read_state(ck, layout_, mode_.shard, mode_.sharded ? world_ : 1, mode_.sharded ? rank_ : 0,
                 [this](std::size_t u, std::span<const float> master, std::span<const float> a, std::span<const float> v) {
                   offload_->store().set_state(u, master, a, v);
                 });
    }
    spdlog::info("resumed from {} at step {}", dir, st_.step);
  }

  // A LoRA checkpoint: the same adapters' shape and options, the same base (read again here), and
  // the adapters' state.
  void load_lora_checkpoint(const std::string& dir, const CheckpointReader& ck) {
    const LoraLayout& l = model_.lora();
    std::string fingerprint;
    try {
      const Json& j = ck.manifest().lora;
      LoraConfig c;
      c.rank = j.at("rank").get<std::int64_t>();
      c.alpha = j.at("alpha").get<double>();
      c.dropout = j.at("dropout").get<double>();
      c.targets = parse_lora_targets(j.at("targets").get<std::string>());
      c.rslora = j.at("rslora").get<bool>();
      if (c != l.config) {
        throw Error("checkpoint '{}' trains LoRA adapters of {}, this run asks for {}: resume with the same --lora-* "
                    "options",
                    dir, c.describe(), l.config.describe());
      }
      fingerprint = j.at("base").at("fingerprint").get<std::string>();
      if (fingerprint.empty()) throw Error("{}/{}: the base's fingerprint is empty", dir, kTrainerStateFile);
    } catch (const Json::exception& e) {
      throw Error("{}/{} is damaged: {}", dir, kTrainerStateFile, e.what());
    }
    load_base();
    if (hex64(base_fingerprint()) != fingerprint) {
      throw Error("checkpoint '{}' holds adapters trained on another base model ({}) than this run's ({}): resume with "
                  "the base they were trained on (--init, or the same --seed for a seeded one)",
                  dir, ck.manifest().lora.at("base").value("source", std::string("?")), base_source());
    }
    const std::size_t n = lora_numel();
    set_lora_state(ck.tensor("lora", "master", n), ck.tensor("lora", "exp_avg", n), ck.tensor("lora", "exp_avg_sq", n));
  }

  std::int64_t largest_unit() const {
    std::int64_t m = 0;
    for (const auto& u : layout_.units) m = std::max(m, u.numel);
    return m;
  }

  void log_start() {
    const ModelLayout& l = layout_;
    spdlog::info("model {}: {} parameters, {} layers, hidden {}, vocab {}; {} training", o_.model_source,
                 l.parameter_count(), o_.model.num_layers, o_.model.hidden_size, o_.model.vocab_size,
                 mode_.param_dtype == DType::kBF16 ? "bf16 mixed-precision"
                 : fp16_                      ? fmt::format("fp16 (fp16 weights, fp32 products; loss scale {})", scaler_.scale())
                                              : std::string("fp32"));
    spdlog::info("data {}: {} tokens, {} training and {} held-out samples of {} tokens", o_.data->name(),
                 o_.data->size(), sampler_.train_samples(), sampler_.eval_samples(), o_.seq_len);
    spdlog::info("{} steps of {} x {} micro-batches on {} rank(s) ({} tokens per step); {}", total_steps_, micro_, gas_,
                 world_, micro_ * gas_ * world_ * o_.seq_len, offload_->store().describe());
    if (mode_.lora) {
      const LoraLayout& ll = model_.lora();
      spdlog::info("LoRA {}: {} adapted linears, {} trainable parameters ({:.3f}% of the frozen base, which is held in "
                   "bf16 with no gradients or optimizer state); the adapters' Adam state on the {}",
                   ll.config.describe(), ll.adapters.size(), ll.parameter_count(),
                   100.0 * static_cast<double>(ll.parameter_count()) / static_cast<double>(layout_.parameter_count()),
                   lora_offload_ || host_backend_ ? std::string("host") : backend_->name());
    }
    const auto& z = o_.ds.zero;
    if (mode_.stage3) {
      spdlog::info("ZeRO stage 3 over {} rank(s): parameters gathered per use, at most {} live (+ the unit in use), "
                   "prefetch {} ahead, reuse distance {}, {} elements persistent; gradients reduced in buckets of {}",
                   world_, z.max_live_parameters, z.prefetch_bucket_size, z.max_reuse_distance,
                   coord_->take_stats().persistent_elements, z.reduce_bucket_size);
    } else {
      spdlog::info("ZeRO stage {} over {} rank(s){}", stage_, world_,
                   mode_.partition_grads ? fmt::format("; gradients reduced in buckets of {}", z.reduce_bucket_size) : "");
    }
  }

  // Rank 0: the step's line for the caller (TrainOptions::on_progress), and its phases in the log
  // with wall_clock_breakdown.
  void progress(double loss, double eval_loss, double lr, double tps, Clock::time_point start, std::int64_t first_step,
                const PhaseTimes& tm, double norm, bool stopped) {
    if (o_.on_progress) {
      StepProgress p;
      p.step = st_.step;
      p.total_steps = total_steps_;
      p.loss = loss;
      p.eval_loss = eval_loss;
      p.lr = lr;
      p.tokens_per_s = tps;
      p.eta_s = seconds_since(start) / static_cast<double>(st_.step - first_step) * static_cast<double>(total_steps_ - st_.step);
      p.milestone = !std::isnan(eval_loss) ||
                    (o_.ds.steps_per_print.has_value() && *o_.ds.steps_per_print > 0 && st_.step % *o_.ds.steps_per_print == 0);
      p.last = stopped || st_.step == total_steps_;
      o_.on_progress(p);
    }
    if (o_.ds.wall_clock_breakdown) {
      spdlog::info("step {}: data {:.3f}s forward {:.3f}s backward {:.3f}s optimizer {:.3f}s (offload I/O wait {:.3f}s) "
                   "grad norm {:.4f}",
                   st_.step, tm.data, tm.forward, tm.backward, tm.optimizer, tm.offload_io, norm);
    }
  }
  std::uint64_t nvme_bytes() const {
    return offload_->store().nvme_state_elements() * 12 + offload_->store().nvme_param_elements() * 2;
  }

  void write_summary(const TrainResult& r, double wall, std::int64_t first_step) {
    Json j;
    j["model"] = {{"source", o_.model_source},
                  {"config", model_config_json(o_.model)},
                  {"parameters", layout_.parameter_count()},
                  {"param_dtype", kernels::cpu::dtype_name(mode_.param_dtype)}};
    j["data"] = {{"source", o_.data->name()}, {"tokens", o_.data->size()}, {"seq_len", o_.seq_len},
                 {"train_samples", sampler_.train_samples()}, {"eval_samples", sampler_.eval_samples()}};
    j["steps"] = r.steps;
    j["steps_this_run"] = r.steps - first_step;
    j["stopped_early"] = r.stopped_early;
    j["tokens_seen"] = st_.tokens;
    j["first_loss"] = r.first_loss;
    j["final_loss"] = r.final_loss;
    j["final_eval_loss"] = std::isnan(r.final_eval_loss) ? Json(nullptr) : Json(r.final_eval_loss);
    j["best_eval_loss"] = std::isnan(r.best_eval_loss) ? Json(nullptr) : Json(r.best_eval_loss);
    const double tokens_run = static_cast<double>((r.steps - first_step) * micro_ * gas_ * world_ * o_.seq_len);
    j["throughput"] = {{"tokens_per_s", wall > 0 ? tokens_run / wall : 0.0},
                       {"model_tflops", wall > 0 ? tokens_run * model_flops_per_token() / wall / 1e12 : 0.0}};
    j["peak_memory_bytes"] = {{"gpu", backend_->memory_peak()}, {"host_pinned", offload_->memory().used()}, {"nvme", nvme_bytes()}};
    const CoordinatorStats& ps = run_param_stats_;
    const auto& z = o_.ds.zero;
    j["zero"] = {{"stage", stage_},
                 {"world_size", world_},
                 {"reduce_bucket_size", z.reduce_bucket_size},
                 {"gradient_buckets_reduced", buckets_reduced_},
                 {"max_live_parameters", z.max_live_parameters},
                 {"prefetch_bucket_size", z.prefetch_bucket_size},
                 {"max_reuse_distance", z.max_reuse_distance},
                 {"param_persistence_threshold", z.param_persistence_threshold},
                 {"live_params_high_water", ps.live_high_water},
                 {"prefetch_ahead_high_water", ps.ahead_high_water},
                 {"persistent_params", ps.persistent_elements},
                 {"gpu_resident_params", ps.adopted_elements},
                 {"largest_unit", largest_unit()},
                 {"prefetch_hits", ps.hits},
                 {"prefetch_misses", ps.misses},
                 {"param_gathers", ps.gathers},
                 {"param_gathered_elements", ps.gathered_elements},
                 {"param_wait_seconds", ps.wait_seconds}};
    j["wall_seconds"] = wall;
    j["backend"] = backend_->name();
    if (!host_backend_) {
      j["gpu_memory"] = {{"limit_bytes", backend_->memory_limit()},
                         {"planned_bytes", gpu_plan_.total()},
                         {"peak_bytes", backend_->memory_peak()},
                         {"planned", {{"parameters", gpu_plan_.params},
                                      {"gradient_buffers", gpu_plan_.grads},
                                      {"activations", gpu_plan_.activations},
                                      {"scratch", gpu_plan_.scratch},
                                      {"optimizer_share", gpu_plan_.optimizer},
                                      {"lora_adapters", gpu_plan_.adapters},
                                      {"other", gpu_plan_.other}}}};
    }
    // The one-GPU overlapped step (docs/gpu.md), and the dtype its gradients travel in.
    j["gpu_pipeline"] = {{"enabled", mode_.pipeline},
                         {"gradient_dtype", mode_.pipeline ? kernels::cpu::dtype_name(mode_.grad_dtype) : "fp32"},
                         {"gradients_in_parameter_shards", mode_.grads_in_params},
                         {"gpu_optimizer_units", mode_.gpu_units},
                         {"gpu_optimizer_elements", mode_.gpu_elements},
                         {"gpus", mode_.pipeline ? world_ : 1},
                         {"gpu_collectives", nccl_ ? "nccl" : "none"}};
    if (mode_.lora) {
      const LoraLayout& l = model_.lora();
      j["lora"] = lora_json();
      j["lora"]["adapted_linears"] = l.adapters.size();
      j["lora"]["trainable_parameters"] = l.parameter_count();
      j["lora"]["optimizer_state"] = lora_offload_ || host_backend_ ? "host" : "gpu";
      j["lora"]["base"]["verified_unchanged"] = true;
    }
    j["last_checkpoint"] = r.last_checkpoint;
    j["deepspeed_config"] = o_.ds_resolved;
    write_file_atomic((fs::path(o_.output_dir) / "summary.json").string(), j.dump(2) + "\n");
  }

  const TrainOptions& o_;
  std::unique_ptr<Communicator> owned_comm_;
  Communicator* comm_ = nullptr;
  RunMode mode_;  // every mode decision (run_mode.hpp)
  std::unique_ptr<Backend> backend_;
  Model model_;
  const ModelLayout& layout_;
  std::optional<UnitStorage> params_;      // stages 0-2: the whole compute copy
  std::optional<UnitStorage> full_grads_;  // stages 0-1: whole accumulated gradients
  Sampler sampler_;
  LrSchedule schedule_;
  LossScaler scaler_;
  bool fp16_ = false;
  tbb::task_arena arena_;
  int world_ = 1, rank_ = 0;
  int stage_ = 0;
  std::vector<std::vector<float>> gshard_;  // this rank's summed gradient shards
  std::vector<float> padded_, send_, recv_;  // reused every step
  bool host_backend_ = true;                 // the backend's memory is host memory (CPU)
  std::vector<std::vector<float>> grad_host_, grad_dl_;  // GPU backend: gradients brought down
  GatherScratch main_scratch_, worker_scratch_;
  UnitBuffers grad_view_;                  // stages 2-3: the gradient buffers of the units in backward
  std::vector<DeviceBuffer> grad_live_;
  // (kGradBuffersInFlight and kReductionsInFlight: gpu_buffers.hpp, shared with the GPU plan.)
  struct PooledGrad {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> free_after;  // the copy-down still reading it
  };
  std::map<std::size_t, std::vector<PooledGrad>> grad_pool_;
  // Gradient accumulation in the pipeline: the sums uploaded for the next add (upload_sum()), and
  // their buffers, each free after the add that read it.
  struct Uploaded {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> landed;
  };
  std::vector<Uploaded> sum_up_;
  std::map<std::size_t, std::vector<PooledGrad>> sum_pool_;
  std::map<std::size_t, std::size_t> sum_limit_;  // buffers per size: kSumBuffers, or its unit count if fewer
  std::int64_t micro_i_ = 0;  // the micro-batch of the step being computed (0 to gas_ - 1)
  // Several GPUs in the pipeline: NCCL, for the all-gathers of parameters and the reduce-scatters
  // of gradients, all issued by the coordinator's gather thread in schedule order (post()), so
  // every rank issues them in the same order (NCCL's rule) and none waits on another's.
  std::unique_ptr<DeviceCollectives> nccl_;
  // Reduce-scatters posted and not yet landed, oldest first (see post_reduction).
  struct Reduction {
    std::size_t unit = 0;
    DeviceBuffer full, shard;
    std::shared_ptr<ReduceTicket> ticket;
  };
  std::deque<Reduction> reducing_;
  std::vector<offload::HostBuffer> gpinned_;              // page-locked gradient shards
  std::unique_ptr<offload::StepFeed> feed_;
  std::vector<std::shared_ptr<Backend::Event>> landed_;  // unit u's gradient is in gpinned_[u]
  std::optional<DeviceBuffer> unit_sq_;                  // per-unit sums of squares (doubles)
  // The GPU's share of the optimizer (offload_optimizer.ratio < 1 with device cpu): units 0 to
  // mode_.gpu_units - 1.
  std::vector<DeviceBuffer> gpu_state_;  // [master | exp_avg | exp_avg_sq], fp32
  std::vector<DeviceBuffer> gpu_param_;  // the compute copy (adopted by the coordinator)
  std::vector<DeviceBuffer> gpu_grad_;   // the step's gradient, held until the norm is known
  // Optimizer steps applied to each unit's parameters, and how many the current step's gathers
  // need (stage 3: the next forward overlaps the end of a step).
  std::mutex unit_mu_;
  std::condition_variable unit_cv_;
  std::vector<std::int64_t> unit_steps_;
  std::int64_t steps_needed_ = 0;
  std::string unit_error_;
  std::size_t tail_ = 0;                    // see start_pipeline_step
  std::optional<OverlappedStep> inflight_;  // the GPU pipeline's step still running
  GpuPlan gpu_plan_;
  double joined_io_ = 0;  // see finish_inflight
  std::vector<std::size_t> bucket_;
  std::int64_t bucket_elems_ = 0;
  std::uint64_t buckets_reduced_ = 0;
  CoordinatorStats run_param_stats_;
  std::unique_ptr<offload::Offload> offload_;
  std::int64_t micro_ = 1, gas_ = 1, steps_per_epoch_ = 1, total_steps_ = 1;
  std::vector<std::int32_t> tokens_, targets_;
  TrainerState st_;
  // LoRA (see TrainOptions::lora and setup_lora()).
  bool lora_offload_ = false;           // the adapters' optimizer state in host memory
  DeviceBuffer lora_params_, lora_grads_, lora_moments_, lora_sq_;
  std::vector<float> lora_host_;        // lora_offload_: [master | exp_avg | exp_avg_sq]
  std::vector<float> lora_grad_host_;   // the gradients brought down (reduction, host step)
  UnitBuffers frozen_grads_;            // no units: the base has no gradients
  std::vector<std::uint64_t> base_unit_hash_, base_shard_hash_;  // the base as loaded (verify_base())
  std::unique_ptr<Communicator> gather_comm_;  // stage 3: the prefetch thread's channel
  std::unique_ptr<ParamCoordinator> coord_;    // last: its thread uses the members above
};

}  // namespace

TrainResult train(const TrainOptions& options) {
  if (options.data == nullptr) throw Error("train: no data");
  Trainer t(options);
  return t.run();
}

}  // namespace zinf::runtime
