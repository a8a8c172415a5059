#include "zinf/offload/partition_store.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <tuple>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/configs/summary.hpp"
#include "zinf/io/aligned_buffer.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/offload/placement.hpp"

namespace zinf::offload {

namespace kc = kernels::cpu;

namespace {

constexpr std::uint64_t kPage = 4096;

std::uint64_t page_round(std::uint64_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }

std::string human(std::uint64_t n) { return config::human_count(static_cast<std::int64_t>(n)); }

// Hands out consecutive 4 KiB-aligned pieces of one block.
class Carver {
 public:
  explicit Carver(HostBuffer& block) : next_(block.data()), end_(block.data() + block.size()) {}
  std::byte* take(std::uint64_t bytes) {
    std::byte* p = next_;
    next_ += page_round(bytes);
    ZINF_ASSERT(next_ <= end_, "host memory block carved past its end");
    return p;
  }

 private:
  std::byte* next_;
  std::byte* end_;
};

}  // namespace

const char* tier_name(Tier tier) { return tier == Tier::kHost ? "host" : "nvme"; }

// ---------------------------------------------------------------------------------------------

PartitionStore::PartitionStore(std::vector<UnitSpec> units, StoreOptions options, HostMemory& memory,
                               io::SwapStore* optimizer_swap, io::SwapStore* param_swap)
    : units_(std::move(units)), options_(options), memory_(memory), opt_swap_(optimizer_swap), param_swap_(param_swap) {
  // Which elements of each unit live where (placement.cpp, which zinf plan also calls), checked
  // against the host memory before anything is allocated.
  Placement placed = place_units(units_, options_);
  if (options_.nvme_ratio > 0.0 && opt_swap_ == nullptr) {
    throw Error("optimizer state is to go to NVMe (ratio {}), but no swap store was given: set "
                "offload_optimizer.nvme_path",
                options_.nvme_ratio);
  }
  if (options_.params_on_nvme && param_swap_ == nullptr) {
    throw Error("parameters are to go to NVMe, but no swap store was given: set offload_param.nvme_path");
  }
  slice_elems_ = placed.slice_elems;
  slices_ = std::move(placed.slices);
  unit_param_tier_ = std::move(placed.param_tier);
  total_elems_ = placed.total_elems;
  nvme_state_elems_ = placed.nvme_state_elems;
  nvme_param_elems_ = placed.nvme_param_elems;
  opt_state_bytes_ = placed.opt_state_bytes;
  param_staging_elems_ = placed.param_staging_elems;
  const std::uint64_t host_state_bytes = placed.host_state_bytes, host_param_bytes = placed.host_param_bytes;
  const std::uint64_t opt_staging_each = placed.opt_staging_each, param_staging_each = placed.param_staging_each;
  const unsigned opt_buffers = placed.opt_buffers, param_buffers = placed.param_buffers;
  memory_.preflight(placed.host_plan(options_));
  std::vector<io::TensorSpec> state_specs, param_specs;
  for (const Slice& sl : slices_) {
    const std::string& name = units_[sl.unit].name;
    if (!options_.frozen && sl.state_tier == Tier::kNvme) {
      state_specs.push_back({fmt::format("{}.optimizer[{}:{}]", name, sl.begin, sl.end), sl.size() * 12});
    }
    if (sl.param_tier == Tier::kNvme) {
      param_specs.push_back({fmt::format("{}.params[{}:{}]", name, sl.begin, sl.end), sl.size() * 2});
    }
  }

  // Swap space: all or nothing, per store (a store shared by both gets one batch).
  std::vector<io::TensorId> state_ids, param_ids;
  if (!state_specs.empty() && opt_swap_ == param_swap_ && !param_specs.empty()) {
    std::vector<io::TensorSpec> all = state_specs;
    all.insert(all.end(), param_specs.begin(), param_specs.end());
    const auto ids = opt_swap_->allocate(all);
    state_ids.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(state_specs.size()));
    param_ids.assign(ids.begin() + static_cast<std::ptrdiff_t>(state_specs.size()), ids.end());
  } else {
    if (!state_specs.empty()) state_ids = opt_swap_->allocate(state_specs);
    if (!param_specs.empty()) param_ids = param_swap_->allocate(param_specs);
  }

  // Host memory: one block per purpose, carved into 4 KiB-aligned pieces.
  blocks_.reserve(3);  // the references below must survive the next emplace_back
  HostBuffer& state_block = blocks_.emplace_back(
      memory_.allocate(Purpose::kOptimizerState, host_state_bytes, "host-resident optimizer state"));
  HostBuffer& param_block =
      blocks_.emplace_back(memory_.allocate(Purpose::kParameters, host_param_bytes, "host bf16 parameter shards"));
  HostBuffer& staging_block = blocks_.emplace_back(
      memory_.allocate(Purpose::kStaging, opt_staging_each * opt_buffers + param_staging_each * param_buffers,
                       "optimizer and parameter staging buffers"));
  Carver state_carver(state_block), param_carver(param_block), staging_carver(staging_block);
  // Swap ids come back in the order the specs were planned: slice order.
  std::size_t next_state = 0, next_param = 0;
  for (Slice& s : slices_) {
    if (options_.frozen) {
      // parameters only
    } else if (s.state_tier == Tier::kNvme) {
      s.state_id = state_ids[next_state++];
    } else {
      s.host_state = reinterpret_cast<float*>(state_carver.take(s.size() * 12));
    }
    if (s.param_tier == Tier::kNvme) s.param_id = param_ids[next_param++];
  }
  ZINF_ASSERT(next_state == state_ids.size() && next_param == param_ids.size());
  host_params_.assign(units_.size(), nullptr);
  for (std::size_t u = 0; u < units_.size(); ++u) {
    if (unit_param_tier_[u] == Tier::kHost) {
      host_params_[u] = reinterpret_cast<std::uint16_t*>(param_carver.take(units_[u].numel * 2));
    }
  }
  std::vector<std::span<std::byte>> staging_spans;
  for (unsigned i = 0; i < opt_buffers; ++i) {
    opt_staging_.push_back(staging_carver.take(opt_staging_each));
    staging_spans.emplace_back(opt_staging_.back(), opt_staging_each);
  }
  for (unsigned i = 0; i < param_buffers; ++i) {
    param_staging_.push_back(reinterpret_cast<std::uint16_t*>(staging_carver.take(param_staging_each)));
    staging_spans.emplace_back(reinterpret_cast<std::byte*>(param_staging_.back()), param_staging_each);
    free_param_buffers_.push_back(static_cast<int>(param_buffers - 1 - i));
  }
  // Fixed-buffer I/O where the kernel allows: all staging buffers in one registration per engine
  // (a registration replaces the previous one). A refusal (memlock) is said once; I/O goes on.
  if (!staging_spans.empty()) {
    std::vector<io::IoEngine*> engines;
    for (io::SwapStore* s : {opt_swap_, param_swap_}) {
      if (s != nullptr && std::find(engines.begin(), engines.end(), &s->engine()) == engines.end()) {
        engines.push_back(&s->engine());
      }
    }
    for (io::IoEngine* e : engines) {
      const io::Registration reg = e->register_buffers(staging_spans);
      if (!reg.ok) spdlog::warn("offload staging buffers are not registered with io_uring: {}", reg.reason);
    }
  }
}

PartitionStore::~PartitionStore() {
  // The engines must not keep pointers into buffers that are about to be freed.
  for (io::SwapStore* s : {opt_swap_, param_swap_}) {
    if (s != nullptr && s->engine().buffers_registered()) s->engine().unregister_buffers();
  }
}

std::string PartitionStore::describe() const {
  const std::uint64_t host_state = total_elems_ - nvme_state_elems_;
  if (options_.frozen) {
    return fmt::format("{} units, {} frozen elements (no optimizer state); bf16 parameters: {} host, {} nvme; staging: "
                       "{} parameter buffer(s)",
                       units_.size(), human(total_elems_), human(total_elems_ - nvme_param_elems_),
                       human(nvme_param_elems_), param_staging_.size());
  }
  return fmt::format(
      "{} units, {} elements in {} slices of up to {}; optimizer state: {} host, {} nvme; bf16 parameters: {} "
      "host, {} nvme; staging: {} optimizer buffer(s), {} parameter buffer(s)",
      units_.size(), human(total_elems_), slices_.size(), human(slice_elems_), human(host_state),
      human(nvme_state_elems_), human(total_elems_ - nvme_param_elems_), human(nvme_param_elems_),
      opt_staging_.size(), param_staging_.size());
}

std::vector<const Slice*> PartitionStore::unit_slices(std::size_t unit) const {
  if (unit >= units_.size()) throw Error("unit {} does not exist ({} units)", unit, units_.size());
  std::vector<const Slice*> out;
  for (const Slice& s : slices_) {
    if (s.unit == unit) out.push_back(&s);
  }
  return out;
}

void PartitionStore::set_state(std::size_t unit, std::span<const float> master, std::span<const float> exp_avg,
                               std::span<const float> exp_avg_sq) {
  const auto slices = unit_slices(unit);
  const std::uint64_t n = units_[unit].numel;
  if (master.size() != n) {
    throw Error("setting the state of '{}': {} master values given for a shard of {}", units_[unit].name,
                master.size(), n);
  }
  const bool moments = !exp_avg.empty() || !exp_avg_sq.empty();
  if (options_.frozen && moments) {
    throw Error("setting the state of '{}': the store is frozen (parameters only), it keeps no moments", units_[unit].name);
  }
  if (moments && (exp_avg.size() != n || exp_avg_sq.size() != n)) {
    throw Error("setting the state of '{}': exp_avg has {} and exp_avg_sq {} values for a shard of {}",
                units_[unit].name, exp_avg.size(), exp_avg_sq.size(), n);
  }
  // NVMe slices go through the staging buffers, round-robin, with one state and one parameter
  // write in flight per buffer; every write is waited before this returns.
  std::vector<std::byte*> stage;
  if (options_.frozen) {
    for (std::uint16_t* p : param_staging_) stage.push_back(reinterpret_cast<std::byte*>(p));
  } else {
    stage = opt_staging_;
  }
  std::vector<io::SwapHandle> writes(2 * stage.size());
  std::size_t next_buffer = 0;
  auto wait_all = [&](bool rethrow) {
    std::string first;
    for (io::SwapHandle& h : writes) {
      try {
        h.wait();
      } catch (const Error& e) {
        if (first.empty()) first = e.what();
      }
      h = io::SwapHandle();
    }
    if (rethrow && !first.empty()) throw Error(first);
  };
  try {
    for (const Slice* s : slices) {
      const std::uint64_t len = s->size();
      std::byte* staging = nullptr;
      std::size_t b = 0;
      if (needs_staging(*s)) {
        b = next_buffer++ % stage.size();
        writes[2 * b].wait();  // the buffer's previous writes
        writes[2 * b + 1].wait();
        staging = stage[b];
      }
      float* dst = s->state_tier == Tier::kNvme ? reinterpret_cast<float*>(staging) : s->host_state;
      if (options_.frozen) {
        // parameters only
      } else if (std::memcpy(dst, master.data() + s->begin, len * 4); moments) {
        std::memcpy(dst + len, exp_avg.data() + s->begin, len * 4);
        std::memcpy(dst + 2 * len, exp_avg_sq.data() + s->begin, len * 4);
      } else {
        std::memset(dst + len, 0, len * 8);
      }
      std::uint16_t* bf16 = s->param_tier == Tier::kNvme ? reinterpret_cast<std::uint16_t*>(staging + opt_state_bytes_)
                                                         : host_params_[unit] + s->begin;
      kc::convert(master.data() + s->begin, kc::DType::kF32, bf16, kc::DType::kBF16, len);
      if (s->state_tier == Tier::kNvme) writes[2 * b] = opt_swap_->write(s->state_id, {staging, opt_state_bytes_});
      if (s->param_tier == Tier::kNvme) {
        writes[2 * b + 1] = param_swap_->write(
            s->param_id, {staging + opt_state_bytes_, io::round_up(len * 2, io::kIoAlignment)});
      }
    }
  } catch (...) {
    wait_all(false);
    throw;
  }
  wait_all(true);
}

void PartitionStore::read_state(std::size_t unit, std::span<float> master, std::span<float> exp_avg,
                                std::span<float> exp_avg_sq) {
  const auto slices = unit_slices(unit);
  const std::uint64_t n = units_[unit].numel;
  if (options_.frozen) {
    throw Error("reading the state of '{}': the store is frozen (parameters only) and has no optimizer state",
                units_[unit].name);
  }
  if (master.size() != n || exp_avg.size() != n || exp_avg_sq.size() != n) {
    throw Error("reading the state of '{}': the output spans must hold {} elements", units_[unit].name, n);
  }
  for (const Slice* s : slices) {
    const std::uint64_t len = s->size();
    io::AlignedBuffer buf;
    const float* src = s->host_state;
    if (s->state_tier == Tier::kNvme) {
      buf = io::AlignedBuffer(opt_swap_->buffer_bytes(s->state_id));
      opt_swap_->read(s->state_id, buf.span()).wait();
      src = reinterpret_cast<const float*>(buf.data());
    }
    std::memcpy(master.data() + s->begin, src, len * 4);
    std::memcpy(exp_avg.data() + s->begin, src + len, len * 4);
    std::memcpy(exp_avg_sq.data() + s->begin, src + 2 * len, len * 4);
  }
}

ParamLease PartitionStore::fetch(std::size_t unit) { return *start_fetch(unit, true); }

std::optional<ParamLease> PartitionStore::try_fetch(std::size_t unit) { return start_fetch(unit, false); }

std::optional<ParamLease> PartitionStore::start_fetch(std::size_t unit, bool wait) {
  const auto slices = unit_slices(unit);
  ParamLease lease;
  lease.store_ = this;
  if (unit_param_tier_[unit] == Tier::kHost) {
    lease.pieces_.push_back({host_params_[unit], 0, units_[unit].numel});
    lease.waited_ = true;
    return lease;
  }
  {
    std::unique_lock lock(param_mu_);
    const auto enough = [&] { return free_param_buffers_.size() >= slices.size(); };
    if (!wait && !enough()) return std::nullopt;
    param_cv_.wait(lock, enough);
    for (std::size_t i = 0; i < slices.size(); ++i) {
      lease.buffers_.push_back(free_param_buffers_.back());
      free_param_buffers_.pop_back();
    }
  }
  for (std::size_t i = 0; i < slices.size(); ++i) {
    const Slice& s = *slices[i];
    std::uint16_t* buf = param_staging_[static_cast<std::size_t>(lease.buffers_[i])];
    lease.pieces_.push_back({buf, s.begin, s.size()});
    lease.reads_.push_back(param_swap_->read(
        s.param_id, {reinterpret_cast<std::byte*>(buf), io::round_up(s.size() * 2, io::kIoAlignment)}));
  }
  return lease;
}

void PartitionStore::give_back(const std::vector<int>& buffers) noexcept {
  {
    std::lock_guard lock(param_mu_);
    free_param_buffers_.insert(free_param_buffers_.end(), buffers.begin(), buffers.end());
  }
  param_cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------

ParamLease::~ParamLease() { release(); }

ParamLease::ParamLease(ParamLease&& o) noexcept
    : store_(std::exchange(o.store_, nullptr)),
      pieces_(std::move(o.pieces_)),
      buffers_(std::move(o.buffers_)),
      reads_(std::move(o.reads_)),
      waited_(o.waited_),
      error_(std::move(o.error_)) {}

ParamLease& ParamLease::operator=(ParamLease&& o) noexcept {
  if (this != &o) {
    release();
    store_ = std::exchange(o.store_, nullptr);
    pieces_ = std::move(o.pieces_);
    buffers_ = std::move(o.buffers_);
    reads_ = std::move(o.reads_);
    waited_ = o.waited_;
    error_ = std::move(o.error_);
  }
  return *this;
}

void ParamLease::wait() {
  if (waited_) {
    if (!error_.empty()) throw Error(error_);
    return;
  }
  // Every read is waited, even after one fails, so no buffer is given back with I/O in flight.
  std::string first_error;
  for (io::SwapHandle& h : reads_) {
    try {
      h.wait();
    } catch (const Error& e) {
      if (first_error.empty()) first_error = e.what();
    }
  }
  reads_.clear();
  waited_ = true;
  if (!first_error.empty()) {
    pieces_.clear();  // the data must not be used
    error_ = first_error;
    throw Error(first_error);
  }
}

void ParamLease::copy_to(std::span<std::uint16_t> out) {
  wait();
  for (const Piece& p : pieces_) {
    ZINF_ASSERT(p.begin + p.count <= out.size(), "parameter lease larger than the output");
    std::memcpy(out.data() + p.begin, p.data, p.count * 2);
  }
}

void ParamLease::release() noexcept {
  for (io::SwapHandle& h : reads_) {
    try {
      h.wait();
    } catch (const Error&) {  // reported by wait() to whoever asked; here only the buffers matter
    }
  }
  reads_.clear();
  if (store_ != nullptr && !buffers_.empty()) store_->give_back(buffers_);
  buffers_.clear();
  pieces_.clear();
  store_ = nullptr;
}

}  // namespace zinf::offload
