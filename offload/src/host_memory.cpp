#include "zinf/offload/host_memory.hpp"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/kernels/device_info.hpp"

#if defined(ZINF_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace zinf::offload {

namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kHugePage = 2ull << 20;

// "12.00 GiB", "2.00 MiB", "400.0 KiB": readable at every scale the plans use.
std::string gib(std::uint64_t b) {
  const auto d = static_cast<double>(b);
  if (b >= (1ull << 30)) return fmt::format("{:.2f} GiB", d / (1ull << 30));
  if (b >= (1ull << 20)) return fmt::format("{:.2f} MiB", d / (1ull << 20));
  return fmt::format("{:.1f} KiB", d / 1024);
}

std::string plan_text(const std::array<std::uint64_t, kPurposeCount>& bytes) {
  std::string out;
  for (std::size_t i = 0; i < kPurposeCount; ++i) {
    if (bytes[i] == 0) continue;
    if (!out.empty()) out += ", ";
    out += fmt::format("{} {}", purpose_name(static_cast<Purpose>(i)), gib(bytes[i]));
  }
  return out.empty() ? std::string("nothing") : out;
}

constexpr const char* kMemlockFix =
    "raise the memlock limit (`ulimit -l unlimited`; LimitMEMLOCK=infinity for a systemd service; "
    "`--ulimit memlock=-1` for Docker), or set pin_memory: false (slower transfers)";

}  // namespace

const char* purpose_name(Purpose p) {
  switch (p) {
    case Purpose::kOptimizerState: return "optimizer state";
    case Purpose::kGradients: return "gradients";
    case Purpose::kStaging: return "staging buffers";
    case Purpose::kParameters: return "parameter shards";
  }
  return "?";
}

const char* pin_mode_name(PinMode m) {
  switch (m) {
    case PinMode::kCudaHost: return "pinned with cudaHostAlloc";
    case PinMode::kLocked: return "page-locked with mlock";
    case PinMode::kPageable: return "pageable";
  }
  return "?";
}

PinMode default_pin_mode(bool pin_memory) {
  if (!pin_memory) return PinMode::kPageable;
#if defined(ZINF_HAVE_CUDA)
  if (!kernels::query_gpus().gpus.empty()) return PinMode::kCudaHost;
#endif
  return PinMode::kLocked;
}

std::uint64_t HostMemoryPlan::total() const {
  std::uint64_t t = 0;
  for (auto b : bytes) t += b;
  return t;
}

std::uint64_t memlock_limit_bytes() {
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) {
    return std::numeric_limits<std::uint64_t>::max();
  }
  return rl.rlim_cur;
}

bool can_lock_unlimited() {
  // CAP_IPC_LOCK is bit 14 of the effective capability set.
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("CapEff:", 0) == 0) {
      const std::uint64_t caps = std::stoull(line.substr(7), nullptr, 16);
      return (caps >> 14) & 1u;
    }
  }
  return ::geteuid() == 0;
}

namespace {
// A /proc/meminfo field in bytes, or `missing` when it is not there.
std::uint64_t meminfo_bytes(const std::string& field, std::uint64_t missing) {
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::uint64_t value = 0;
  std::string unit;
  while (in >> key >> value) {
    std::getline(in, unit);
    if (key == field) return value * 1024;
  }
  return missing;
}
}  // namespace

std::uint64_t available_memory_bytes() { return meminfo_bytes("MemAvailable:", std::numeric_limits<std::uint64_t>::max()); }
std::uint64_t total_memory_bytes() { return meminfo_bytes("MemTotal:", 0); }

std::uint64_t host_memory_reserve_bytes() { return host_memory_reserve_bytes(total_memory_bytes()); }

std::uint64_t host_memory_reserve_bytes(std::uint64_t machine_bytes) {
  if (const char* env = std::getenv("ZINF_HOST_RESERVE_BYTES"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::strtoull(env, &end, 10);
    if (end == env || *end != '\0' || env[0] < '0' || env[0] > '9' || errno == ERANGE) throw Error("ZINF_HOST_RESERVE_BYTES='{}' is not a byte count", env);
    return v;
  }
  return std::max<std::uint64_t>(4ull << 30, machine_bytes / 20);
}

// ---------------------------------------------------------------------------------------------

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      mapped_(std::exchange(o.mapped_, 0)),
      mode_(o.mode_),
      owner_(std::exchange(o.owner_, nullptr)),
      purpose_(o.purpose_) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    mapped_ = std::exchange(o.mapped_, 0);
    mode_ = o.mode_;
    owner_ = std::exchange(o.owner_, nullptr);
    purpose_ = o.purpose_;
  }
  return *this;
}

void HostBuffer::release() noexcept {
  if (data_ != nullptr) {
    if (mode_ == PinMode::kCudaHost) {
#if defined(ZINF_HAVE_CUDA)
      cudaFreeHost(data_);
#endif
    } else {
      ::munmap(data_, mapped_);  // also unlocks
    }
  }
  // Accounted even when the allocation itself failed after the budget was charged.
  if (owner_ != nullptr && size_ > 0) owner_->give_back(purpose_, size_);
  data_ = nullptr;
  size_ = 0;
  owner_ = nullptr;
}

// ---------------------------------------------------------------------------------------------

HostMemory::HostMemory(std::uint64_t budget_bytes, PinMode mode) : budget_(budget_bytes), mode_(mode) {
#if !defined(ZINF_HAVE_CUDA)
  if (mode == PinMode::kCudaHost) {
    throw Error("pinned memory through CUDA was asked for, but this zinf was built without CUDA");
  }
#endif
}

HostMemory::~HostMemory() = default;

std::uint64_t HostMemory::used(Purpose p) const {
  std::lock_guard lock(mu_);
  return used_[static_cast<std::size_t>(p)];
}

std::uint64_t HostMemory::used() const {
  std::lock_guard lock(mu_);
  std::uint64_t t = 0;
  for (auto b : used_) t += b;
  return t;
}

std::string HostMemory::report() const {
  std::lock_guard lock(mu_);
  std::uint64_t t = 0;
  for (auto b : used_) t += b;
  return fmt::format("{} in use ({}){}, {}", gib(t), plan_text(used_),
                     budget_ > 0 ? fmt::format(" of a {} budget", gib(budget_)) : std::string(), pin_mode_name(mode_));
}

void HostMemory::give_back(Purpose p, std::uint64_t bytes) noexcept {
  std::lock_guard lock(mu_);
  used_[static_cast<std::size_t>(p)] -= bytes;
}

void HostMemory::preflight(const HostMemoryPlan& plan) const {
  std::array<std::uint64_t, kPurposeCount> all{};
  {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < kPurposeCount; ++i) all[i] = used_[i] + plan.bytes[i];
  }
  std::uint64_t total = 0;
  for (auto b : all) total += b;
  if (budget_ > 0 && total > budget_) {
    throw Error("host memory plan exceeds the budget: {} needed ({}) but the budget is {}. Raise the budget, move "
                "optimizer state to NVMe (offload_optimizer.device: nvme), or lower buffer_count / sub_group_size",
                gib(total), plan_text(all), gib(budget_));
  }
  if (mode_ == PinMode::kLocked && !can_lock_unlimited() && total > memlock_limit_bytes()) {
    throw Error("{} of page-locked host memory is needed ({}) but the memlock limit is {}: {}", gib(total),
                plan_text(all), gib(memlock_limit_bytes()), kMemlockFix);
  }
  // What must stay free beside the plan: the rest of the process (CUDA's context and page-locked
  // mappings, data, a unit staged at start-up) and the OS. A plan that leaves less is refused
  // here rather than killed by the kernel's out-of-memory handler halfway through start-up.
  const std::uint64_t avail = available_memory_bytes();
  const std::uint64_t reserve = host_memory_reserve_bytes();
  const std::uint64_t need = plan.total() + plan.pageable;
  if (need > avail - std::min(reserve, avail)) {
    throw Error("host memory plan needs {} more ({}{}) and {} must stay free for the process and the OS, but only {} "
                "is available on this machine. Move optimizer state to NVMe (offload_optimizer.device: nvme, or a "
                "larger offload_optimizer.ratio), use bf16 gradients (communication_data_type), or use more ranks",
                gib(need), plan_text(plan.bytes), plan.pageable > 0 ? fmt::format(", pageable {}", gib(plan.pageable)) : "",
                gib(reserve), gib(avail));
  }
}

HostBuffer HostMemory::allocate(Purpose purpose, std::uint64_t bytes, std::string_view what) {
  HostBuffer b;
  if (bytes == 0) return b;
  const std::uint64_t size = (bytes + kPage - 1) / kPage * kPage;
  {
    std::lock_guard lock(mu_);
    std::uint64_t t = 0;
    for (auto u : used_) t += u;
    if (budget_ > 0 && t + size > budget_) {
      throw Error("cannot allocate {} of host memory for {} ({}): {} of the {} budget is in use ({})", gib(size), what,
                  purpose_name(purpose), gib(t), gib(budget_), plan_text(used_));
    }
    // Checked here as well as by mlock itself: the same message either way, and sanitizer
    // runtimes turn mlock into a no-op.
    if (mode_ == PinMode::kLocked && !can_lock_unlimited() && t + size > memlock_limit_bytes()) {
      throw Error("cannot page-lock {} of host memory for {}{}: the memlock limit is {}: {}", gib(size), what,
                  t > 0 ? fmt::format(" ({} is locked already)", gib(t)) : std::string(), gib(memlock_limit_bytes()),
                  kMemlockFix);
    }
    used_[static_cast<std::size_t>(purpose)] += size;
  }
  b.owner_ = this;
  b.purpose_ = purpose;
  b.size_ = size;
  b.mode_ = mode_;
  try {
    if (mode_ == PinMode::kCudaHost) {
#if defined(ZINF_HAVE_CUDA)
      void* p = nullptr;
      const cudaError_t rc = cudaHostAlloc(&p, size, cudaHostAllocDefault);
      if (rc != cudaSuccess) {
        throw Error("cannot pin {} of host memory for {}: cudaHostAlloc: {}; lower the host memory plan or set "
                    "pin_memory: false",
                    gib(size), what, cudaGetErrorString(rc));
      }
      b.data_ = static_cast<std::byte*>(p);
#endif
    } else {
      // Large buffers are mapped 2 MiB-aligned and offered to transparent huge pages (fewer TLB
      // misses when the optimizer streams through them).
      const bool huge = size >= 64 * kHugePage;
      b.mapped_ = huge ? (size + kHugePage - 1) / kHugePage * kHugePage : size;
      void* p = ::mmap(nullptr, b.mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) {
        throw Error("cannot allocate {} of host memory for {}: mmap: {}", gib(size), what, errno_text(errno));
      }
      b.data_ = static_cast<std::byte*>(p);
      if (huge) ::madvise(p, b.mapped_, MADV_HUGEPAGE);  // advice only; failure is harmless
      if (mode_ == PinMode::kLocked && ::mlock(p, b.mapped_) != 0) {
        const int err = errno;
        throw Error("cannot page-lock {} of host memory for {} ({}): the memlock limit is {}: {}", gib(size), what,
                    errno_text(err), gib(memlock_limit_bytes()), kMemlockFix);
      }
    }
  } catch (...) {
    b.release();
    throw;
  }
  return b;
}

}  // namespace zinf::offload
