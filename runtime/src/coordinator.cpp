// The stage-3 parameter coordinator (coordinator.hpp).
#include "zinf/runtime/coordinator.hpp"

#include <algorithm>

#include "zinf/common/error.hpp"

namespace zinf::runtime {

using Clock = std::chrono::steady_clock;

ParamCoordinator::ParamCoordinator(Backend& backend, const ModelLayout& layout, DType dtype, CoordinatorOptions options,
                                   Gather gather)
    : backend_(backend), layout_(layout), dtype_(dtype), o_(options), gather_(std::move(gather)) {
  if (o_.max_live < 0 || o_.prefetch_bucket < 0 || o_.max_reuse_distance < 0 || o_.persistence_threshold < 0) {
    throw Error("stage-3 budgets must not be negative (max_live_parameters {}, prefetch_bucket_size {}, "
                "max_reuse_distance {}, param_persistence_threshold {})",
                o_.max_live, o_.prefetch_bucket, o_.max_reuse_distance, o_.persistence_threshold);
  }
  const std::size_t n = layout.units.size();
  units_.resize(n);
  adopted_.assign(n, false);
  view_.dtype = dtype;
  view_.units.assign(n, nullptr);
  for (const UnitLayout& u : layout.units) numel_.push_back(u.numel);
  if (!o_.gather_elements.empty()) {
    ZINF_ASSERT(o_.gather_elements.size() == n, "coordinator: gather_elements for {} of {} units",
                o_.gather_elements.size(), n);
    for (std::size_t u = 0; u < n; ++u) {
      ZINF_ASSERT(o_.gather_elements[u] >= numel_[u], "coordinator: unit {} gathers fewer elements than it has", u);
      numel_[u] = o_.gather_elements[u];
    }
  }
  persistent_.assign(n, false);
  plan_units();
  thread_ = std::thread([this] { worker(); });
}

ParamCoordinator::~ParamCoordinator() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::vector<std::vector<std::size_t>> ParamCoordinator::training_schedule(std::size_t units, std::int64_t micro_batches,
                                                                         const Reads& forward_reads,
                                                                         const Reads& backward_reads) {
  std::vector<std::vector<std::size_t>> uses;
  for (std::int64_t m = 0; m < micro_batches; ++m) {
    for (std::size_t u = 0; u < units; ++u) uses.push_back(forward_reads(u));
    for (std::size_t u = units; u-- > 0;) uses.push_back(backward_reads(u));
  }
  return uses;
}

std::vector<std::vector<std::size_t>> ParamCoordinator::forward_schedule(
    std::size_t units, const std::function<std::vector<std::size_t>(std::size_t)>& reads) {
  std::vector<std::vector<std::size_t>> uses;
  for (std::size_t u = 0; u < units; ++u) uses.push_back(reads(u));
  return uses;
}

void ParamCoordinator::begin(std::vector<std::vector<std::size_t>> uses) {
  std::unique_lock lock(mu_);
  ZINF_ASSERT(ahead_ == 0 && in_flight_ == 0, "coordinator: a pass began before the previous one ended");
  for (const auto& use : uses) {
    for (const std::size_t u : use) ZINF_ASSERT(u < units_.size(), "coordinator: unit {} out of range", u);
  }
  uses_ = std::move(uses);
  trace_.assign(uses_.size() + 1, 0);
  for (std::size_t i = 0; i < uses_.size(); ++i) {
    std::int64_t e = 0;
    for (const std::size_t u : uses_[i]) e += numel_[u];
    trace_[i + 1] = trace_[i] + e;
  }
  // The first uses' units start coming in at once, within the budgets.
  prefetch_from(0, lock);
}

void ParamCoordinator::note_live() {
  stats_.live_high_water = std::max(stats_.live_high_water, live_);
  stats_.ahead_high_water = std::max(stats_.ahead_high_water, ahead_);
}

void ParamCoordinator::request(std::size_t u, std::unique_lock<std::mutex>&) {
  Unit& unit = units_[u];
  const auto bytes = static_cast<std::size_t>(numel_[u]) * kernels::cpu::dtype_bytes(dtype_);
  if (unit.buffer.data() == nullptr) {
    auto it = pool_.find(bytes);
    if (it != pool_.end() && !it->second.empty()) {
      unit.buffer = std::move(it->second.back().buffer);
      unit.reuse_after = std::move(it->second.back().freed);
      it->second.pop_back();
      cached_ -= numel_[u];
    } else {
      unit.buffer = DeviceBuffer(backend_, bytes);  // may throw: nothing has changed yet
      // Cached buffers of other sizes give way, so live + cached stays within the bound.
      for (auto it2 = pool_.begin(); it2 != pool_.end() && live_ + counted(u) + cached_ > o_.max_live + largest_;) {
        auto& list = it2->second;
        while (!list.empty() && live_ + counted(u) + cached_ > o_.max_live + largest_) {
          cached_ -= static_cast<std::int64_t>(list.back().buffer.bytes() / kernels::cpu::dtype_bytes(dtype_));
          list.pop_back();
        }
        it2 = list.empty() ? pool_.erase(it2) : std::next(it2);
      }
    }
  }
  unit.state = State::kInFlight;
  live_ += counted(u);
  ++in_flight_;
  ++stats_.gathers;
  stats_.gathered_elements += static_cast<std::uint64_t>(numel_[u]);
  queue_.push_back(Item{u, {}});
  note_live();
  cv_.notify_all();
}

void ParamCoordinator::free_unit(std::size_t u) {
  Unit& unit = units_[u];
  ZINF_ASSERT(unit.state == State::kResident, "coordinator: freeing unit {} that is not resident", u);
  unit.state = State::kEmpty;
  view_.units[u] = nullptr;
  live_ -= counted(u);
  // Kept for reuse while live + cached stays within the budget plus one unit.
  if (live_ + cached_ + numel_[u] <= o_.max_live + largest_) {
    cached_ += numel_[u];
    pool_[unit.buffer.bytes()].push_back({std::move(unit.buffer), backend_.record(Stream::kCompute)});
  } else {
    unit.buffer = DeviceBuffer();
  }
}

void ParamCoordinator::prefetch_from(std::size_t first, std::unique_lock<std::mutex>& lock) {
  if (o_.prefetch_bucket == 0) return;
  for (std::size_t j = first; j < uses_.size(); ++j) {
    for (const std::size_t u : uses_[j]) {
      if (units_[u].state != State::kEmpty) continue;
      const std::int64_t need = counted(u);
      // In schedule order: the first unit that does not fit stops the prefetch, so gathers are
      // always requested in the order they will be used. DeepSpeed's rule for the bucket: another
      // unit starts while fewer than prefetch_bucket elements are ahead, so the last one started
      // may pass it (a unit larger than the bucket is still fetched one ahead). The live budget
      // is never passed.
      if (ahead_ >= o_.prefetch_bucket || live_ + need > o_.max_live) return;
      request(u, lock);  // first: an allocation that fails leaves the counts as they were
      units_[u].prefetched = true;
      ahead_ += need;
      note_live();
    }
  }
}

void ParamCoordinator::wait_resident(std::size_t u, std::unique_lock<std::mutex>& lock) {
  if (units_[u].state == State::kResident && !error_) return;
  const auto t0 = Clock::now();
  cv_.wait(lock, [&] { return units_[u].state == State::kResident || error_ != nullptr; });
  stats_.wait_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  if (error_) std::rethrow_exception(error_);
}

const UnitBuffers& ParamCoordinator::acquire(std::size_t use) {
  std::unique_lock lock(mu_);
  ZINF_ASSERT(use < uses_.size(), "coordinator: use {} of a pass of {}", use, uses_.size());
  if (error_) std::rethrow_exception(error_);
  for (const std::size_t u : uses_[use]) {
    Unit& unit = units_[u];
    if (unit.state == State::kEmpty) {
      if (!persistent_[u]) ++stats_.misses;
      request(u, lock);
    } else if (!kept(u)) {
      ++stats_.hits;
    }
    if (unit.prefetched) {
      unit.prefetched = false;
      ahead_ -= counted(u);
    }
  }
  prefetch_from(use + 1, lock);
  for (const std::size_t u : uses_[use]) {
    if (adopted_[u]) continue;  // view_ points at the caller's buffer
    wait_resident(u, lock);
    view_.units[u] = units_[u].buffer.data();
  }
  return view_;
}

void ParamCoordinator::release(std::size_t use) {
  std::unique_lock lock(mu_);
  ZINF_ASSERT(use < uses_.size(), "coordinator: use {} of a pass of {}", use, uses_.size());
  for (const std::size_t u : uses_[use]) {
    if (kept(u) || units_[u].state != State::kResident) continue;
    std::size_t next = uses_.size();
    for (std::size_t j = use + 1; j < uses_.size() && next == uses_.size(); ++j) {
      if (std::find(uses_[j].begin(), uses_[j].end(), u) != uses_[j].end()) next = j;
    }
    const bool keep = next < uses_.size() && trace_[next] - trace_[use + 1] <= o_.max_reuse_distance &&
                      live_ <= o_.max_live;
    if (!keep) free_unit(u);
  }
}

void ParamCoordinator::wait_idle(std::unique_lock<std::mutex>& lock) {
  cv_.wait(lock, [&] { return in_flight_ == 0 || error_ != nullptr; });
}

void ParamCoordinator::end() {
  std::unique_lock lock(mu_);
  wait_idle(lock);
  if (error_) std::rethrow_exception(error_);
  for (std::size_t u = 0; u < units_.size(); ++u) {
    units_[u].prefetched = false;
    if (!kept(u) && units_[u].state == State::kResident) free_unit(u);
  }
  ahead_ = 0;
  uses_.clear();
}

void ParamCoordinator::invalidate() {
  std::unique_lock lock(mu_);
  wait_idle(lock);
  if (error_) std::rethrow_exception(error_);
  for (std::size_t u = 0; u < units_.size(); ++u) {
    if (units_[u].state == State::kResident && !adopted_[u]) {
      ZINF_ASSERT(persistent_[u], "coordinator: invalidate() inside a pass");
      units_[u].state = State::kEmpty;  // the buffer stays for the next gather, after compute has read it
      units_[u].reuse_after = backend_.record(Stream::kCompute);
      view_.units[u] = nullptr;
    }
  }
}

std::vector<bool> ParamCoordinator::persistent_units(const std::vector<std::int64_t>& elements,
                                                     const std::vector<bool>& adopted, std::int64_t persistence_threshold,
                                                     std::int64_t model_persistence_threshold) {
  std::vector<bool> keep(elements.size(), false);
  std::int64_t total = 0;
  for (std::size_t u = 0; u < elements.size(); ++u) {
    if (adopted[u]) continue;
    keep[u] = elements[u] <= persistence_threshold && total + elements[u] <= model_persistence_threshold;
    if (keep[u]) total += elements[u];
  }
  return keep;
}

void ParamCoordinator::plan_units() {
  // Small units stay gathered (persistent_units); the largest gathered unit bounds the buffers
  // kept for reuse. Adopted units take part in neither.
  persistent_ = persistent_units(numel_, adopted_, o_.persistence_threshold, o_.model_persistence_threshold);
  stats_.persistent_elements = 0;
  largest_ = 0;
  for (std::size_t u = 0; u < numel_.size(); ++u) {
    if (adopted_[u]) continue;
    if (persistent_[u]) stats_.persistent_elements += numel_[u];
    largest_ = std::max(largest_, numel_[u]);
  }
}

void ParamCoordinator::adopt(std::size_t u, void* buffer) {
  std::unique_lock lock(mu_);
  ZINF_ASSERT(u < units_.size() && buffer != nullptr, "coordinator: adopt({}) of {} units", u, units_.size());
  ZINF_ASSERT(uses_.empty() && units_[u].state == State::kEmpty, "coordinator: adopt() after unit {} was gathered", u);
  adopted_[u] = true;
  plan_units();
  stats_.adopted_elements += numel_[u];
  units_[u].state = State::kResident;
  units_[u].buffer = DeviceBuffer();
  view_.units[u] = buffer;
}

CoordinatorStats ParamCoordinator::take_stats() {
  std::lock_guard lock(mu_);
  CoordinatorStats s = stats_;
  stats_ = {};
  stats_.persistent_elements = s.persistent_elements;
  stats_.adopted_elements = s.adopted_elements;
  stats_.live_high_water = live_;
  stats_.ahead_high_water = ahead_;
  return s;
}

std::int64_t ParamCoordinator::live_elements() const {
  std::lock_guard lock(mu_);
  return live_;
}

std::int64_t ParamCoordinator::cached_elements() const {
  std::lock_guard lock(mu_);
  return cached_;
}

void ParamCoordinator::post(Task task) {
  {
    std::lock_guard lock(mu_);
    queue_.push_back(Item{kNone, std::move(task)});
  }
  cv_.notify_all();
}

void ParamCoordinator::worker() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Item item = std::move(queue_.front());
    queue_.pop_front();
    if (item.task) {
      const std::exception_ptr failed = error_;
      lock.unlock();
      item.task(failed);
      lock.lock();
      continue;
    }
    const std::size_t u = item.unit;
    std::size_t next = kNone;
    for (const Item& later : queue_) {
      if (!later.task) {
        next = later.unit;
        break;
      }
    }
    if (error_) {  // after a failure nothing more is gathered; waiters see the error
      --in_flight_;
      cv_.notify_all();
      continue;
    }
    void* dst = units_[u].buffer.data();
    const std::shared_ptr<Backend::Event> reuse_after = std::move(units_[u].reuse_after);
    lock.unlock();
    std::exception_ptr err;
    try {
      if (reuse_after) backend_.wait(Stream::kHostToDevice, *reuse_after);
      gather_(u, dst, next);
    } catch (...) {
      err = std::current_exception();
    }
    lock.lock();
    if (err) {
      error_ = err;
    } else {
      units_[u].state = State::kResident;
    }
    --in_flight_;
    cv_.notify_all();
  }
}

}  // namespace zinf::runtime
