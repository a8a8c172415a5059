#pragma once
// Host memory for offload: page-locked where possible (cudaHostAlloc with a GPU, else mmap + mlock),
// accounted per purpose against a budget. The whole plan is checked before anything is allocated
// (budget, memlock limit, available RAM), so a run that cannot fit stops at start-up with the
// numbers and the fix, never with an out-of-memory error in the middle of training.

#include <array>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <string_view>

namespace zinf::offload {

enum class Purpose : std::uint8_t { kOptimizerState, kGradients, kStaging, kParameters };
inline constexpr std::size_t kPurposeCount = 4;
const char* purpose_name(Purpose purpose);

enum class PinMode : std::uint8_t {
  kCudaHost,  // cudaHostAlloc: pinned and registered with the CUDA driver (fast H2D/D2H)
  kLocked,    // mmap + mlock: page-locked, no GPU (CPU backend, tests)
  kPageable,  // ordinary memory (pin_memory: false)
};
const char* pin_mode_name(PinMode mode);
// kCudaHost in a CUDA build with a visible GPU, else kLocked; kPageable when pin_memory is false.
PinMode default_pin_mode(bool pin_memory);

struct HostMemoryPlan {
  std::array<std::uint64_t, kPurposeCount> bytes{};
  // Ordinary (pageable) memory the caller allocates outside HostMemory: counted only against the
  // memory the machine has available, not the budget or the memlock limit.
  std::uint64_t pageable = 0;
  void add(Purpose p, std::uint64_t b) { bytes[static_cast<std::size_t>(p)] += b; }
  std::uint64_t total() const;  // of `bytes`
};

// Owns one allocation; 4 KiB-aligned (2 MiB for large ones, with transparent huge pages asked for).
class HostBuffer {
 public:
  HostBuffer() = default;
  ~HostBuffer();
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  std::byte* data() noexcept { return data_; }
  const std::byte* data() const noexcept { return data_; }
  std::uint64_t size() const noexcept { return size_; }
  std::span<std::byte> span() noexcept { return {data_, size_}; }
  template <class T>
  T* as() noexcept {
    return reinterpret_cast<T*>(data_);
  }

 private:
  friend class HostMemory;
  void release() noexcept;
  std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;      // usable bytes (the request rounded up to 4 KiB)
  std::uint64_t mapped_ = 0;    // bytes mapped (kLocked / kPageable)
  PinMode mode_ = PinMode::kPageable;
  class HostMemory* owner_ = nullptr;
  Purpose purpose_ = Purpose::kStaging;
};

class HostMemory {
 public:
  // budget_bytes 0 = no budget beyond what the machine has.
  HostMemory(std::uint64_t budget_bytes, PinMode mode);
  ~HostMemory();
  HostMemory(const HostMemory&) = delete;
  HostMemory& operator=(const HostMemory&) = delete;

  // Throws zinf::Error when the plan exceeds the budget, the memlock limit (kLocked without
  // CAP_IPC_LOCK) or the memory available, naming each purpose's bytes and what to do.
  void preflight(const HostMemoryPlan& plan) const;
  // Throws zinf::Error (with the same advice) when the budget would be exceeded or the OS refuses.
  HostBuffer allocate(Purpose purpose, std::uint64_t bytes, std::string_view what);

  PinMode mode() const noexcept { return mode_; }
  std::uint64_t budget() const noexcept { return budget_; }
  std::uint64_t used(Purpose purpose) const;
  std::uint64_t used() const;
  // "optimizer state 12.0 GiB, gradients 1.5 GiB, ... of 64.0 GiB (page-locked)"
  std::string report() const;

 private:
  friend class HostBuffer;
  void give_back(Purpose purpose, std::uint64_t bytes) noexcept;

  std::uint64_t budget_;
  PinMode mode_;
  mutable std::mutex mu_;
  std::array<std::uint64_t, kPurposeCount> used_{};
};

// Facts the preflight uses, exposed for tests and `zinf plan`.
std::uint64_t memlock_limit_bytes();  // UINT64_MAX when unlimited
bool can_lock_unlimited();            // CAP_IPC_LOCK (root, or granted)
std::uint64_t available_memory_bytes();  // MemAvailable from /proc/meminfo
std::uint64_t total_memory_bytes();      // MemTotal (0 when unknown)
// What the preflight keeps free beside a plan: 5% of the machine's memory, at least 4 GiB
// (ZINF_HOST_RESERVE_BYTES overrides it; a value that is not a byte count is an error).
std::uint64_t host_memory_reserve_bytes();
// The same for a machine of `machine_bytes` (zinf plan's --host-mem).
std::uint64_t host_memory_reserve_bytes(std::uint64_t machine_bytes);

}  // namespace zinf::offload
