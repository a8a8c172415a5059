#pragma once
// The ZeRO stage-3 parameter coordinator: gathers each unit's full parameters just before a
// computation reads them and releases them after, walking the step's static schedule.
//
// A pass is the list of uses a step (or an eval batch) makes, in order: for each micro-batch the
// forward units 0..L+1, then the backward units L+1..0; a use names the units one computation
// reads (a tied head reads the embedding too). For each use the coordinator
//   - acquire(): makes its units resident (gathering on demand what was not prefetched, waiting for
//     what is in flight), then starts prefetches of the next uses' units, in schedule order, while
//     the elements prefetched ahead stay within `stage3_prefetch_bucket_size` and the gathered
//     elements within `stage3_max_live_parameters`;
//   - release(): keeps a unit whose next use in the pass is at most `stage3_max_reuse_distance`
//     elements of parameter traffic away (while the live budget allows), and frees the rest.
// Units of at most `stage3_param_persistence_threshold` elements are gathered once and kept until
// the weights change (invalidate()); they do not count against the live budget.
//
// Gathers run on one prefetch thread, in the order they were requested. Every decision depends
// only on the schedule and the unit sizes, never on timing, so every rank requests the same
// gathers in the same order and the gathers' collectives (all-gathers on their own channel, or,
// with several GPUs, NCCL collectives interleaved with the tasks of post()) match.
//
// Bounds (tested): gathered non-persistent elements never exceed max_live plus the elements of the
// use being computed; elements prefetched ahead of their use never exceed the bucket. Freed
// buffers are kept for reuse while live + cached stays within max_live plus the largest unit.

#include <chrono>
#include <climits>
#include <condition_variable>
#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <map>
#include <mutex>
#include <thread>
#include <deque>
#include <vector>

#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/model.hpp"

namespace zinf::runtime {

struct CoordinatorOptions {
  std::int64_t max_live = 1'000'000'000;           // stage3_max_live_parameters
  std::int64_t prefetch_bucket = 50'000'000;       // stage3_prefetch_bucket_size (0: no prefetch)
  std::int64_t max_reuse_distance = 1'000'000'000;  // stage3_max_reuse_distance
  std::int64_t persistence_threshold = 100'000;    // stage3_param_persistence_threshold
  std::int64_t model_persistence_threshold = INT64_MAX;  // stage3_model_persistence_threshold: all persistent units together
  // Per unit, the elements a gather writes (at least the unit's numel: an in-place all-gather of
  // W equal shards writes the unit padded to W x shard). Empty: each unit's numel. Buffers and
  // budgets count these.
  std::vector<std::int64_t> gather_elements;
};

// Counters since the last take_stats().
struct CoordinatorStats {
  std::int64_t live_high_water = 0;   // most gathered elements at once (in flight included; persistent excluded)
  std::int64_t ahead_high_water = 0;  // most elements prefetched ahead of their use
  std::int64_t persistent_elements = 0;  // elements of the persistent units (kept gathered)
  std::int64_t adopted_elements = 0;     // elements of the units whose parameters the caller holds (adopt())
  std::uint64_t hits = 0;    // non-persistent unit reads whose gather had started before they were needed
  std::uint64_t misses = 0;  // ... that had to start a gather on demand
  std::uint64_t gathers = 0;               // units gathered (persistent ones included)
  std::uint64_t gathered_elements = 0;
  double wait_seconds = 0;   // time acquire() blocked on gathers

  // Folds one pass's counters into a run's totals: high-water marks as maxima, sizes as the
  // latest, counts and times summed.
  void add(const CoordinatorStats& s) {
    live_high_water = std::max(live_high_water, s.live_high_water);
    ahead_high_water = std::max(ahead_high_water, s.ahead_high_water);
    persistent_elements = s.persistent_elements;
    adopted_elements = s.adopted_elements;
    hits += s.hits;
    misses += s.misses;
    gathers += s.gathers;
    gathered_elements += s.gathered_elements;
    wait_seconds += s.wait_seconds;
  }
};

class ParamCoordinator {
 public:
  // Fills `dst` (the unit's numel elements of the coordinator's dtype, or its gather_elements) with the unit's current
  // parameters; runs on the prefetch thread. `next` is the unit gathered after this one (kNone
  // when none is queued yet), so slow reads of it may start early. May throw; the error reaches
  // the acquire() that needs the unit (and every later one).
  static constexpr std::size_t kNone = static_cast<std::size_t>(-1);
  using Gather = std::function<void(std::size_t unit, void* dst, std::size_t next)>;

  ParamCoordinator(Backend& backend, const ModelLayout& layout, DType dtype, CoordinatorOptions options, Gather gather);
  ~ParamCoordinator();
  ParamCoordinator(const ParamCoordinator&) = delete;
  ParamCoordinator& operator=(const ParamCoordinator&) = delete;

  // Starts a pass over `uses`. The previous pass must have ended.
  void begin(std::vector<std::vector<std::size_t>> uses);
  // Uses must be acquired and released in order, each release before the next acquire.
  const UnitBuffers& acquire(std::size_t use);
  void release(std::size_t use);
  // Frees every non-persistent unit (waiting for gathers still in flight).
  void end();
  // The weights changed (an optimizer step): persistent units are gathered again at their next use.
  void invalidate();
  // Unit `unit`'s parameters live at `buffer` (device memory the caller owns and keeps current: the
  // GPU's share of the optimizer steps them in place). The unit is never gathered, freed or
  // invalidated, and counts against no budget. Call before the first pass.
  void adopt(std::size_t unit, void* buffer);
  // Runs `task` on the gather thread after every gather requested so far and before any requested
  // later: with several GPUs the trainer's reduce-scatters go through here, so that every rank
  // issues its collectives (all-gathers and reduce-scatters) in the same order, on one thread.
  // `failed` is null, or the error of an earlier gather (the task is then only told why). The
  // task must not throw. Tasks still queued when the coordinator is destroyed are dropped.
  using Task = std::function<void(const std::exception_ptr& failed)>;
  void post(Task task);
  bool adopted(std::size_t unit) const { return adopted_[unit]; }

  CoordinatorStats take_stats();
  bool persistent(std::size_t unit) const { return persistent_[unit]; }
  // The persistence rule: small units (elements <= persistence_threshold) stay gathered, in unit
  // order while their total stays within model_persistence_threshold; adopted units never do.
  // The GPU memory plan counts the same units.
  static std::vector<bool> persistent_units(const std::vector<std::int64_t>& elements, const std::vector<bool>& adopted,
                                            std::int64_t persistence_threshold, std::int64_t model_persistence_threshold);
  std::int64_t live_elements() const;
  std::int64_t cached_elements() const;  // freed buffers kept for reuse

  // The step's schedule: `micro_batches` x (forward units in order, backward in reverse), each use
  // the units whose parameters that computation reads (`forward_reads(unit)`,
  // `backward_reads(unit)`; a use may read none).
  using Reads = std::function<std::vector<std::size_t>(std::size_t)>;
  static std::vector<std::vector<std::size_t>> training_schedule(std::size_t units, std::int64_t micro_batches,
                                                                 const Reads& forward_reads, const Reads& backward_reads);
  static std::vector<std::vector<std::size_t>> forward_schedule(std::size_t units,
                                                                const std::function<std::vector<std::size_t>(std::size_t)>& reads);

 private:
  enum class State : std::uint8_t { kEmpty, kInFlight, kResident };
  struct Unit {
    State state = State::kEmpty;
    bool prefetched = false;  // requested ahead of its use and not yet acquired
    DeviceBuffer buffer;
    // A reused buffer: compute-stream work recorded when it was freed (kernels may still read the
    // old unit). The gather's copies on the host-to-device stream wait for it first.
    std::shared_ptr<Backend::Event> reuse_after;
  };
  struct Pooled {
    DeviceBuffer buffer;
    std::shared_ptr<Backend::Event> freed;
  };
  void request(std::size_t unit, std::unique_lock<std::mutex>& lock);
  void free_unit(std::size_t unit);
  void prefetch_from(std::size_t first_use, std::unique_lock<std::mutex>& lock);
  void wait_resident(std::size_t unit, std::unique_lock<std::mutex>& lock);
  void wait_idle(std::unique_lock<std::mutex>& lock);
  void worker();
  // Units gathered once and kept (persistent), or held by the caller (adopted).
  bool kept(std::size_t unit) const { return persistent_[unit] || adopted_[unit]; }
  std::int64_t counted(std::size_t unit) const { return kept(unit) ? 0 : numel_[unit]; }
  void note_live();
  void plan_units();  // persistent_ and largest_ from the sizes, the options and adopted_

  Backend& backend_;
  const ModelLayout& layout_;
  DType dtype_;
  CoordinatorOptions o_;
  Gather gather_;
  std::vector<std::int64_t> numel_;
  std::vector<bool> persistent_;
  std::vector<bool> adopted_;
  std::int64_t largest_ = 0;

  std::vector<std::vector<std::size_t>> uses_;
  std::vector<std::int64_t> trace_;  // elements read by uses [0, i)

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Unit> units_;
  struct Item {
    std::size_t unit = kNone;            // a gather of this unit, or
    Task task;                           // a posted task
  };
  std::deque<Item> queue_;
  std::size_t in_flight_ = 0;  // requested, not yet resident
  std::exception_ptr error_;
  bool stop_ = false;
  std::int64_t live_ = 0, ahead_ = 0, cached_ = 0;
  std::map<std::size_t, std::vector<Pooled>> pool_;  // freed buffers by bytes
  CoordinatorStats stats_;
  UnitBuffers view_;
  std::thread thread_;
};

}  // namespace zinf::runtime
