// Parameters from the store to the compute device: see param_gather.hpp.
#include "param_gather.hpp"

#include <algorithm>
#include <cstring>

#include "zinf/common/error.hpp"
#include "zinf/kernels/half.hpp"

namespace zinf::runtime {

using kernels::cpu::DType;

// ---- UnitVersions

void UnitVersions::reset(std::size_t units, std::int64_t applied) {
  if (!enabled_) return;
  std::lock_guard lock(mu_);
  steps_.assign(units, applied);
  needed_ = applied;
}

void UnitVersions::require(std::int64_t applied) {
  if (!enabled_) return;
  std::lock_guard lock(mu_);
  needed_ = applied;
}

void UnitVersions::stepped(std::size_t u) {
  std::lock_guard lock(mu_);
  ++steps_[u];
  cv_.notify_all();
}

void UnitVersions::fail(const std::string& why) {
  std::lock_guard lock(mu_);
  if (error_.empty()) error_ = why;
  cv_.notify_all();
}

bool UnitVersions::ready(std::size_t u) {
  if (!enabled_) return true;
  std::lock_guard lock(mu_);
  return steps_.empty() || steps_[u] >= needed_;
}

void UnitVersions::wait(std::size_t u, const std::string& name) {
  if (!enabled_) return;
  std::unique_lock lock(mu_);
  if (steps_.empty()) return;
  cv_.wait(lock, [&] { return steps_[u] >= needed_ || !error_.empty(); });
  if (steps_[u] < needed_) throw Error("the parameters of {} were not updated: {}", name, error_);
}

std::size_t UnitVersions::behind(std::size_t first, std::int64_t applied) {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (std::size_t v = first; v < steps_.size(); ++v) n += steps_[v] <= applied ? 1 : 0;
  return n;
}

// ---- ParamGather

ParamGather::ParamGather(const RunMode& mode, const ModelLayout& layout, Backend& backend, offload::PartitionStore& store,
                         UnitVersions& versions, int rank, bool fp16)
    : mode_(mode),
      layout_(layout),
      backend_(backend),
      store_(store),
      versions_(versions),
      rank_(rank),
      fp16_(fp16),
      host_backend_(backend.name() == "cpu") {}

void ParamGather::prefetch(std::size_t u, void* dst, Communicator& comm, std::size_t next) {
  try {
    gather(u, dst, comm, worker_, next);
  } catch (...) {
    worker_.ahead.reset();  // its buffers go back
    throw;
  }
}

void ParamGather::refresh(ParamCoordinator* coord, UnitStorage* compute, Communicator& comm) {
  if (coord != nullptr) {
    coord->invalidate();
    return;
  }
  if (!host_backend_) backend_.wait(Stream::kHostToDevice, *backend_.record(Stream::kCompute));
  for (std::size_t u = 0; u < layout_.units.size(); ++u) gather(u, compute->view().units[u], comm, main_);
}

void ParamGather::upload(offload::ParamLease lease, std::byte* dst) {
  lease.wait();
  for (const auto& piece : lease.pieces()) {
    backend_.copy_to_device_async(dst + static_cast<std::size_t>(piece.begin) * 2, piece.data,
                                  static_cast<std::size_t>(piece.count) * 2, Stream::kHostToDevice);
  }
  backend_.record(Stream::kHostToDevice)->synchronize();
}

void ParamGather::gather(std::size_t u, void* device_dst, Communicator& comm, GatherScratch& s, std::size_t next) {
  const auto n = static_cast<std::size_t>(layout_.units[u].numel);
  if (host_backend_) {  // the CPU backend's memory is host memory: gather in place
    gather_host(u, device_dst, comm, s, next);
    return;
  }
  versions_.wait(u, layout_.units[u].name);  // the GPU pipeline's step may still be updating it
  const bool bf16 = mode_.param_dtype == DType::kBF16;
  if (nccl_ != nullptr) {
    // Several GPUs: this rank's shard goes up into its place in the padded buffer, then the ranks
    // all-gather the unit in place over NCCL (after the upload, and so after the compute the
    // upload's stream was ordered behind).
    const auto sh = static_cast<std::size_t>(mode_.shard[u]);
    std::byte* mine = static_cast<std::byte*>(device_dst) + static_cast<std::size_t>(rank_) * sh * kernels::cpu::dtype_bytes(mode_.param_dtype);
    if (bf16) {
      upload(take_lease(u, s, next), mine);
    } else {
      s.in.resize(sh);
      s.m.resize(sh);
      s.v.resize(sh);
      store_.read_state(u, s.in, s.m, s.v);
      backend_.copy_to_device_async(mine, s.in.data(), sh * sizeof(float), Stream::kHostToDevice);
      backend_.record(Stream::kHostToDevice)->synchronize();
    }
    nccl_->all_gather(mine, device_dst, sh, mode_.param_dtype);
    return;
  }
  // A GPU: up on the host-to-device stream, which the caller has ordered after any compute still
  // reading the buffer. bf16 shards not split across ranks go straight from the store
  // (page-locked host memory, or the NVMe staging buffers); anything else is gathered on the host
  // first.
  if (bf16 && !mode_.sharded) {
    upload(take_lease(u, s, next), static_cast<std::byte*>(device_dst));
    return;
  }
  s.host.resize(n * kernels::cpu::dtype_bytes(mode_.param_dtype));
  gather_host(u, s.host.data(), comm, s, next);
  backend_.copy_to_device_async(device_dst, s.host.data(), s.host.size(), Stream::kHostToDevice);
  backend_.record(Stream::kHostToDevice)->synchronize();
}

// Unit u's bf16 shard from the store: the read-ahead already started for it, or a new fetch; then
// the read-ahead of `next` when its shard is on NVMe.
offload::ParamLease ParamGather::take_lease(std::size_t u, GatherScratch& s, std::size_t next) {
  offload::ParamLease lease;
  const bool read_ahead = s.ahead && s.ahead_unit == u;
  if (read_ahead) lease = std::move(*s.ahead);
  // A read-ahead of another unit gives its buffers back before fetch() may wait for them.
  s.ahead.reset();
  s.ahead_unit = ParamCoordinator::kNone;
  if (!read_ahead) lease = store_.fetch(u);
  // The read-ahead only of a unit the step in flight has finished (the store's rule).
  if (next != ParamCoordinator::kNone && store_.param_tier(next) == offload::Tier::kNvme && versions_.ready(next)) {
    s.ahead = store_.try_fetch(next);
    if (s.ahead) s.ahead_unit = next;
  }
  return lease;
}

void ParamGather::gather_host(std::size_t u, void* dst, Communicator& comm, GatherScratch& s, std::size_t next) {
  const auto n = static_cast<std::size_t>(layout_.units[u].numel);
  const auto sh = static_cast<std::size_t>(mode_.shard[u]);
  const auto world = static_cast<std::size_t>(mode_.world);
  if (mode_.param_dtype == DType::kBF16) {
    auto* out = static_cast<std::uint16_t*>(dst);
    offload::ParamLease lease = take_lease(u, s, next);
    if (!mode_.sharded) {
      lease.copy_to(std::span<std::uint16_t>(out, n));
      return;
    }
    const std::size_t words = (sh + 1) / 2;
    s.in.assign(words, 0.0f);
    s.out.resize(words * world);
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
    s.out.resize(sh * world);
    store_.read_state(u, s.in, s.m, s.v);
    comm.all_gather(s.in, s.out);
    std::memcpy(w, s.out.data(), n * sizeof(float));
  } else {
    store_.read_state(u, std::span<float>(w, n), s.m, s.v);
  }
  if (fp16_) {
    for (std::size_t i = 0; i < n; ++i) w[i] = kernels::f16_to_f32(kernels::f32_to_f16(w[i]));
  }
}

// ---- StepParams

void StepParams::begin(std::vector<std::vector<std::size_t>> schedule) {
  use_ = 0;
  if (coord_ != nullptr) coord_->begin(std::move(schedule));
}

void StepParams::end() {
  if (coord_ != nullptr) coord_->end();
}

}  // namespace zinf::runtime
