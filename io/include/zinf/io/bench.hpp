#pragma once
// Storage benchmark behind `zinf bench io` and `zinf tune nvme`: sequential and random read/write
// throughput and per-I/O latency of the io_uring engine and, on the same file in the same run, of a
// plain baseline (threads calling pread/pwrite with O_DIRECT, same block size and thread count).
//
// The test file is written in full before any read, so reads hit real blocks (reading a
// preallocated but unwritten extent returns zeros without touching the device).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "zinf/io/aligned_buffer.hpp"
#include "zinf/io/engine.hpp"
#include "zinf/io/file.hpp"

namespace zinf::io {

struct LatencyStats {  // microseconds per block-sized I/O
  double p50 = 0, p90 = 0, p99 = 0, max = 0;
  std::size_t samples = 0;
};
LatencyStats latency_stats(std::vector<float> micros);

struct BenchPoint {
  std::string impl;  // "zinf" (io_uring engine) or "pread" (baseline)
  IoOp op = IoOp::kRead;
  bool random = false;
  EngineOptions settings;       // baseline: block_size and intra_op_parallelism (threads) only
  std::uint64_t bytes = 0;      // transferred
  double seconds = 0;
  double gbps = 0;              // 1e9 bytes per second
  LatencyStats latency;
  bool registered_buffers = false;
  unsigned effective_queue_depth = 0;  // per ring, after the host-memory cap; == queue_depth unless capped
  std::uint64_t buffer_footprint = 0;  // bytes of memory the requests rotated through
  std::uint64_t resubmitted = 0;       // pieces continued after a short transfer or -EAGAIN
};

struct BenchLimits {
  double max_seconds = 0;                       // per point; 0 = transfer the whole size
  std::uint64_t max_inflight_bytes = 2ull << 30;  // host memory for buffers in flight
  // Memory the requests land in (reads) or come from (writes), rotated through request by
  // request; 0 = only the requests in flight. A real workload streams through far more memory
  // than a few requests: on a virtual disk whose host copies into guest memory, reads into a
  // small, cache-warm window ran 25% faster than the same reads spread over 768 MiB.
  std::uint64_t buffer_footprint = 0;
};

// A sweep's grid: every block size x queue depth x parallelism, read and write, sequential.
struct SweepGrid {
  std::vector<std::uint64_t> blocks;
  std::vector<unsigned> depths;
  std::vector<unsigned> parallelism;
};

// A sweep: every point, and one setting for both directions (the best sum of read and write, each
// relative to its best; among those within 2%, the fewest threads, then the shallowest queue).
// The top_* and base_* pointers point into this result's own vectors.
struct SweepResult {
  std::vector<BenchPoint> engine;    // read and write per grid point
  std::vector<BenchPoint> baseline;  // read and write per (block, threads)
  EngineOptions best;
  double best_read = 0, best_write = 0;
  const BenchPoint* top_read = nullptr;
  const BenchPoint* top_write = nullptr;
  const BenchPoint* base_read = nullptr;
  const BenchPoint* base_write = nullptr;
};

// "4G", "256M", "64K" for a byte count that is a whole number of those units, else the bytes.
std::string size_label(std::uint64_t bytes);
// The fastest point of `op` in `v` (null when there is none).
const BenchPoint* top(const std::vector<BenchPoint>& v, IoOp op);

class IoBench {
 public:
  // Creates `<dir>/zinf-bench-<pid>/data.zsw` of `size` bytes and fills it (checks free space first).
  IoBench(const std::string& dir, std::uint64_t size, BenchLimits limits);
  // Removes the test file and its directory.
  ~IoBench();
  IoBench(const IoBench&) = delete;
  IoBench& operator=(const IoBench&) = delete;

  BenchPoint run_engine(const EngineOptions& settings, IoOp op, bool random);
  BenchPoint run_baseline(std::uint64_t block_size, unsigned threads, IoOp op, bool random);
  // Baseline and engine settings alternate, so a drive whose speed drifts during the sweep
  // favours neither side. `progress` hears each point as it starts.
  SweepResult sweep(const SweepGrid& grid, const std::function<void(const std::string&)>& progress);

  bool direct() const noexcept { return file_.direct(); }
  std::uint64_t size() const noexcept { return size_; }
  const std::string& file_path() const noexcept { return path_; }
  double fill_seconds() const noexcept { return fill_seconds_; }

 private:
  std::byte* buffer(std::uint64_t bytes);

  std::string dir_;
  std::string path_;
  std::uint64_t size_;
  BenchLimits limits_;
  File file_;
  AlignedBuffer buffer_;
  double fill_seconds_ = 0;
};

}  // namespace zinf::io
