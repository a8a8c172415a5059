// The overlapped GPU pipeline (docs/gpu.md): one GPU at stages 2-3, or several at stage 3 over
// NCCL. Each unit's gradient is copied down into page-locked memory as its backward finishes
// (with several GPUs, this rank's shard of it, reduce-scattered over NCCL first), its sum of
// squares computed on the GPU, and the optimizer step runs on its own thread, stepping each unit
// as its gradient lands. At stage 3 with bf16 parameters the next forward starts while the step
// finishes: each gather waits for its unit's update (UnitVersions). With gradient accumulation the
// earlier micro-batches' sum waits in the page-locked shard: each next micro-batch uploads it and
// adds its own gradient on the GPU before the copy down, and the last one's sum is the one
// stepped. With offload_optimizer.ratio < 1 the first units' state lives on the GPU and is stepped
// there once the norm is known. Bit-identical to the synchronous path (sync_path.cpp).
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "gpu_memory_plan.hpp"
#include "gradient_path.hpp"

namespace zinf::runtime {
namespace {

using kernels::cpu::DType;

// The optimizer step on a thread of its own, fed gradients as backward lands them. Destroyed
// before join() (an error in forward or backward), it fails the feed so the step stops waiting,
// then joins.
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

class GpuPipeline final : public GradientPath {
 public:
  explicit GpuPipeline(PathEnv& env) : GradientPath(env), buffers_(env.backend, env.mode) {
    const RunMode& m = env.mode;
    const std::size_t units = env.layout.units.size();
    for (std::size_t u = 0; u < units; ++u) {
      const std::uint64_t bytes = m.pinned_gradient_bytes(u);
      if (bytes == 0) {
        pinned_.emplace_back();  // its gradient stays on the GPU, or lands in its parameter shard
        continue;
      }
      pinned_.push_back(env.offload.memory().allocate(offload::Purpose::kGradients, bytes, "gradient of " + env.layout.units[u].name));
    }
    feed_ = std::make_unique<offload::StepFeed>(units);
    landed_.resize(units);
    sum_up_.resize(units);
    if (gas() > 1) {
      // No more uploaded sums of a size than units of that size (the GPU plan counts so).
      for (std::size_t u = 0; u < units; ++u) {
        if (m.on_gpu[u]) continue;
        std::size_t& limit = sum_limit_[sum_bytes(u)];
        limit = std::min(limit + 1, kSumBuffers);
      }
    }
    unit_sq_.emplace(env.backend, units * sizeof(double));
    // The GPU's share of the optimizer: each unit's state, and its compute copy, which the
    // coordinator uses in place of gathers (filled by from_store()).
    gpu_state_.resize(units);
    gpu_param_.resize(units);
    gpu_grad_.resize(units);
    for (std::size_t u = 0; u < m.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(env.layout.units[u].numel);
      gpu_state_[u] = DeviceBuffer(env.backend, 3 * n * sizeof(float));
      gpu_param_[u] = DeviceBuffer(env.backend, n * kernels::cpu::dtype_bytes(m.param_dtype));
      env.coord->adopt(u, gpu_param_[u].data());
    }
  }
  ~GpuPipeline() override {
    stop();
    // Copies still running (an error mid-backward) finish before their buffers go; the pinned
    // gradient shards go back to the host memory of the store, which outlives them.
    try {
      env_.backend.synchronize();
    } catch (...) {
    }
  }

  void stop() override {
    env_.versions.fail("training stopped");  // a gather waiting for its update is told why
    inflight_.reset();
  }

  // The step starts now (NVMe state is read ahead during forward), or, while the previous step is
  // still finishing (stage 3: this forward overlaps it, each gather waiting for its unit's
  // update), once this forward is done.
  void begin_step(const StepInfo& step) override {
    step_ = step;
    started_ = false;
    if (!inflight_) {
      start();
      started_ = true;
    }
  }
  double after_forward(std::int64_t /*m*/) override {
    if (started_) return 0;
    // Every unit was gathered, so the previous step has updated them all: it is finishing.
    const auto t = std::chrono::steady_clock::now();
    join();
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    start();
    started_ = true;
    return waited;
  }

  const UnitBuffers& gradients() override { return buffers_.view(); }

  void before_unit_backward(std::size_t u, std::int64_t m) override {
    for (const std::size_t r : env_.model.unit_reads(u)) buffers_.take(r);
    if (m > 0 && !env_.mode.on_gpu[u]) upload_sum(u);
  }
  void after_unit_backward(std::size_t u, std::int64_t m) override {
    land_gradient(u, m);
    if (u == 0 && m == gas() - 1) {
      // The last gradient: the units not yet stepped are next step's tail, stepped in forward
      // order so that the next forward can follow them. (The GPU's units, 0 to gpu_units - 1, are
      // stepped after the norm, before them.)
      const std::size_t g = env_.mode.gpu_units;
      const std::size_t left = g + env_.versions.behind(g, step_.applied);
      tail_ = std::min(left > 0 ? left - 1 : 0, env_.layout.units.size() - 1);
    }
  }

  // (The pipeline never runs with a gradient hook: run_mode.cpp sends such runs to the
  // synchronous path.)
  std::vector<void*> gradients_complete() override { return {}; }

  double squared_norm() override {
    // Summed on the GPU as each gradient was complete.
    std::vector<double> unit_sq(env_.layout.units.size());
    env_.backend.download(unit_sq.data(), unit_sq_->data(), unit_sq.size() * sizeof(double));
    double sq = 0;
    for (const double v : unit_sq) sq += v;
    return sum_over_ranks(sq);
  }

  void apply(double grad_scale) override {
    if (step_.clipping && inflight_) feed_->post_grad_scale(static_cast<float>(grad_scale));
    step_gpu_units(grad_scale);
    // Stage 3 with bf16 parameters leaves the step running: the next forward's gathers wait for
    // each unit's bf16 shard (the refresh drops the gathered copies). An fp32 gather reads the
    // master, whose NVMe write-back the step does not report per unit, and stage 2 keeps every
    // unit on the GPU and uploads them all after the step: both join here.
    if (!env_.mode.stage3 || env_.mode.param_dtype != DType::kBF16) join();
    refresh_compute();
    // From now on every gather (the coordinator's prefetch for the next step starts at its
    // begin()) waits for this step's update of its unit.
    env_.versions.require(step_.applied + 1);
  }

  // Waits for the step in flight (if any); its errors come out here.
  void join() override {
    if (!inflight_) return;
    struct Clear {
      std::optional<OverlappedStep>& s;
      ~Clear() { s.reset(); }
    } clear{inflight_};
    const offload::StepStats ss = inflight_->join();
    io_wait_ += ss.read_wait_seconds + ss.write_wait_seconds;
  }

  // The GPU's units' state from the store (after initialisation or a checkpoint load), and their
  // compute copy as a gather would give it.
  void from_store() override {
    std::vector<float> st;
    std::vector<std::uint16_t> bf;
    offload::PartitionStore& store = env_.offload.store();
    for (std::size_t u = 0; u < env_.mode.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(env_.layout.units[u].numel);
      st.resize(3 * n);
      store.read_state(u, std::span<float>(st.data(), n), std::span<float>(st.data() + n, n),
                       std::span<float>(st.data() + 2 * n, n));
      env_.backend.upload(gpu_state_[u].data(), st.data(), 3 * n * sizeof(float));
      if (env_.mode.param_dtype == DType::kBF16) {
        bf.resize(n);
        store.fetch(u).copy_to(bf);
        env_.backend.upload(gpu_param_[u].data(), bf.data(), n * 2);
      } else {
        env_.backend.upload(gpu_param_[u].data(), st.data(), n * sizeof(float));
      }
    }
  }
  // ... and back into the store, which checkpoints read (after the steps queued so far).
  void to_store() override {
    std::vector<float> st;
    for (std::size_t u = 0; u < env_.mode.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(env_.layout.units[u].numel);
      st.resize(3 * n);
      env_.backend.download(st.data(), gpu_state_[u].data(), 3 * n * sizeof(float));
      env_.offload.store().set_state(u, std::span<const float>(st.data(), n), std::span<const float>(st.data() + n, n),
                                     std::span<const float>(st.data() + 2 * n, n));
    }
  }

 private:
  std::int64_t gas() const { return env_.options.ds.batch.gas; }

  // This rank's gradient shard of unit u in page-locked memory (bf16 when gradients travel as
  // bf16), or the unit's own bf16 parameter shard in the store.
  void* shard(std::size_t u) {
    if (env_.mode.grads_in_params) return env_.offload.store().host_params(u);
    return pinned_[u].as<float>();
  }

  // The step on its thread: gradients from the feed once their copy has landed; the order is
  // landing order (the head first) except the tail, the last units to be stepped in the previous
  // step, which go in forward order after the embedding; with clipping, forward order (everything
  // waits for the norm). The order changes nothing in the result.
  void start() {
    feed_->reset();
    offload::StepInputs in = step_inputs(step_, 1.0, env_.mode.grad_dtype);
    in.feed_from(*feed_);
    in.gradient = [this, from_feed = std::move(in.gradient)](std::size_t u) -> const void* {
      const void* g = from_feed(u);
      landed_[u]->synchronize();  // posted when its copy was queued: wait for the copy itself
      return g;
    };
    in.unit_done = [this](std::size_t u) { env_.versions.stepped(u); };
    const std::size_t n = env_.layout.units.size();
    const std::size_t tail = step_.clipping ? n - 1 : tail_;
    for (std::size_t u = n; u-- > tail + 1;) {
      if (!env_.mode.on_gpu[u]) in.order.push_back(u);
    }
    for (std::size_t u = 0; u <= tail; ++u) {
      if (!env_.mode.on_gpu[u]) in.order.push_back(u);
    }
    if (in.order.empty()) return;  // every unit's state is on the GPU: step_gpu_units() does it all
    if (!step_.clipping) feed_->post_grad_scale(static_cast<float>(1.0 / static_cast<double>(gas() * env_.mode.world)));
    inflight_.emplace(env_.offload.stepper(), *feed_, std::move(in), [this](const std::string& why) { env_.versions.fail(why); });
  }

  // The GPU's share of the step, once the gradient scale is known: each unit's Adam step on the
  // compute stream (the CPU kernels' arithmetic: the same fp32 state as stepping it on the host,
  // and the same bf16 parameters except that fp32 subnormals are rounded, as the host's exact
  // mode does, where AVX512-BF16 hosts flush them to zero), writing its compute copy in place; the
  // held gradients go back to the pool. The kernels are only queued here: their time shows in the
  // next forward, not in the step's optimizer time.
  void step_gpu_units(double grad_scale) {
    if (env_.mode.gpu_units == 0) return;
    const offload::StepInputs in = step_inputs(step_, grad_scale, env_.mode.grad_dtype);
    for (std::size_t u = 0; u < env_.mode.gpu_units; ++u) {
      const auto n = static_cast<std::size_t>(env_.layout.units[u].numel);
      kernels::cpu::AdamTensors t;
      float* state = gpu_state_[u].f32();
      t.param = state;
      t.exp_avg = state + n;
      t.exp_avg_sq = state + 2 * n;
      t.state_dtype = DType::kF32;
      t.grad = gpu_grad_[u].data();
      t.grad_dtype = env_.mode.grad_dtype;
      t.param_out = gpu_param_[u].data();
      t.out_dtype = env_.mode.param_dtype;
      t.n = n;
      env_.backend.adam_step(in.adam, t);
      buffers_.give_back(std::move(gpu_grad_[u]));
      env_.versions.stepped(u);
    }
  }

  // Unit u's gradient of micro-batch m is complete on the compute stream. Its sum of squares is
  // computed there; the copy-down stream then brings it into the page-locked shard and the
  // optimizer thread, told now, waits for that copy. The buffer is reused only after the copy.
  // With bf16 gradients (communication_data_type bf16) it is rounded first, and the norm is that
  // of the rounded values, which the optimizer steps with.
  void land_gradient(std::size_t u, std::int64_t m) {
    const auto n = env_.layout.units[u].numel;
    Backend& b = env_.backend;
    if (env_.mode.on_gpu[u]) {
      // The GPU's share: the gradient stays for step_gpu_units(), rounded first like the others.
      // (With accumulation, gradients are fp32: later micro-batches add theirs to the first's.)
      if (m > 0) {
        ZINF_ASSERT(env_.mode.grad_dtype == DType::kF32, "accumulated GPU-share gradients must be fp32");
        b.add(gpu_grad_[u].f32(), buffers_.live(u).f32(), n);
        buffers_.release(u);  // compute-ordered
      } else if (env_.mode.grad_dtype == DType::kBF16) {
        gpu_grad_[u] = buffers_.pooled(static_cast<std::size_t>(n) * 2);
        b.round_to_bf16(static_cast<std::uint16_t*>(gpu_grad_[u].data()), buffers_.live(u).f32(), n);
        buffers_.release(u);  // compute-ordered
      } else {
        gpu_grad_[u] = buffers_.take_out(u);
      }
      if (m == gas() - 1) b.sum_squares(static_cast<double*>(unit_sq_->data()) + u, gpu_grad_[u].data(), n, env_.mode.grad_dtype);
      return;
    }
    if (env_.nccl != nullptr) {
      post_reduction(u, m);
      return;
    }
    land_shard(u, n, m);
  }

  // Several GPUs: unit u's gradient (its padded buffer: W equal shards) is summed over the ranks
  // into this rank's shard by a reduce-scatter, which the gather thread runs in schedule order
  // once the unit's backward is done on the GPU. The compute thread goes on with the next unit;
  // finished reductions land in order (land_shard) as it passes here, at most kReductionsInFlight
  // behind, and all of them after the last unit.
  void post_reduction(std::size_t u, std::int64_t m) {
    const auto count = static_cast<std::size_t>(env_.mode.shard[u]);
    Reduction r;
    r.unit = u;
    r.full = buffers_.take_out(u);
    std::shared_ptr<Backend::Event> shard_busy;
    r.shard = buffers_.pooled_for_collective(count * sizeof(float), shard_busy);
    r.ticket = std::make_shared<ReduceTicket>();
    // The unit's backward, and every compute-stream read of the shard buffer queued before it.
    std::shared_ptr<Backend::Event> computed = env_.backend.record(Stream::kCompute);
    env_.coord->post([c = env_.nccl, t = r.ticket, computed, shard_busy, in = r.full.data(), out = r.shard.data(), count,
                      name = env_.layout.units[u].name](const std::exception_ptr& failed) {
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
      finish_reduction(m);
    }
  }
  // The oldest reduction posted: waits for it, then lands this rank's shard.
  void finish_reduction(std::int64_t m) {
    Reduction r = std::move(reducing_.front());
    reducing_.pop_front();
    const std::string error = r.ticket->wait();
    if (!error.empty()) throw Error("rank {}: {}", env_.comm.rank(), error);
    buffers_.give_back(std::move(r.full));  // the collective has read it
    buffers_.live(r.unit) = std::move(r.shard);
    land_shard(r.unit, env_.mode.shard[r.unit], m);
  }

  // Unit u's gradient (`count` elements in its live buffer: the unit, or this rank's summed shard)
  // comes down: rounded to bf16 first when gradients travel as bf16; its sum of squares computed
  // on the compute stream; the copy on the copy-down stream; the optimizer thread told. With
  // gradient accumulation (fp32 gradients), a micro-batch after the first adds the sum so far
  // (uploaded while its backward ran: upload_sum) to its own; every micro-batch but the last only
  // copies its sum down. Each sum is (earlier + this) in fp32, the synchronous path's sum in its
  // order, so the two step the same gradients bit for bit.
  void land_shard(std::size_t u, std::int64_t count, std::int64_t m) {
    Backend& b = env_.backend;
    DeviceBuffer& live = buffers_.live(u);
    std::size_t bytes = static_cast<std::size_t>(count) * sizeof(float);
    if (m > 0) {
      Uploaded up = std::move(sum_up_[u]);
      ZINF_ASSERT(up.landed != nullptr, "no sum of the earlier micro-batches was uploaded for unit {}", u);
      b.wait(Stream::kCompute, *up.landed);
      b.add(live.f32(), up.buffer.f32(), count);
      sum_pool_[bytes].push_back({std::move(up.buffer), b.record(Stream::kCompute)});
    }
    if (m < gas() - 1) {
      b.wait(Stream::kDeviceToHost, *b.record(Stream::kCompute));
      b.copy_to_host_async(shard(u), live.data(), bytes, Stream::kDeviceToHost);
      landed_[u] = b.record(Stream::kDeviceToHost);
      buffers_.release(u, landed_[u]);
      return;
    }
    const void* g = live.data();
    DeviceBuffer rounded;
    if (env_.mode.grad_dtype == DType::kBF16) {
      bytes = static_cast<std::size_t>(count) * 2;
      rounded = buffers_.pooled(bytes);
      b.round_to_bf16(static_cast<std::uint16_t*>(rounded.data()), live.f32(), count);
      g = rounded.data();
    }
    b.sum_squares(static_cast<double*>(unit_sq_->data()) + u, g, count, env_.mode.grad_dtype);
    b.wait(Stream::kDeviceToHost, *b.record(Stream::kCompute));
    b.copy_to_host_async(shard(u), g, bytes, Stream::kDeviceToHost);
    landed_[u] = b.record(Stream::kDeviceToHost);
    feed_->post_gradient(u, shard(u));
    // The copy-down reads the bf16 copy when there is one: the fp32 buffer is free for the next
    // unit at once (the rounding that read it is on the compute stream, where it is reused).
    const bool rounded_copy = rounded.data() != nullptr;
    buffers_.release(u, rounded_copy ? nullptr : landed_[u]);
    if (rounded_copy) buffers_.give_back(std::move(rounded), landed_[u]);
  }

  // Gradient accumulation: the page-locked sum of unit u's gradients over the earlier
  // micro-batches goes up on the upload stream as unit u's backward starts, after its copy down,
  // into a buffer of sum_pool_ whose last add (on the compute stream) is done: two per size, so the
  // stream never waits for work queued after the add it needs.
  std::size_t sum_bytes(std::size_t u) const {
    return static_cast<std::size_t>(env_.nccl != nullptr ? env_.mode.shard[u] : env_.layout.units[u].numel) * sizeof(float);
  }
  void upload_sum(std::size_t u) {
    Backend& b = env_.backend;
    const std::size_t bytes = sum_bytes(u);
    auto& list = sum_pool_[bytes];
    std::size_t pick = 0;
    while (pick < list.size() && !list[pick].free_after->ready()) ++pick;
    Uploaded up;
    if (pick == list.size() && list.size() < sum_limit_.at(bytes)) {
      up.buffer = DeviceBuffer(b, bytes);
    } else {
      if (pick == list.size()) pick = 0;  // the oldest
      b.wait(Stream::kHostToDevice, *list[pick].free_after);
      up.buffer = std::move(list[pick].buffer);
      list.erase(list.begin() + static_cast<std::ptrdiff_t>(pick));
    }
    b.wait(Stream::kHostToDevice, *landed_[u]);
    b.copy_to_device_async(up.buffer.data(), shard(u), bytes, Stream::kHostToDevice);
    up.landed = b.record(Stream::kHostToDevice);
    sum_up_[u] = std::move(up);
  }

  struct Uploaded {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> landed;
  };
  struct SumBuffer {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> free_after;  // the add that read it
  };
  // Reduce-scatters posted and not yet landed, oldest first (see post_reduction).
  struct Reduction {
    std::size_t unit = 0;
    DeviceBuffer full, shard;
    std::shared_ptr<ReduceTicket> ticket;
  };

  GradientBuffers buffers_;
  StepInfo step_;
  bool started_ = false;                                 // this step's optimizer thread has started
  std::vector<offload::HostBuffer> pinned_;              // page-locked gradient shards
  std::unique_ptr<offload::StepFeed> feed_;
  std::vector<std::shared_ptr<Backend::Event>> landed_;  // unit u's gradient is in its shard
  std::optional<DeviceBuffer> unit_sq_;                  // per-unit sums of squares (doubles)
  std::deque<Reduction> reducing_;
  // Gradient accumulation: the sums uploaded for the next add, and their buffers, each free after
  // the add that read it; per size kSumBuffers, or its unit count if fewer.
  std::vector<Uploaded> sum_up_;
  std::map<std::size_t, std::vector<SumBuffer>> sum_pool_;
  std::map<std::size_t, std::size_t> sum_limit_;
  // The GPU's share of the optimizer (units 0 to gpu_units - 1).
  std::vector<DeviceBuffer> gpu_state_;  // [master | exp_avg | exp_avg_sq], fp32
  std::vector<DeviceBuffer> gpu_param_;  // the compute copy (adopted by the coordinator)
  std::vector<DeviceBuffer> gpu_grad_;   // the step's gradient, held until the norm is known
  std::size_t tail_ = 0;                    // see start()
  std::optional<OverlappedStep> inflight_;  // the step still running
};

}  // namespace

std::unique_ptr<GradientPath> make_gpu_pipeline(PathEnv& env) { return std::make_unique<GpuPipeline>(env); }

}  // namespace zinf::runtime
