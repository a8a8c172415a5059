#pragma once
// `zinf bench offload`'s measurement: the whole offloaded optimizer step (the partition store and
// the pipelined step) with the state in host memory or on NVMe, next to two bounds measured in the
// same run on the same machine:
//   - the CPU kernel bound: the fused host step (bf16 gradients in, fp32 state, bf16 parameters
//     out) on arrays already in memory, with the same threads;
//   - the disk bound: the NVMe bytes the step must move per parameter (12 read + 12 written for
//     the fraction `ratio` on NVMe) over the sequential read and write bandwidth the io_uring
//     engine measures on the same directory with the same aio settings, reads and writes counted
//     one after the other (as a drive that cannot overlap them serves them).
// A pipelined step that keeps both busy runs at min(disk bound, kernel bound).

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/io/engine.hpp"
#include "zinf/offload/optimizer_step.hpp"

namespace zinf::offload {

struct OffloadBenchOptions {
  config::DeepSpeedConfig config;  // offload_optimizer (device, path, ratio, buffers), sub_group_size, aio
  std::string io = "default";      // the step's I/O schedule: phased, mixed, or the default
  std::size_t params = 256u << 20;
  unsigned units = 16;             // the parameters split into equal units, like a model's layers
  unsigned threads = 1;
  unsigned steps = 3;              // timed, after one warm-up
  bool serial = false;             // also one step with overlap off
  std::uint64_t disk_size = 0;     // the io bench's file (0: the size of the state on NVMe)
};

struct DiskSample {
  std::string when;  // "before" or "after" the steps
  std::string what;  // "zinf bench io" or "store pass"
  io::IoOp op = io::IoOp::kRead;
  double gbps = 0;
};

struct OffloadBenchResult {
  // The setup.
  std::size_t params = 0;
  unsigned units = 0, threads = 0, buffer_count = 0;
  bool nvme = false;
  double nvme_fraction = 0;
  std::int64_t sub_group_size = 0;
  std::uint64_t slice_elems = 0;
  bool phased = false;
  io::EngineOptions aio;
  std::string nvme_dir, store, host_memory;  // the swap directory; the store's and memory's descriptions
  double init_seconds = 0;                   // writing the initial state
  // The bounds.
  double kernel_pps = 0;
  std::vector<DiskSample> disk;
  double read_gbps = 0, write_gbps = 0;  // the fastest of each direction
  double mixed_gbps = 0;                 // a pass of reads and writes of alternate slices together
  std::uint64_t disk_file_bytes = 0, disk_footprint = 0;
  // The steps.
  std::vector<StepStats> steps;
  std::optional<StepStats> serial;

  double nvme_bytes_per_param() const { return 12.0 * nvme_fraction; }  // each way
  double disk_pps() const;            // at the fastest read and write (0: no NVMe)
  double bound_pps() const;           // min(disk, kernel)
  double median_gbps(io::IoOp op) const;
  double disk_median_pps() const;     // the disk bound at the median read and write
  double overlapped_pps() const;      // the slower direction alone (a drive serving both at once)
  StepStats best() const;
  double median_seconds() const;
  double step_pps() const;            // the best step's
};

// Runs the measurement; `progress` hears what it is doing. Throws zinf::Error for settings the
// offload cannot honour (an empty nvme_path, memory it cannot get, ...).
OffloadBenchResult run_offload_bench(const OffloadBenchOptions& options, const std::function<void(const std::string&)>& progress);

}  // namespace zinf::offload
