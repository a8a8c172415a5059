#pragma once
// The partition store: for each unit (embedding, each layer, head) this rank's shard of the fp32
// master weights, `exp_avg` and `exp_avg_sq`, and the bf16 parameter shard that goes to the GPU.
//
// Placement.
// - Optimizer state follows `offload_optimizer`: device "cpu" keeps it in host memory; device
//   "nvme" keeps the fraction `ratio` of every unit's elements on NVMe (through the swap store) and
//   the rest in host memory. zinf's convention: ratio = the fraction of the optimizer state that
//   lives on NVMe; 1.0 (the default) puts all of it there, 0.5 the first half of every unit.
// - The bf16 parameter shard follows `offload_param`: in host memory, or, with device "nvme",
//   the first `max_in_cpu` elements (whole units, in unit order) in host memory and the rest on
//   NVMe, read through `buffer_count` pinned buffers of `buffer_size` elements (fetch()).
//   (With no parameter offload the GPU holds the gathered copy; the host shard is the copy the
//   CPU optimizer writes and the upload reads.)
//
// Slices. Every unit is cut into slices of at most `slice_elems` elements (sub_group_size, rounded
// to kSliceAlign so every slice starts 4 KiB-aligned in fp32 and bf16). A slice is the unit of the
// optimizer step and of NVMe traffic: its state is one swap tensor [master | exp_avg | exp_avg_sq]
// (12 bytes per element), its bf16 parameters another, so a slice moves in one read and one write.
//
// Host memory. Everything is planned first and checked against the budget, the memlock limit and
// the memory available (HostMemory::preflight), then allocated in one block per purpose and carved
// into 4 KiB-aligned pieces; the staging buffers of both offloads are registered with the io_uring
// engine together (fixed-buffer reads and writes).

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "zinf/io/swap_store.hpp"
#include "zinf/offload/host_memory.hpp"

namespace zinf::offload {

// Slices start at multiples of this many elements: 4 KiB of bf16, 8 KiB of fp32.
inline constexpr std::uint64_t kSliceAlign = 2048;

struct UnitSpec {
  std::string name;     // e.g. "layers.3"
  std::uint64_t numel;  // this rank's shard, in elements
};

struct StoreOptions {
  // Optimizer state.
  double nvme_ratio = 0.0;                    // fraction of every unit's state on NVMe (0: host only)
  std::uint64_t slice_elems = 1'000'000'000;  // sub_group_size, elements (rounded to kSliceAlign)
  unsigned optimizer_buffers = 4;             // offload_optimizer.buffer_count: staging slices in flight
  // Parameters.
  bool params_on_nvme = false;                  // offload_param.device == nvme
  std::uint64_t max_in_cpu = 1'000'000'000;     // elements of bf16 shards kept in host memory
  unsigned param_buffers = 5;                   // offload_param.buffer_count
  std::uint64_t param_buffer_elems = 100'000'000;  // offload_param.buffer_size, elements
  // Gradient shards the caller allocates right after the store (the trainer's: page-locked from
  // the same HostMemory in the GPU pipeline, plain host vectors otherwise): counted in the store's
  // preflight, so a run that cannot hold both is refused before anything is allocated.
  std::uint64_t caller_gradient_bytes = 0;   // page-locked, from the same HostMemory
  std::uint64_t caller_pageable_bytes = 0;   // ordinary heap memory
  // Parameters only (LoRA's frozen base): no optimizer state at all, in host memory or on NVMe;
  // the bf16 shards follow the parameter options as usual. read_state() and the optimizer step
  // refuse such a store.
  bool frozen = false;
  // Units whose compute copy lives on the GPU (the GPU's share of the optimizer): with parameters
  // on NVMe they go to NVMe without using max_in_cpu, which the units the CPU steps need more.
  std::vector<char> gpu_units;
};

enum class Tier : std::uint8_t { kHost, kNvme };
const char* tier_name(Tier tier);

// A contiguous range of one unit's elements.
struct Slice {
  std::size_t unit = 0;
  std::uint64_t begin = 0;  // element offsets within the unit's shard
  std::uint64_t end = 0;
  Tier state_tier = Tier::kHost;
  io::TensorId state_id = 0;      // kNvme: the swap tensor [master | exp_avg | exp_avg_sq]
  float* host_state = nullptr;    // kHost: [master | exp_avg | exp_avg_sq], (3 * len) fp32
  Tier param_tier = Tier::kHost;  // the unit's
  io::TensorId param_id = 0;      // kNvme: the swap tensor of bf16 parameters [begin, end)
  std::uint64_t size() const noexcept { return end - begin; }
};

class PartitionStore;

// A unit's bf16 parameter shard, ready to upload: one piece in host memory, or one staging buffer
// per slice when the unit's parameters live on NVMe. The buffers go back when the lease ends.
class ParamLease {
 public:
  struct Piece {
    const std::uint16_t* data;  // (count) bf16
    std::uint64_t begin;        // element offset within the unit's shard
    std::uint64_t count;
  };
  ParamLease() = default;
  ~ParamLease();
  ParamLease(ParamLease&& other) noexcept;
  ParamLease& operator=(ParamLease&& other) noexcept;
  ParamLease(const ParamLease&) = delete;
  ParamLease& operator=(const ParamLease&) = delete;

  // Waits for the NVMe reads; throws zinf::Error on an I/O error or a checksum mismatch (and
  // again on every later call: a failed lease has no pieces).
  void wait();
  const std::vector<Piece>& pieces() const noexcept { return pieces_; }
  // Copies the shard out (waits first).
  void copy_to(std::span<std::uint16_t> out);

 private:
  friend class PartitionStore;
  void release() noexcept;
  PartitionStore* store_ = nullptr;
  std::vector<Piece> pieces_;
  std::vector<int> buffers_;
  std::vector<io::SwapHandle> reads_;
  bool waited_ = false;
  std::string error_;
};

class PartitionStore {
 public:
  // Plans host memory (checked by `memory.preflight` before anything is allocated) and reserves
  // swap space (all or nothing), then allocates. `optimizer_swap` may be null unless state goes to
  // NVMe; `param_swap` unless parameters do (the two may be the same store). Throws zinf::Error
  // when either does not fit, or for bad options.
  PartitionStore(std::vector<UnitSpec> units, StoreOptions options, HostMemory& memory, io::SwapStore* optimizer_swap,
                 io::SwapStore* param_swap = nullptr);
  ~PartitionStore();
  PartitionStore(const PartitionStore&) = delete;
  PartitionStore& operator=(const PartitionStore&) = delete;

  const std::vector<UnitSpec>& units() const noexcept { return units_; }
  // In unit order, then element order.
  const std::vector<Slice>& slices() const noexcept { return slices_; }
  const StoreOptions& options() const noexcept { return options_; }
  bool frozen() const noexcept { return options_.frozen; }
  std::uint64_t slice_elems() const noexcept { return slice_elems_; }
  Tier param_tier(std::size_t unit) const { return unit_param_tier_.at(unit); }

  // Sets a unit's state: fp32 master weights and moments (zeros when the moment spans are empty),
  // and its bf16 parameters (rounded from the master; a frozen store keeps only these). Used at start-up and when loading a
  // checkpoint; NVMe slices are written through the staging buffers, several in flight, so it
  // must not run while a step does.
  void set_state(std::size_t unit, std::span<const float> master, std::span<const float> exp_avg = {},
                 std::span<const float> exp_avg_sq = {});
  // Copies a unit's state out (reading NVMe slices), e.g. for checkpoints and tests. (A frozen
  // store: zinf::Error.)
  void read_state(std::size_t unit, std::span<float> master, std::span<float> exp_avg, std::span<float> exp_avg_sq);

  // The unit's bf16 shard in host memory (numel elements), or null when it lives on NVMe.
  std::uint16_t* host_params(std::size_t unit) noexcept { return host_params_[unit]; }
  // Starts reading a unit's bf16 shard into parameter staging buffers (or points at its host
  // copy). Blocks while every buffer is leased out. Call only once the optimizer step has
  // finished the unit (StepInputs::unit_done).
  ParamLease fetch(std::size_t unit);
  // The same without waiting: nullopt when the staging buffers the unit needs are leased out
  // (read-ahead of the next unit while this one is still held).
  std::optional<ParamLease> try_fetch(std::size_t unit);

  // Staging buffers of the optimizer step (one per offload_optimizer.buffer_count), each
  // [master | exp_avg | exp_avg_sq | bf16] of the largest slice; empty when no slice needs one.
  std::size_t optimizer_buffer_count() const noexcept { return opt_staging_.size(); }
  std::byte* optimizer_buffer(std::size_t i) noexcept { return opt_staging_[i]; }
  std::uint64_t optimizer_state_bytes() const noexcept { return opt_state_bytes_; }  // state part (4 KiB-rounded)
  bool needs_staging(const Slice& s) const noexcept {
    return s.state_tier == Tier::kNvme || s.param_tier == Tier::kNvme;
  }

  io::SwapStore* optimizer_swap() noexcept { return opt_swap_; }
  io::SwapStore* param_swap() noexcept { return param_swap_; }
  std::uint64_t nvme_state_elements() const noexcept { return nvme_state_elems_; }
  std::uint64_t nvme_param_elements() const noexcept { return nvme_param_elems_; }
  std::uint64_t total_elements() const noexcept { return total_elems_; }
  // One line per tier: where the state and parameters live, and how much staging there is.
  std::string describe() const;

 private:
  friend class ParamLease;
  void give_back(const std::vector<int>& buffers) noexcept;
  std::optional<ParamLease> start_fetch(std::size_t unit, bool wait);
  std::vector<const Slice*> unit_slices(std::size_t unit) const;

  std::vector<UnitSpec> units_;
  StoreOptions options_;
  HostMemory& memory_;
  io::SwapStore* opt_swap_;
  io::SwapStore* param_swap_;
  std::uint64_t slice_elems_ = 0;
  std::vector<Slice> slices_;
  std::vector<Tier> unit_param_tier_;
  std::vector<std::uint16_t*> host_params_;
  std::vector<HostBuffer> blocks_;  // one per purpose, carved
  std::vector<std::byte*> opt_staging_;
  std::uint64_t opt_state_bytes_ = 0;
  std::vector<std::uint16_t*> param_staging_;
  std::uint64_t param_staging_elems_ = 0;
  std::uint64_t nvme_state_elems_ = 0;
  std::uint64_t nvme_param_elems_ = 0;
  std::uint64_t total_elems_ = 0;

  std::mutex param_mu_;
  std::condition_variable param_cv_;
  std::vector<int> free_param_buffers_;
};

}  // namespace zinf::offload
