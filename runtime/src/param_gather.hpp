#pragma once
// Parameters from the store to where the model computes: each unit's compute copy gathered from
// this rank's bf16 shard or fp32 master (all-gathered over the ranks when sharded, over NCCL on
// several GPUs), and the one sync point between the GPU pipeline's optimizer thread and those
// gathers (UnitVersions). Internal to zinf_runtime.

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "zinf/offload/offload.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/nccl_comm.hpp"
#include "zinf/runtime/run_mode.hpp"

namespace zinf::runtime {

// Optimizer steps applied to each unit's parameters, and how many a gather needs. Only the GPU
// pipeline steps units on another thread (stage 3: the next forward overlaps the end of a step);
// elsewhere (`enabled` false) every unit is always ready.
class UnitVersions {
 public:
  explicit UnitVersions(bool enabled) : enabled_(enabled) {}
  // Every unit has had `applied` updates; gathers need that many.
  void reset(std::size_t units, std::int64_t applied);
  // From now on every gather waits for `applied` updates of its unit.
  void require(std::int64_t applied);
  void stepped(std::size_t u);
  // The step failed: waiters stop waiting and report `why`.
  void fail(const std::string& why);
  // Whether every step begun before this one has updated unit u (without waiting).
  bool ready(std::size_t u);
  // Before unit u's parameters are read: every step begun before this one has updated them.
  void wait(std::size_t u, const std::string& name);
  // Units from `first` on that have had at most `applied` updates.
  std::size_t behind(std::size_t first, std::int64_t applied);

 private:
  bool enabled_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::int64_t> steps_;
  std::int64_t needed_ = 0;
  std::string error_;
};

// What a gather needs besides the unit: where it may stage host copies and read ahead.
struct GatherScratch {
  std::vector<float> in, out, m, v;
  std::vector<std::byte> host;  // the whole unit, before its upload to a GPU backend
  std::optional<offload::ParamLease> ahead;  // NVMe reads of the next unit, started early
  std::size_t ahead_unit = ParamCoordinator::kNone;
};

class ParamGather {
 public:
  // `nccl`: several GPUs in the pipeline (null otherwise); `fp16`: fp32 masters rounded through
  // fp16 for the compute copy.
  ParamGather(const RunMode& mode, const ModelLayout& layout, Backend& backend, offload::PartitionStore& store,
              UnitVersions& versions, int rank, bool fp16);
  void set_nccl(DeviceCollectives* nccl) { nccl_ = nccl; }

  // A unit's full compute parameters into `dst` (numel elements of the parameter dtype, or the
  // padded gather length with NCCL): the bf16 shard, or the fp32 master. With sharded state every
  // rank's piece is all-gathered over `comm` (bf16 pieces travel two to a float slot).
  // `next` (stage 3's prefetch thread): the unit gathered after this one; when its bf16 shard is
  // on NVMe its reads start now, if staging buffers are free, and overlap this unit's gather.
  void gather(std::size_t u, void* dst, Communicator& comm, GatherScratch& s, std::size_t next = ParamCoordinator::kNone);
  // Stage 3's prefetch thread (the coordinator's gather), with its own scratch.
  void prefetch(std::size_t u, void* dst, Communicator& comm, std::size_t next);
  // The compute copy after an optimizer step (or a load): stages 0-2 (`coord` null) gather every
  // unit into `compute`, the uploads ordered after any compute still reading the old values; at
  // stage 3 units are gathered when used, so only the persistent ones are dropped.
  void refresh(ParamCoordinator* coord, UnitStorage* compute, Communicator& comm);
  // Read-aheads give their staging buffers back.
  void drop_read_ahead() {
    main_.ahead.reset();
    worker_.ahead.reset();
  }

 private:
  void gather_host(std::size_t u, void* dst, Communicator& comm, GatherScratch& s, std::size_t next);
  offload::ParamLease take_lease(std::size_t u, GatherScratch& s, std::size_t next);
  // The lease's pieces up into `dst` on the host-to-device stream, waited for.
  void upload(offload::ParamLease lease, std::byte* dst);

  const RunMode& mode_;
  const ModelLayout& layout_;
  Backend& backend_;
  offload::PartitionStore& store_;
  UnitVersions& versions_;
  int rank_;
  bool fp16_;
  bool host_backend_;
  DeviceCollectives* nccl_ = nullptr;
  GatherScratch main_;    // refresh()'s
  GatherScratch worker_;  // prefetch()'s
};

// The compute parameters a step's forward and backward read, use by use: at stage 3 each unit
// gathered per use by the coordinator (its schedule's order); at stages 0-2 the whole copy.
class StepParams {
 public:
  StepParams(ParamCoordinator* coord, UnitStorage* whole) : coord_(coord), whole_(whole) {}
  void begin(std::vector<std::vector<std::size_t>> schedule);
  const UnitBuffers& acquire() { return coord_ != nullptr ? coord_->acquire(use_) : whole_->view(); }
  void release() {
    if (coord_ != nullptr) coord_->release(use_++);
  }
  void end();

 private:
  ParamCoordinator* coord_;
  UnitStorage* whole_;
  std::size_t use_ = 0;
};

}  // namespace zinf::runtime
