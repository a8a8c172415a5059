// `zinf bench offload`'s measurement: see bench.hpp.
#include "zinf/offload/bench.hpp"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/io/bench.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/offload/offload.hpp"

namespace zinf::offload {
namespace {

namespace kc = kernels::cpu;
using Clock = std::chrono::steady_clock;

// The fused host step on in-memory arrays: the kernel bound, in parameters per second. The arrays
// come from the same kind of host memory as the store's (pinned, huge-page-aligned), so the two
// differ only in what the store adds.
double kernel_bound(std::size_t n, tbb::task_arena& arena, unsigned repeat) {
  HostMemory mem(0, default_pin_mode(true));
  HostBuffer state = mem.allocate(Purpose::kOptimizerState, n * 12, "kernel bound state");
  HostBuffer grads = mem.allocate(Purpose::kGradients, n * 2, "kernel bound gradients");
  HostBuffer out = mem.allocate(Purpose::kParameters, n * 2, "kernel bound parameters");
  float* p = state.as<float>();
  float* m = p + n;
  float* v = m + n;
  auto* g = grads.as<std::uint16_t>();
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n, 1u << 20), [&](const tbb::blocked_range<std::size_t>& r) {
      std::fill(p + r.begin(), p + r.end(), 0.01f);
      std::fill(m + r.begin(), m + r.end(), 0.0f);
      std::fill(v + r.begin(), v + r.end(), 0.0f);
      std::fill(g + r.begin(), g + r.end(), std::uint16_t{0x3b00});
    });
  });
  kc::Exec exec(kc::active_isa(), &arena);
  kc::AdamConfig adam;
  adam.lr = 1e-4;
  adam.weight_decay = 0.01;
  adam.grad_scale = 0.5f;
  double best = 1e30;
  for (unsigned i = 0; i <= repeat; ++i) {  // the first is a warm-up
    adam.step = i + 1;
    const auto t0 = Clock::now();
    kc::adam_step(adam, {p, g, kc::DType::kBF16, m, v, kc::DType::kF32, out.data(), kc::DType::kBF16, n}, exec);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (i > 0) best = std::min(best, s);
  }
  return static_cast<double>(n) / best;
}

// Pure reads or pure writes of every NVMe state slice of the store, through its staging buffers
// (as many in flight as the step has): the disk on exactly the extents and in the order the step
// uses them. Returns GB/s. Writes store whatever the staging buffers hold.
// op = nullopt: a mixed pass, alternating reads and writes of successive slices (each slice read
// or written once), to see what the drive does with both directions at once, as the step asks.
double store_pass(PartitionStore& store, std::optional<io::IoOp> op) {
  io::SwapStore* swap = store.optimizer_swap();
  std::vector<io::SwapHandle> inflight(store.optimizer_buffer_count());
  std::uint64_t bytes = 0;
  std::size_t i = 0;
  const auto t0 = Clock::now();
  for (const Slice& s : store.slices()) {
    if (s.state_tier != Tier::kNvme) continue;
    const std::size_t b = i++ % inflight.size();
    inflight[b].wait();
    const std::span<std::byte> buf(store.optimizer_buffer(b), store.optimizer_state_bytes());
    const io::IoOp this_op = op ? *op : (i % 2 == 1 ? io::IoOp::kRead : io::IoOp::kWrite);
    inflight[b] = this_op == io::IoOp::kRead ? swap->read(s.state_id, buf) : swap->write(s.state_id, buf);
    bytes += s.size() * 12;
  }
  for (auto& h : inflight) h.wait();
  return static_cast<double>(bytes) / std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
}


// Timed steps after one warm-up, every unit's gradient a constant.
std::vector<StepStats> run_steps(OptimizerStepper& stepper, unsigned count, std::int64_t first_step,
                                 const std::vector<const std::uint16_t*>& unit_grads,
                                 const std::function<void(const std::string&)>& progress) {
  std::vector<StepStats> t;
  for (unsigned i = 0; i <= count; ++i) {
    progress(fmt::format("step {} of {}{} ...", i, count, stepper.options().overlap ? "" : " (overlap off)"));
    StepInputs in;
    in.adam.lr = 1e-4;
    in.adam.weight_decay = 0.01;
    in.adam.step = first_step + i;
    in.adam.grad_scale = 0.5f;
    in.gradient = [&](std::size_t u) -> const void* { return unit_grads[u]; };
    const StepStats st = stepper.step(in);
    if (i > 0) t.push_back(st);
  }
  return t;
}

// The disk's side of the bound: `zinf bench io` on the swap directory, with requests rotating
// through as much memory as the step's staging buffers.
class DiskBound {
 public:
  DiskBound(OffloadBenchResult& r, const OffloadSettings& settings, std::size_t n, std::uint64_t size_option,
            const std::function<void(const std::string&)>& progress)
      : r_(r), aio_(settings.aio), progress_(progress) {
    // As large as the state on NVMe by default: a smaller file can be served partly from a cache
    // in front of the drive (a virtual disk's host, a drive's own), which the swap files are too
    // large for, and would make the bound unreachable for reasons that are not the step's.
    const auto state_bytes = static_cast<std::uint64_t>(static_cast<double>(n) * 12 * r.nvme_fraction);
    const std::uint64_t size = size_option > 0 ? size_option : std::max<std::uint64_t>(state_bytes, 256u << 20);
    r.disk_file_bytes = size;
    progress(fmt::format("disk bound: writing a {:.1f} GiB file in {} ...", static_cast<double>(size) / (1ull << 30), r.nvme_dir));
    io::BenchLimits limits;
    limits.buffer_footprint = settings.store.optimizer_buffers * std::min<std::uint64_t>(settings.store.slice_elems, n) * 12;
    r.disk_footprint = limits.buffer_footprint;
    bench_ = std::make_unique<io::IoBench>(r.nvme_dir, size, limits);
  }
  void record(const char* when, const char* what, io::IoOp op, double gbps) {
    double& best = op == io::IoOp::kRead ? r_.read_gbps : r_.write_gbps;
    best = std::max(best, gbps);
    r_.disk.push_back({when, what, op, gbps});
  }
  void measure(const char* when, int rounds) {
    for (int i = 0; i < rounds; ++i) {
      for (io::IoOp op : {io::IoOp::kWrite, io::IoOp::kRead}) {
        progress_(fmt::format("disk bound ({}): {} ...", when, op == io::IoOp::kRead ? "read" : "write"));
        record(when, "zinf bench io", op, bench_->run_engine(aio_, op, false).gbps);
      }
    }
  }
  void store_passes(PartitionStore& store, const char* when, std::initializer_list<io::IoOp> ops) {
    for (io::IoOp op : ops) {
      progress_(fmt::format("disk bound ({}): store {} pass ...", when, op == io::IoOp::kRead ? "read" : "write"));
      record(when, "store pass", op, store_pass(store, op));
    }
  }

 private:
  OffloadBenchResult& r_;
  io::EngineOptions aio_;
  const std::function<void(const std::string&)>& progress_;
  std::unique_ptr<io::IoBench> bench_;
};

}  // namespace

OffloadBenchResult run_offload_bench(const OffloadBenchOptions& o, const std::function<void(const std::string&)>& progress) {
  OffloadBenchResult r;
  tbb::task_arena arena(static_cast<int>(o.threads));
  const config::OffloadOptimizerConfig& oo = *o.config.zero.offload_optimizer;
  OffloadSettings settings = offload_settings(o.config);
  if (o.io != "default") settings.stepper.phased = o.io == "phased";
  r.threads = o.threads;
  r.nvme = oo.device == config::OffloadDevice::kNvme;
  r.nvme_fraction = r.nvme ? settings.store.nvme_ratio : 0.0;
  r.sub_group_size = o.config.zero.sub_group_size;
  r.buffer_count = static_cast<unsigned>(oo.buffer_count);
  r.phased = settings.stepper.phased;
  r.aio = settings.aio;
  if (r.nvme) r.nvme_dir = settings.optimizer_paths.front();

  // Units: equal shards (the last takes the remainder), like the layers of a model.
  const std::size_t n = o.params;
  r.params = n;
  r.units = static_cast<unsigned>(std::min<std::size_t>(o.units, n));
  std::vector<UnitSpec> specs;
  for (unsigned u = 0; u < r.units; ++u) {
    const std::size_t begin = n * u / r.units, end = n * (u + 1) / r.units;
    specs.push_back({fmt::format("layers.{}", u), end - begin});
  }

  // 1. The kernel bound (arrays of at most 128M parameters: far past every cache).
  progress("kernel bound ...");
  r.kernel_pps = kernel_bound(std::min<std::size_t>(n, 128u << 20), arena, 3);

  // 2. The disk bound: sequential read and write with the engine, same directory, same aio; best
  // of two rounds now and one more after the steps (the bound is the fastest the disk was seen).
  std::optional<DiskBound> disk;
  if (r.nvme && r.nvme_fraction > 0) {
    disk.emplace(r, settings, n, o.disk_size, progress);
    disk->measure("before", 2);
  }

  // 3. The offloaded step through the partition store.
  progress("allocating the partition store ...");
  std::vector<std::uint16_t> grads(n);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n, 1u << 20), [&](const tbb::blocked_range<std::size_t>& b) {
      std::fill(grads.begin() + static_cast<std::ptrdiff_t>(b.begin()), grads.begin() + static_cast<std::ptrdiff_t>(b.end()),
                std::uint16_t{0x3b00});
    });
  });
  std::vector<const std::uint16_t*> unit_grads;
  std::size_t offset = 0;
  for (const auto& s : specs) {
    unit_grads.push_back(grads.data() + offset);
    offset += s.numel;
  }
  Offload off(settings, specs, 0, arena);
  r.slice_elems = off.store().slice_elems();
  r.store = off.store().describe();
  r.host_memory = off.memory().report();
  // The store passes: zeros first (every slice then holds valid state), then reads, twice.
  if (disk && off.store().nvme_state_elements() > 0) {
    for (std::size_t b = 0; b < off.store().optimizer_buffer_count(); ++b) {
      std::memset(off.store().optimizer_buffer(b), 0, off.store().optimizer_state_bytes());
    }
    disk->store_passes(off.store(), "before", {io::IoOp::kWrite, io::IoOp::kRead, io::IoOp::kWrite, io::IoOp::kRead});
  }
  const auto init0 = Clock::now();
  for (std::size_t u = 0; u < specs.size(); ++u) {
    progress(fmt::format("writing the initial state: unit {} of {} ...", u + 1, specs.size()));
    off.store().set_state(u, std::vector<float>(specs[u].numel, 0.01f));
  }
  r.init_seconds = std::chrono::duration<double>(Clock::now() - init0).count();
  r.steps = run_steps(off.stepper(), o.steps, 1, unit_grads, progress);
  if (o.serial) {
    StepperOptions so = off.stepper().options();
    so.overlap = false;
    OptimizerStepper serial_stepper(off.store(), arena, so);
    const auto s = run_steps(serial_stepper, 1, static_cast<std::int64_t>(o.steps) + 2, unit_grads, progress);
    r.serial = *std::min_element(s.begin(), s.end(), [](const auto& a, const auto& b) { return a.seconds < b.seconds; });
  }
  if (disk) {
    disk->store_passes(off.store(), "after", {io::IoOp::kRead, io::IoOp::kWrite});  // the state is not needed any more
    progress("disk: store mixed pass ...");
    r.mixed_gbps = store_pass(off.store(), std::nullopt);
    disk->measure("after", 1);
  }
  return r;
}

// ---- the figures derived from the samples

double OffloadBenchResult::disk_pps() const {
  const double b = nvme_bytes_per_param();
  return nvme_fraction > 0 ? 1e9 / (b / read_gbps + b / write_gbps) : 0;
}
double OffloadBenchResult::bound_pps() const { return disk_pps() > 0 ? std::min(disk_pps(), kernel_pps) : kernel_pps; }
double OffloadBenchResult::median_gbps(io::IoOp op) const {
  std::vector<double> v;
  for (const auto& d : disk) {
    if (d.op == op) v.push_back(d.gbps);
  }
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}
double OffloadBenchResult::disk_median_pps() const {
  const double b = nvme_bytes_per_param();
  return nvme_fraction > 0 ? 1e9 / (b / median_gbps(io::IoOp::kRead) + b / median_gbps(io::IoOp::kWrite)) : 0;
}
double OffloadBenchResult::overlapped_pps() const {
  const double b = nvme_bytes_per_param();
  return nvme_fraction > 0 ? 1e9 / std::max(b / read_gbps, b / write_gbps) : 0;
}
StepStats OffloadBenchResult::best() const {
  return *std::min_element(steps.begin(), steps.end(), [](const auto& a, const auto& b) { return a.seconds < b.seconds; });
}
double OffloadBenchResult::median_seconds() const {
  std::vector<double> s;
  for (const auto& st : steps) s.push_back(st.seconds);
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}
double OffloadBenchResult::step_pps() const {
  const StepStats b = best();
  return static_cast<double>(b.elements) / b.seconds;
}

}  // namespace zinf::offload
