// The training loop (see trainer.hpp): the components built once from the run's mode
// (run_mode.hpp), then a resume or a fresh start, then train_step() after train_step(), with
// evaluations, metrics, stop agreement and checkpoints between them. Each component has its own
// file: the gradient path (gradient_path.hpp: synchronous, GPU pipeline, LoRA), parameter
// gathering (param_gather.hpp), checkpoints (checkpoint.hpp), metrics (metrics.hpp), the GPU
// memory plan (gpu_memory_plan.hpp); the optimizer state lives in the offload module's partition
// store (host memory or NVMe, per the config).
#include "zinf/runtime/trainer.hpp"

#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "zinf/runtime/loss_scaler.hpp"
#include "zinf/runtime/lr_schedule.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/nccl_comm.hpp"
#include "zinf/runtime/run_mode.hpp"
#include "zinf/runtime/weights.hpp"
#include "gpu_memory_plan.hpp"
#include "gradient_path.hpp"
#include "metrics.hpp"
#include "param_gather.hpp"
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

CudaBackendOptions cuda_options(const TrainOptions& o) {
  CudaBackendOptions c;
  c.device = o.gpu;
  c.memory_limit = static_cast<std::size_t>(o.gpu_memory_limit);
  return c;
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
        arena_(tbb::task_arena::automatic),  // the cores this process may use (zinf launch divides them)
        world_(comm_->size()),
        rank_(comm_->rank()),
        micro_(o.ds.batch.micro),
        gas_(o.ds.batch.gas) {
    const auto type = o.ds.optimizer.type;
    if (type != config::OptimizerType::kAdamW && type != config::OptimizerType::kAdam) {
      throw Error("optimizer '{}' is not available in the trainer yet: use Adam or AdamW", o.ds.optimizer.type_name);
    }
    if (o.data->max_token() >= static_cast<std::uint32_t>(o.model.vocab_size)) {
      throw Error("data '{}' holds token {} but the model's vocabulary has {} entries (tokenized for another model?)",
                  o.data->name(), o.data->max_token(), o.model.vocab_size);
    }
    // A round of micro-batches is held in memory as tokens: a size no machine holds is refused
    // here, with the numbers, rather than in an allocation.
    std::int64_t round_samples = 0, round_tokens = 0;
    if (__builtin_mul_overflow(micro_, static_cast<std::int64_t>(world_), &round_samples) ||
        __builtin_mul_overflow(round_samples, o.seq_len, &round_tokens) ||
        round_tokens > (std::int64_t{1} << 32)) {
      throw Error("micro-batch {} x {} rank(s) x {} tokens is more tokens than any machine holds at once: lower the "
                  "micro-batch or the sequence length",
                  micro_, world_, o.seq_len);
    }
    const auto samples_per_step = static_cast<std::uint64_t>(micro_ * gas_ * world_);
    const auto steps_per_epoch = std::max<std::int64_t>(1, static_cast<std::int64_t>(sampler_.train_samples() / samples_per_step));
    total_steps_ = o.max_steps > 0 ? o.max_steps
                                   : std::max<std::int64_t>(1, std::llround(o.epochs * static_cast<double>(steps_per_epoch)));
    if (mode_.nccl) join_gpu_ranks();
    if (!mode_.no_pipeline.empty()) spdlog::info("the GPU pipeline is off: {}; the synchronous path trains", mode_.no_pipeline);
    for (const auto& n : mode_.notes) spdlog::info("{}", n);
    build_store();
    tokens_.resize(static_cast<std::size_t>(micro_ * world_ * o.seq_len));
    targets_.resize(tokens_.size());
    if (mode_.stage3) build_coordinator();
    if (backend_->name() != "cpu") plan_gpu();  // before the large allocations: refused when it cannot fit
    // Stages 0-2 keep the whole compute copy of the parameters; stage 3 gathers each unit when it
    // is used (the coordinator).
    if (!mode_.stage3) params_.emplace(*backend_, layout_, mode_.param_dtype);
    env_.emplace(PathEnv{o_, mode_, *backend_, model_, layout_, *comm_, *offload_, arena_, *versions_, *gather_,
                         params_ ? &*params_ : nullptr, coord_.get(), nccl_.get()});
    path_ = make_gradient_path(*env_);
    step_params_.emplace(coord_.get(), params_ ? &*params_ : nullptr);
  }

  ~Trainer() {
    // A step still in flight stops first (a gather waiting for its updates is told why); then the
    // prefetch thread; then the path's buffers, and read-aheads go back to the store while it
    // exists (the members' order).
    if (path_) path_->stop();
    coord_.reset();
  }
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainResult run() {
    const bool resumed = !o_.resume.empty();
    if (!resumed && fs::exists(fs::path(o_.output_dir) / "checkpoints" / "latest")) {
      throw Error("'{}' already holds a run with checkpoints: pass --resume to continue it, or choose another "
                  "--output-dir (nothing was changed)",
                  o_.output_dir);
    }
    const std::string resumed_from = start(resumed);
    if (resumed && st_.step >= total_steps_) {
      spdlog::info("the checkpoint is at step {}, at or past the {} steps asked for: nothing to train", st_.step,
                   total_steps_);
      return untrained(resumed_from, false);
    }
    path_->from_store();
    if (world_ > 1) comm_->barrier(kSlowWait);  // every rank has its state, however long loading took
    // A stop asked for during the set-up (allocating, loading, initialising: minutes for a large
    // model) ends the run here, before a step and its checkpoint: nothing trained, nothing saved.
    if (stop_agreed()) {
      spdlog::info("a stop was requested during set-up: stopped before the first step; nothing was trained or saved");
      return untrained(resumed_from, true);
    }
    versions_->reset(layout_.units.size(), st_.applied);
    gather_->refresh(coord_.get(), params_ ? &*params_ : nullptr, *comm_);
    RunReport report({&o_, &mode_, &layout_, backend_.get(), offload_.get(), coord_.get(), path_.get(), rank_, world_,
                      total_steps_, tokens_per_step(), model_flops_per_token(), backend_->name() != "cpu" ? &gpu_plan_ : nullptr});
    report.open(resumed, st_.step, sampler_, scaler_.scale());

    TrainResult result;
    const std::int64_t first_step = st_.step;
    double last_loss = 0, last_eval = std::nan("");
    while (st_.step < total_steps_) {
      const auto t0 = Clock::now();
      StepMetrics s = train_step();
      const std::optional<double> eval = maybe_evaluate();
      s.eval_loss = eval.value_or(std::nan(""));
      if (eval) last_eval = *eval;  // (NaN too: an eval on diverged weights)
      last_loss = s.loss;
      s.phases.offload_io += path_->take_io_wait();  // the I/O waits of the steps joined so far
      s.step = st_.step;
      s.tokens = st_.tokens;
      s.epoch = static_cast<double>(sampler_.position().epoch) + sampler_.epoch_fraction();
      s.step_s = seconds_since(t0);
      result.stopped_early = stop_agreed() && st_.step < total_steps_;
      report.step(s, result.stopped_early || st_.step == total_steps_);
      if (result.stopped_early) {
        spdlog::info("stop requested: {} at step {}", o_.save ? "saving a checkpoint and exiting" : "exiting (--no-save: no checkpoint)", st_.step);
        break;
      }
      if (o_.save && o_.save_every > 0 && st_.step % o_.save_every == 0 && st_.step < total_steps_) {
        result.last_checkpoint = save();
      }
    }
    path_->join();
    path_->finish_run();
    if (o_.save) result.last_checkpoint = save();
    result.steps = st_.step;
    result.first_loss = st_.first_loss;
    result.final_loss = last_loss;
    result.final_eval_loss = last_eval;
    result.best_eval_loss = st_.have_eval ? st_.best_eval : std::nan("");
    report.summary(result, first_step, st_.tokens, sampler_);
    return result;
  }

 private:
  // ---- one training step, in named phases

  StepMetrics train_step() {
    StepMetrics s;
    // The schedule advances only on applied steps (DeepSpeed skips it with the step).
    s.lr = st_.applied == 0 ? schedule_.initial_lr() : schedule_.lr_at(st_.applied - 1);
    s.loss_scale = o_.ds.fp16.enabled ? scaler_.scale() : 1.0;
    begin_step(s.lr);
    double loss_sum = 0;
    for (std::int64_t m = 0; m < gas_; ++m) {
      load_micro_batch(m, s.phases);
      loss_sum += forward(m, s.phases);
      backward(m, s.loss_scale, s.phases);
    }
    step_params_->end();
    s.loss = mean_loss(loss_sum);
    const auto t = Clock::now();
    s.grad_norm = reduce_gradients(s.loss_scale);
    s.skipped = !std::isfinite(s.grad_norm);
    if (s.skipped && !o_.ds.fp16.enabled) throw Error("the gradient norm is {} at step {}: training diverged", s.grad_norm, st_.step + 1);
    if (s.skipped) {
      // fp16: skip the step; the weights, the optimizer state and the schedule stay as they were.
      spdlog::info("step {}: fp16 gradients overflow at loss scale {}; step skipped", st_.step + 1, s.loss_scale);
    } else {
      path_->apply(clip_coefficient(s.grad_norm) / (static_cast<double>(gas_ * world_) * s.loss_scale));
      ++st_.applied;
    }
    if (o_.ds.fp16.enabled) scaler_.update(s.skipped);
    s.phases.optimizer += seconds_since(t);
    finish_step(s.loss);
    return s;
  }

  // Gradients zeroed, the coordinator's schedule begun (stage 3), the path told.
  void begin_step(double lr) {
    step_params_->begin(mode_.stage3 ? ParamCoordinator::training_schedule(
                                           layout_.units.size(), gas_, [this](std::size_t u) { return model_.unit_reads(u); },
                                           [this](std::size_t u) { return model_.backward_param_reads(u); })
                                     : std::vector<std::vector<std::size_t>>{});
    path_->begin_step({st_.step, st_.applied, lr, o_.ds.gradient_clipping > 0, st_.seed});
  }

  // Every rank draws the same round of micro x W samples and takes its own micro of them.
  void load_micro_batch(std::int64_t m, PhaseTimes& tm) {
    const auto t = Clock::now();
    sampler_.next_batch(micro_ * world_, tokens_, targets_);
    const auto mine = static_cast<std::size_t>(rank_ * micro_ * o_.seq_len);
    const auto len = static_cast<std::size_t>(micro_ * o_.seq_len);
    model_.set_batch(std::span(tokens_).subspan(mine, len), std::span(targets_).subspan(mine, len), micro_, o_.seq_len);
    path_->before_forward(m, true);
    tm.data += seconds_since(t);
  }

  float forward(std::int64_t m, PhaseTimes& tm) {
    const auto t = Clock::now();
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      model_.forward_unit(u, step_params_->acquire());
      step_params_->release();
    }
    const float loss = model_.loss();
    tm.forward += seconds_since(t);
    tm.optimizer += path_->after_forward(m);
    // With several ranks the step goes on (every rank's collectives must still match); the loss's
    // sum over ranks carries the non-finite value to every rank, which then stop.
    if (!std::isfinite(loss) && world_ == 1) {
      throw Error("the loss is {} at step {}: training diverged (lower the learning rate, or resume from an earlier "
                  "checkpoint)",
                  loss, st_.step + 1);
    }
    return loss;
  }

  void backward(std::int64_t m, double loss_scale, PhaseTimes& tm) {
    const auto t = Clock::now();
    for (std::size_t u = layout_.units.size(); u-- > 0;) {
      const UnitBuffers& p = step_params_->acquire();
      path_->before_unit_backward(u, m);
      model_.backward_unit(u, p, path_->gradients(), static_cast<float>(loss_scale));
      step_params_->release();
      path_->after_unit_backward(u, m);
    }
    path_->end_micro_batch(m);
    tm.backward += seconds_since(t);
  }

  // The loss averaged over micro-batches and ranks.
  double mean_loss(double loss_sum) {
    if (world_ > 1) {
      auto l = static_cast<float>(loss_sum);
      comm_->all_reduce_sum(std::span<float>(&l, 1));
      loss_sum = l;
    }
    if (!std::isfinite(loss_sum)) {
      throw Error("the loss is not finite at step {} on some rank: training diverged (lower the learning rate, or "
                  "resume from an earlier checkpoint)",
                  st_.step + 1);
    }
    return loss_sum / static_cast<double>(gas_ * world_);
  }

  // The gradients complete and summed over the ranks; returns the global norm of the averaged
  // gradient (non-finite: an fp16 overflow).
  double reduce_gradients(double loss_scale) {
    std::vector<void*> units = path_->gradients_complete();
    if (o_.after_backward && !units.empty()) o_.after_backward(st_.step + 1, units);
    path_->reduce();
    return std::sqrt(path_->squared_norm()) / (static_cast<double>(gas_ * world_) * loss_scale);
  }

  // DeepSpeed's clip coefficient.
  double clip_coefficient(double norm) const {
    if (o_.ds.gradient_clipping <= 0) return 1.0;
    return std::min(1.0, o_.ds.gradient_clipping / (norm + 1e-6));
  }

  void finish_step(double loss) {
    ++st_.step;
    st_.tokens += tokens_per_step();
    if (st_.step == 1) st_.first_loss = loss;
  }
  std::uint64_t tokens_per_step() const { return static_cast<std::uint64_t>(micro_ * gas_ * world_ * o_.seq_len); }

  // ---- around the steps

  // The eval loss when this step calls for one.
  std::optional<double> maybe_evaluate() {
    if (!((o_.eval_every > 0 && st_.step % o_.eval_every == 0) || st_.step == total_steps_)) return std::nullopt;
    const double loss = evaluate();
    if (!st_.have_eval || loss < st_.best_eval) st_.best_eval = loss;
    st_.have_eval = true;
    return loss;
  }

  // The first eval_max_batches micro-batches' worth of held-out samples. Fixed when the run starts
  // and kept in checkpoints, so a run resumed with another micro-batch evaluates the same samples.
  std::uint64_t default_eval_samples() const {
    return std::min<std::uint64_t>(sampler_.eval_samples(), static_cast<std::uint64_t>(micro_) *
                                                                static_cast<std::uint64_t>(std::max<std::int64_t>(1, o_.eval_max_batches)));
  }

  double evaluate() {
    path_->join();  // the step in flight completes first
    const std::uint64_t n = std::min<std::uint64_t>(st_.eval_samples, sampler_.eval_samples());
    if (n == 0) return std::nan("");
    const auto per_batch = static_cast<std::uint64_t>(micro_);
    double sum = 0;
    std::int64_t counted = 0;
    for (std::uint64_t first = 0; first < n; first += per_batch) {
      const auto count = static_cast<std::int64_t>(std::min(per_batch, n - first));
      for (std::int64_t i = 0; i < count; ++i) {
        sampler_.eval_sample(first + i, std::span(tokens_).subspan(i * o_.seq_len, o_.seq_len),
                             std::span(targets_).subspan(i * o_.seq_len, o_.seq_len));
      }
      model_.set_batch(std::span(tokens_).first(count * o_.seq_len), std::span(targets_).first(count * o_.seq_len),
                       count, o_.seq_len);
      path_->before_forward(0, false);  // no dropout
      step_params_->begin(mode_.stage3 ? ParamCoordinator::forward_schedule(
                                             layout_.units.size(), [this](std::size_t u) { return model_.unit_reads(u); })
                                       : std::vector<std::vector<std::size_t>>{});
      for (std::size_t u = 0; u < layout_.units.size(); ++u) {
        model_.forward_unit(u, step_params_->acquire());
        step_params_->release();
      }
      step_params_->end();
      sum += static_cast<double>(model_.loss()) * static_cast<double>(count);
      counted += count;
    }
    return sum / static_cast<double>(counted);
  }

  // Collective: the ranks for which `failed` is true, listed ("0, 2"), or "" when none.
  std::string failed_ranks(bool failed) {
    const float mine = failed ? 1.0f : 0.0f;
    std::vector<float> all(static_cast<std::size_t>(world_));
    comm_->all_gather(std::span<const float>(&mine, 1), all);
    std::string bad;
    for (int r = 0; r < world_; ++r) {
      if (all[static_cast<std::size_t>(r)] == 0.0f) continue;
      if (!bad.empty()) bad += ", ";
      bad += std::to_string(r);
    }
    return bad;
  }
  // Collective: throws on every rank when any rank's `error` is not empty; a rank without an error
  // of its own names the ranks that failed (each of which reports its own reason).
  void agree_or_throw(const std::string& error, const char* what) {
    const std::string bad = failed_ranks(!error.empty());
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

  // ---- start: a checkpoint, or the initial weights

  // Every rank loads its own piece; they agree before going on, so that a rank whose piece is
  // missing or damaged stops all of them with its reason (the others name it), instead of leaving
  // them in the next collective with a peer that has gone. Returns the checkpoint resumed from.
  std::string start(bool resumed) {
    std::string from, error;
    try {
      if (rank_ == 0) lock_.emplace(o_.output_dir, "the output directory");
      if (resumed) {
        from = resolve_checkpoint(o_.output_dir, o_.resume);
        load_checkpoint(from);
      } else {
        load_base();
        st_.seed = o_.seed;
        st_.eval_samples = default_eval_samples();
        path_->initialise(st_.seed);
      }
    } catch (const std::exception& e) {
      if (world_ == 1) throw;
      error = e.what();
    }
    if (world_ > 1) agree_or_throw(error, resumed ? "resume" : "initialise its state");
    return from;
  }

  // A run that trains nothing: the state it started from, no losses.
  TrainResult untrained(const std::string& from, bool stopped) const {
    TrainResult r;
    r.steps = st_.step;
    r.first_loss = st_.first_loss;
    r.final_loss = r.final_eval_loss = r.best_eval_loss = std::nan("");
    r.last_checkpoint = from;
    r.stopped_early = stopped;
    return r;
  }

  // The model's weights into the store: from init_weights or the seed. The fp32 master is made in
  // host memory whatever the compute backend: from a file, the whole model at once; a fresh
  // initialisation a unit at a time (host memory for one unit beyond the store). (A LoRA run's
  // frozen base comes here on resume too.)
  void load_base() {
    std::vector<float> mine;
    const auto put = [&](std::size_t u, const float* full) {
      const auto n = layout_.units[u].numel;
      std::span<const float> piece(full, static_cast<std::size_t>(n));
      if (mode_.sharded) {
        // This rank's piece of the unit (zero padded past the unit's end).
        const ShardRange part = shard_range(n, mode_.shard[u], rank_);
        mine.assign(static_cast<std::size_t>(mode_.shard[u]), 0.0f);
        std::copy_n(full + part.begin, part.count, mine.begin());
        piece = mine;
      }
      offload_->store().set_state(u, piece);
      path_->base_loaded(u, std::span<const float>(full, static_cast<std::size_t>(n)), piece);
    };
    if (!o_.init_weights.empty()) {
      auto host = make_cpu_backend();
      UnitStorage master(*host, layout_, DType::kF32);
      load_weights(o_.init_weights, o_.model, layout_, *host, master.view());
      spdlog::info("weights from {}", o_.init_weights);
      for (std::size_t u = 0; u < layout_.units.size(); ++u) put(u, static_cast<const float*>(master.view().units[u]));
      return;
    }
    std::vector<float> unit;
    for (std::size_t u = 0; u < layout_.units.size(); ++u) {
      unit.resize(static_cast<std::size_t>(layout_.units[u].numel));
      init_unit(o_.model, layout_.units[u], o_.seed, unit);
      put(u, unit.data());
    }
  }

  // ---- checkpoints (checkpoint.hpp holds the format)

  std::string save() {
    path_->join();      // the step in flight completes first
    path_->to_store();  // and the GPU's share of the state is copied into the store
    CheckpointSave save;
    save.output_dir = o_.output_dir;
    save.step = st_.step;
    save.keep_last = o_.keep_last;
    // (A LoRA run's state is the adapters', the same on every rank: rank 0 writes it.)
    save.shards = mode_.sharded && !mode_.lora ? world_ : 1;
    CheckpointManifest m = manifest();
    const StateSource state = path_->checkpoint_state();
    path_->add_to_checkpoint(m, save);
    save.manifest = [&m] { return m; };
    return save_checkpoint(*comm_, save, state);
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
    m.loss_scaler_enabled = o_.ds.fp16.enabled;
    m.loss_scaler = scaler_.state();
    m.model = model_config_json(o_.model);
    for (const auto& u : layout_.units) m.units.emplace_back(u.name, u.numel);
    m.world_size = world_;
    m.zero_stage = o_.ds.zero.stage;
    return m;
  }
  std::string precision() const { return o_.ds.fp16.enabled ? "fp16" : kernels::cpu::dtype_name(mode_.param_dtype); }

  void load_checkpoint(const std::string& dir) {
    const CheckpointReader ck(dir, 0);
    ck.check_layout(layout_, o_.model);
    check_resumable(ck, {o_.seq_len, o_.data->name(), o_.data->size(), o_.eval_fraction, micro_, gas_, world_,
                         precision(), mode_.lora});
    const CheckpointManifest& m = ck.manifest();
    st_.step = m.step;
    st_.applied = m.applied_steps;
    if (o_.ds.fp16.enabled && m.loss_scaler_enabled) scaler_.set_state(m.loss_scaler);
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
    path_->load_checkpoint(ck, [this] { load_base(); });
    spdlog::info("resumed from {} at step {}", dir, st_.step);
  }

  // ---- building the components

  // Several GPUs in the pipeline: the ranks join an NCCL communicator (bootstrapped over comm_) for
  // the gather thread's all-gathers and reduce-scatters. The ranks first agree that every one of
  // them can use NCCL; where any cannot, all take the synchronous path (collectives on the host,
  // over Gloo) and say why.
  void join_gpu_ranks() {
    std::string why;
    const bool usable = nccl_usable(&why);
    const std::string bad = failed_ranks(!usable);
    if (!bad.empty()) {
      spdlog::warn("NCCL cannot be used by rank(s) {}{}: the GPUs' collectives run on the host over Gloo (the "
                   "synchronous path, much slower); install NCCL 2.18 or later, or point ZINF_NCCL_LIBRARY at it",
                   bad, usable ? std::string() : fmt::format(" (here: {})", why));
      RunModeInputs in = mode_inputs(o_, world_);
      in.nccl_usable = false;
      mode_ = decide_run_mode(in);
      return;
    }
    // A collective waits for the other ranks' computation and optimizer step too (a gather waits
    // for its unit's update): 10 minutes unless ZINF_COMM_TIMEOUT says otherwise.
    NcclOptions no;
    if (std::getenv("ZINF_COMM_TIMEOUT") == nullptr) no.timeout = std::chrono::minutes(10);
    try {
      nccl_ = make_nccl_collectives(*comm_, o_.gpu, no);
    } catch (const Error& e) {
      throw Error("{} (with several GPUs each rank needs a GPU of its own: zinf launch gives rank r GPU LOCAL_RANK; "
                  "--gpu-overlap off takes the synchronous path, over the host)",
                  e.what());
    }
    if (rank_ == 0) {
      spdlog::info("{} GPUs: each unit's parameters are all-gathered, and its gradient reduce-scattered, over NCCL {} "
                   "(GPU to GPU); each rank copies down and steps its own shard",
                   world_, nccl_version());
    }
  }

  // The optimizer state, through the offload module (host memory, or NVMe per the config), with
  // the gradient shards the path allocates counted in its preflight.
  void build_store() {
    offload::OffloadSettings settings = offload::offload_settings(o_.ds);
    for (const auto& n : settings.notes) spdlog::info("offload: {}", n);
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
    versions_ = std::make_unique<UnitVersions>(mode_.pipeline);
    gather_.emplace(mode_, layout_, *backend_, offload_->store(), *versions_, rank_, o_.ds.fp16.enabled);
    gather_->set_nccl(nccl_.get());
  }

  // Stage 3: each unit gathered per use under the live, prefetch, reuse and persistence budgets.
  // The prefetch thread gathers on a channel of its own, so its all-gathers never interleave with
  // the compute thread's reductions.
  void build_coordinator() {
    if (!nccl_) gather_comm_ = comm_->split("stage3-gather");
    const auto& z = o_.ds.zero;
    CoordinatorOptions co{z.max_live_parameters, z.prefetch_bucket_size, z.max_reuse_distance,
                          z.param_persistence_threshold, z.model_persistence_threshold, {}};
    if (nccl_) {
      for (std::size_t u = 0; u < layout_.units.size(); ++u) co.gather_elements.push_back(mode_.gather_elements(u));
    }
    Communicator& channel = gather_comm_ ? *gather_comm_ : *comm_;  // (NCCL: unused)
    coord_ = std::make_unique<ParamCoordinator>(*backend_, layout_, mode_.param_dtype, co,
                                                [this, &channel](std::size_t u, void* dst, std::size_t next) {
                                                  gather_->prefetch(u, dst, channel, next);
                                                });
  }

  // A GPU run is planned before its large allocations, and refused when it cannot fit the limit.
  void plan_gpu() {
    GpuMemoryInputs in;
    in.model = &o_.model;
    in.mode = &mode_;
    in.zero = &o_.ds.zero;
    in.micro = micro_;
    in.seq = o_.seq_len;
    in.grad_accum = gas_;
    in.model_options = model_.options();
    if (mode_.lora) {
      in.lora_numel = static_cast<std::uint64_t>(model_.lora().numel);
      in.lora_state_on_gpu = !o_.lora_offload_optimizer;
    }
    gpu_plan_ = plan_gpu_memory(in);
    const std::uint64_t limit = o_.gpu_memory_limit;
    spdlog::info("GPU memory plan: {}{}", gpu_plan_.describe(),
                 limit > 0 ? fmt::format(" of the {:.2f} GiB limit", static_cast<double>(limit) / (1u << 30)) : "");
    if (limit > 0 && gpu_plan_.total() > limit) {
      throw Error("this run does not fit --gpu-memory-limit {:.2f} GiB: it needs {} (micro-batch {} x {} tokens). Lower "
                  "the micro-batch or the sequence length{}, or raise the limit",
                  static_cast<double>(limit) / (1u << 30), gpu_plan_.describe(), micro_, o_.seq_len,
                  mode_.stage3 ? ", or stage3_max_live_parameters" : ", or use ZeRO stage 3 (parameters gathered per layer)");
    }
  }

  double model_flops_per_token() const {
    return mode_.lora ? lora_training_flops_per_token(o_.model, o_.seq_len, model_.lora())
                      : training_flops_per_token(o_.model, o_.seq_len);
  }

  const TrainOptions& o_;
  std::optional<DirectoryLock> lock_;  // rank 0: the output directory, for the run's life
  std::unique_ptr<Communicator> owned_comm_;
  Communicator* comm_ = nullptr;
  RunMode mode_;  // every mode decision (run_mode.hpp)
  std::unique_ptr<Backend> backend_;
  Model model_;
  const ModelLayout& layout_;
  Sampler sampler_;
  LrSchedule schedule_;
  LossScaler scaler_;
  tbb::task_arena arena_;
  int world_ = 1, rank_ = 0;
  std::int64_t micro_ = 1, gas_ = 1, total_steps_ = 1;
  std::vector<std::int32_t> tokens_, targets_;
  TrainerState st_;
  GpuMemoryPlan gpu_plan_;
  // Components, in the order they are built; destroyed in reverse (the coordinator's thread and
  // the path's buffers go before the store and the backend they use).
  std::unique_ptr<DeviceCollectives> nccl_;     // several GPUs in the pipeline
  std::unique_ptr<offload::Offload> offload_;  // the partition store and the optimizer stepper
  std::unique_ptr<UnitVersions> versions_;
  std::optional<ParamGather> gather_;
  std::optional<UnitStorage> params_;          // stages 0-2: the whole compute copy
  std::unique_ptr<Communicator> gather_comm_;  // stage 3: the prefetch thread's channel
  std::optional<PathEnv> env_;
  std::unique_ptr<GradientPath> path_;
  std::unique_ptr<ParamCoordinator> coord_;    // its thread uses the members above
  std::optional<StepParams> step_params_;
};

}  // namespace

TrainResult train(const TrainOptions& options) {
  if (options.data == nullptr) throw Error("train: no data");
  Trainer t(options);
  return t.run();
}

}  // namespace zinf::runtime
