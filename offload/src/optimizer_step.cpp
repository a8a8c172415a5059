#include "zinf/offload/optimizer_step.hpp"

#include <oneapi/tbb/parallel_pipeline.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <numeric>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/io/aligned_buffer.hpp"

namespace zinf::offload {

namespace kc = kernels::cpu;
using Clock = std::chrono::steady_clock;

namespace {

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string s(v);
  if (s == "1") return true;
  if (s == "0") return false;
  throw Error("{}={}: use 0 or 1", name, s);
}

// Nanoseconds summed over threads.
class Timer {
 public:
  explicit Timer(std::atomic<std::int64_t>& sink) : sink_(sink), t0_(Clock::now()) {}
  ~Timer() { sink_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0_).count(); }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

 private:
  std::atomic<std::int64_t>& sink_;
  Clock::time_point t0_;
};

// A write-back that a later stage may have to wait for: the read stage before it reuses the
// staging buffer, the write stage before it reports the unit done, and the end of the step.
struct PendingWrite {
  std::mutex mu;
  io::SwapHandle handle;
  bool done = true;
  std::string error;

  void start(io::SwapHandle h) {
    std::lock_guard lock(mu);
    handle = std::move(h);
    done = false;
  }
  // Throws the write's error (every time it is asked).
  void wait() {
    std::lock_guard lock(mu);
    if (!done) {
      done = true;
      try {
        handle.wait();
      } catch (const Error& e) {
        error = e.what();
      }
    }
    if (!error.empty()) throw Error(error);
  }
};

}  // namespace

StepperOptions stepper_options_from_env() {
  StepperOptions o;
  o.overlap = env_flag("ZINF_OFFLOAD_OVERLAP", true);
  o.exact = env_flag("ZINF_OFFLOAD_EXACT", false);
  if (const char* io = std::getenv("ZINF_OFFLOAD_IO"); io != nullptr && *io != '\0') {
    const std::string v(io);
    if (v != "phased" && v != "mixed") throw Error("ZINF_OFFLOAD_IO={}: use phased or mixed", v);
    o.phased = v == "phased";
  }
  return o;
}

// ---------------------------------------------------------------------------------------------

StepFeed::StepFeed(std::size_t units) : grads_(units, nullptr) {}

void StepFeed::post_gradient(std::size_t unit, const void* grad) {
  ZINF_ASSERT(unit < grads_.size() && grad != nullptr);
  {
    std::lock_guard lock(mu_);
    grads_[unit] = grad;
  }
  cv_.notify_all();
}

void StepFeed::post_grad_scale(float scale) {
  {
    std::lock_guard lock(mu_);
    scale_ = scale;
    have_scale_ = true;
  }
  cv_.notify_all();
}

void StepFeed::fail(const std::string& why) {
  {
    std::lock_guard lock(mu_);
    if (failure_.empty()) failure_ = why.empty() ? std::string("the gradient source failed") : why;
  }
  cv_.notify_all();
}

const void* StepFeed::gradient(std::size_t unit) {
  std::unique_lock lock(mu_);
  if (unit >= grads_.size()) throw Error("optimizer step: no gradient slot for unit {}", unit);
  cv_.wait(lock, [&] { return grads_[unit] != nullptr || !failure_.empty(); });
  if (!failure_.empty()) throw Error("optimizer step stopped: {}", failure_);
  return grads_[unit];
}

float StepFeed::grad_scale() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return have_scale_ || !failure_.empty(); });
  if (!failure_.empty()) throw Error("optimizer step stopped: {}", failure_);
  return scale_;
}

void StepFeed::reset() {
  std::lock_guard lock(mu_);
  std::fill(grads_.begin(), grads_.end(), nullptr);
  have_scale_ = false;
  failure_.clear();
}

void StepInputs::feed_from(StepFeed& feed) {
  gradient = [&feed](std::size_t unit) { return feed.gradient(unit); };
  grad_scale = [&feed] { return feed.grad_scale(); };
}

// ---------------------------------------------------------------------------------------------

OptimizerStepper::OptimizerStepper(PartitionStore& store, tbb::task_arena& arena, StepperOptions options)
    : store_(store), arena_(arena), options_(options) {}

StepStats OptimizerStepper::step(const StepInputs& in) {
  if (!failed_.empty()) {
    throw Error("an earlier optimizer step failed ({}); the optimizer state is partly updated: restart from the "
                "last checkpoint",
                failed_);
  }
  const auto t0 = Clock::now();
  const auto& units = store_.units();
  if (store_.frozen()) throw Error("optimizer step: the partition store is frozen (parameters only)");
  if (!in.gradient) throw Error("optimizer step: no gradient source given");
  std::vector<std::size_t> order = in.order;
  if (order.empty()) {
    order.resize(units.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
  }
  // Slices in stepping order, and the last slice of every unit.
  std::vector<const Slice*> work;
  std::vector<std::size_t> first_of_unit(units.size(), SIZE_MAX), last_of_unit(units.size(), SIZE_MAX);
  {
    std::vector<std::vector<const Slice*>> by_unit(units.size());
    for (const Slice& s : store_.slices()) by_unit[s.unit].push_back(&s);
    for (std::size_t u : order) {
      if (u >= units.size()) throw Error("optimizer step: unit {} does not exist ({} units)", u, units.size());
      if (first_of_unit[u] != SIZE_MAX) throw Error("optimizer step: unit {} is listed twice in the order", u);
      first_of_unit[u] = work.size();
      work.insert(work.end(), by_unit[u].begin(), by_unit[u].end());
      last_of_unit[u] = work.size() - 1;
    }
  }
  kc::Exec exec(kc::active_isa(), &arena_);
  exec.native_bf16 = !options_.exact;
  io::SwapStore* opt_swap = store_.optimizer_swap();
  io::SwapStore* param_swap = store_.param_swap();
  const std::uint64_t state_bytes = store_.optimizer_state_bytes();
  const std::size_t gsize = kc::dtype_bytes(in.grad_dtype);

  struct Token {
    std::size_t index = 0;
    const Slice* slice = nullptr;
    int buffer = -1;
    io::SwapHandle read;
    bool read_waited = false;
  };
  std::vector<Token> tokens(work.size());
  // Writes of token i: state at 2i, parameters at 2i+1.
  std::unique_ptr<PendingWrite[]> writes(new PendingWrite[2 * work.size() + 1]);
  std::mutex buffer_mu;
  std::vector<int> free_buffers;
  std::vector<std::ptrdiff_t> last_user(store_.optimizer_buffer_count(), -1);
  for (int b = static_cast<int>(store_.optimizer_buffer_count()) - 1; b >= 0; --b) free_buffers.push_back(b);
  std::size_t next = 0;
  std::once_flag scale_once;
  float scale = in.adam.grad_scale;
  std::atomic<std::int64_t> kernel_ns{0}, read_ns{0}, write_ns{0}, input_ns{0};
  StepStats stats;

  // 1. read: a staging buffer (once its previous write-back is done) and the NVMe state into it.
  // Null once every slice has been handed out.
  auto read_next = [&]() -> Token* {
    if (next == work.size()) return nullptr;
    Token& t = tokens[next];
    t.index = next;
    t.slice = work[next];
    ++next;
    if (!store_.needs_staging(*t.slice)) return &t;
    std::ptrdiff_t previous = -1;
    {
      std::lock_guard lock(buffer_mu);
      ZINF_ASSERT(!free_buffers.empty(), "more live tokens than staging buffers");
      t.buffer = free_buffers.back();
      free_buffers.pop_back();
      previous = std::exchange(last_user[static_cast<std::size_t>(t.buffer)], static_cast<std::ptrdiff_t>(t.index));
    }
    if (previous >= 0) {
      Timer timer(write_ns);
      writes[2 * static_cast<std::size_t>(previous)].wait();
      writes[2 * static_cast<std::size_t>(previous) + 1].wait();
    }
    if (t.slice->state_tier == Tier::kNvme) {
      t.read = opt_swap->read(t.slice->state_id, {store_.optimizer_buffer(static_cast<std::size_t>(t.buffer)), state_bytes});
    }
    return &t;
  };

  // 2. step: the fused host step once the state, the gradient and the scale are there.
  auto step_stage = [&](Token* t) -> Token* {
    const Slice& s = *t->slice;
    const std::uint64_t len = s.size();
    std::byte* staging = t->buffer >= 0 ? store_.optimizer_buffer(static_cast<std::size_t>(t->buffer)) : nullptr;
    float* state = s.host_state;
    if (s.state_tier == Tier::kNvme) {
      Timer timer(read_ns);
      t->read_waited = true;
      t->read.wait();  // checksums verified here, before the data is used
      state = reinterpret_cast<float*>(staging);
    }
    const std::byte* grad = nullptr;
    {
      Timer timer(input_ns);
      grad = static_cast<const std::byte*>(in.gradient(s.unit));
      if (in.grad_scale) std::call_once(scale_once, [&] { scale = in.grad_scale(); });
    }
    if (grad == nullptr) throw Error("optimizer step: no gradient for '{}'", units[s.unit].name);
    std::uint16_t* out = s.param_tier == Tier::kNvme ? reinterpret_cast<std::uint16_t*>(staging + state_bytes)
                                                    : store_.host_params(s.unit) + s.begin;
    kc::AdamConfig cfg = in.adam;
    cfg.grad_scale = scale;
    Timer timer(kernel_ns);
    kc::adam_step(cfg,
                  {state, grad + s.begin * gsize, in.grad_dtype, state + len, state + 2 * len, kc::DType::kF32, out,
                   kc::DType::kBF16, len},
                  exec);
    return t;
  };

  // 3. write: start the write-backs, hand the buffer on, report finished units.
  auto write_stage = [&](Token* t) {
    const Slice& s = *t->slice;
    const std::uint64_t len = s.size();
    PendingWrite& state_write = writes[2 * t->index];
    PendingWrite& param_write = writes[2 * t->index + 1];
    if (t->buffer >= 0) {
      std::byte* staging = store_.optimizer_buffer(static_cast<std::size_t>(t->buffer));
      if (s.state_tier == Tier::kNvme) {
        state_write.start(opt_swap->write(s.state_id, {staging, state_bytes}));
        stats.bytes_read += len * 12;
        stats.bytes_written += len * 12;
      }
      if (s.param_tier == Tier::kNvme) {
        param_write.start(param_swap->write(s.param_id, {staging + state_bytes, io::round_up(len * 2, io::kIoAlignment)}));
        stats.bytes_written += len * 2;
      }
      if (!options_.overlap) {
        Timer timer(write_ns);
        state_write.wait();
        param_write.wait();
      }
      std::lock_guard lock(buffer_mu);
      free_buffers.push_back(t->buffer);
    }
    stats.elements += len;
    ++stats.slices;
    if (t->index == last_of_unit[s.unit]) {
      if (s.param_tier == Tier::kNvme) {
        Timer timer(write_ns);
        for (std::size_t i = first_of_unit[s.unit]; i <= t->index; ++i) writes[2 * i + 1].wait();
      }
      if (in.unit_done) in.unit_done(s.unit);
    }
  };

  // Every write is waited (the swap store needs it before the next read of the tensor); the first
  // error is the one reported.
  auto wait_all_writes = [&]() -> std::string {
    std::string first;
    for (std::size_t i = 0; i < 2 * work.size(); ++i) {
      try {
        writes[i].wait();
      } catch (const Error& e) {
        if (first.empty()) first = e.what();
      }
    }
    return first;
  };

  const std::size_t live =
      options_.overlap ? std::max<std::size_t>(1, store_.optimizer_buffer_count() > 0 ? store_.optimizer_buffer_count()
                                                                                      : store_.options().optimizer_buffers)
                       : 1;
  auto read_stage = [&](tbb::flow_control& fc) -> Token* {
    Token* t = read_next();
    if (t == nullptr) fc.stop();
    return t;
  };
  // Phased I/O: batches of as many staged slices as there are buffers. All reads of a batch are in
  // flight while its slices step (each as soon as its read lands), then all its write-backs go
  // out, and the next batch's reads start once they are done: the drive sees runs of reads and
  // runs of writes instead of both at once.
  auto run_phased = [&] {
    const std::size_t buffers = std::max<std::size_t>(1, store_.optimizer_buffer_count());
    std::vector<Token*> batch;
    for (;;) {
      batch.clear();
      std::size_t staged = 0;
      while (next < work.size() && !(store_.needs_staging(*work[next]) && staged == buffers)) {
        Token* t = read_next();
        ZINF_ASSERT(t != nullptr);
        if (t->buffer >= 0) ++staged;
        batch.push_back(t);
      }
      if (batch.empty()) return;
      for (Token* t : batch) step_stage(t);
      for (Token* t : batch) write_stage(t);
    }
  };
  try {
    arena_.execute([&] {
      if (options_.phased && options_.overlap) {
        run_phased();
        return;
      }
      tbb::parallel_pipeline(live,
                             tbb::make_filter<void, Token*>(tbb::filter_mode::serial_in_order, read_stage) &
                                 tbb::make_filter<Token*, Token*>(tbb::filter_mode::parallel, step_stage) &
                                 tbb::make_filter<Token*, void>(tbb::filter_mode::serial_in_order, write_stage));
    });
    const std::string write_error = wait_all_writes();
    if (!write_error.empty()) throw Error(write_error);
  } catch (const std::exception& e) {
    // Reads started for slices that never reached the step must finish before their staging
    // buffers can be reused; their own errors are secondary to the one being reported.
    for (Token& t : tokens) {
      if (t.read.valid() && !t.read_waited) {
        try {
          t.read.wait();
        } catch (const Error&) {
        }
      }
    }
    (void)wait_all_writes();
    failed_ = e.what();
    throw;
  }
  stats.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  stats.kernel_seconds = static_cast<double>(kernel_ns.load()) * 1e-9;
  stats.read_wait_seconds = static_cast<double>(read_ns.load()) * 1e-9;
  stats.write_wait_seconds = static_cast<double>(write_ns.load()) * 1e-9;
  stats.input_wait_seconds = static_cast<double>(input_ns.load()) * 1e-9;
  return stats;
}

}  // namespace zinf::offload
