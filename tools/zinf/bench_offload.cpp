// `zinf bench offload`: throughput of the whole offloaded optimizer step (the partition store and
// the pipelined step of offload/) with the state in host memory or on NVMe, next to the two bounds
// measured in the same run on the same machine:
//   - the CPU kernel bound: the fused host step (bf16 gradients in, fp32 state, bf16 parameters
//     out) on arrays already in memory, with the same threads;
//   - the disk bound: the NVMe bytes the step must move per parameter (12 read + 12 written for
//     the fraction `ratio` on NVMe) over the sequential read and write bandwidth the io_uring
//     engine measures on the same directory with the same aio settings. Reads and writes are
//     counted one after the other, as a drive that cannot overlap them would serve them.
// A pipelined step that keeps both busy runs at min(disk bound, kernel bound); the report gives
// the step's fraction of that, and the step's time split into kernel, read-wait and write-wait.
#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/io/bench.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/offload/offload.hpp"

namespace zinf::tools {

namespace {

using config::Json;
using config::OffloadDevice;
namespace kc = kernels::cpu;
using Clock = std::chrono::steady_clock;

struct BenchOffloadOptions {
  std::string params_text = "256M";
  std::size_t params = 256u << 20;
  std::string device_text = "nvme";
  std::string path;
  double ratio = -1;       // <0: the config's (default 1.0)
  std::string sub_group_text;
  std::size_t sub_group = 0;  // 0: the config's (default 1e9)
  unsigned buffer_count = 0;  // 0: the config's (default 4)
  unsigned units = 16;
  unsigned threads = 0;
  unsigned steps = 3;
  std::string config;
  std::string disk_size_text;  // default: the size of the state on NVMe
  std::uint64_t disk_size = 0;
  std::string io = "default";  // the I/O schedule: phased, mixed, or the environment's / default
  bool serial = false;  // also time one step with overlap off
  bool json = false;
};

struct Times {
  std::vector<offload::StepStats> steps;
  offload::StepStats best() const {
    return *std::min_element(steps.begin(), steps.end(),
                             [](const auto& a, const auto& b) { return a.seconds < b.seconds; });
  }
  double median() const {
    std::vector<double> s;
    for (const auto& st : steps) s.push_back(st.seconds);
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  }
};

// The fused host step on in-memory arrays: the kernel bound, in parameters per second. The arrays
// come from the same kind of host memory as the store's (pinned, huge-page-aligned), so the two
// differ only in what the store adds.
double kernel_bound(std::size_t n, tbb::task_arena& arena, unsigned repeat) {
  offload::HostMemory mem(0, offload::default_pin_mode(true));
  offload::HostBuffer state = mem.allocate(offload::Purpose::kOptimizerState, n * 12, "kernel bound state");
  offload::HostBuffer grads = mem.allocate(offload::Purpose::kGradients, n * 2, "kernel bound gradients");
  offload::HostBuffer out = mem.allocate(offload::Purpose::kParameters, n * 2, "kernel bound parameters");
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
double store_pass(offload::PartitionStore& store, std::optional<io::IoOp> op) {
  io::SwapStore* swap = store.optimizer_swap();
  std::vector<io::SwapHandle> inflight(store.optimizer_buffer_count());
  std::uint64_t bytes = 0;
  std::size_t i = 0;
  const auto t0 = Clock::now();
  for (const offload::Slice& s : store.slices()) {
    if (s.state_tier != offload::Tier::kNvme) continue;
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

Json stats_json(const offload::StepStats& s) {
  return Json{{"seconds", s.seconds},
              {"params_per_s", static_cast<double>(s.elements) / s.seconds},
              {"nvme_GBps", static_cast<double>(s.bytes_read + s.bytes_written) / s.seconds / 1e9},
              {"bytes_read", s.bytes_read},
              {"bytes_written", s.bytes_written},
              {"slices", s.slices},
              {"kernel_seconds", s.kernel_seconds},
              {"read_wait_seconds", s.read_wait_seconds},
              {"write_wait_seconds", s.write_wait_seconds},
              {"input_wait_seconds", s.input_wait_seconds}};
}

int run_bench_offload(const BenchOffloadOptions& o) {
  const unsigned threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  tbb::task_arena arena(static_cast<int>(threads));
  const bool show_progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  auto progress = [&](const std::string& what) {
    if (show_progress) std::cerr << fmt::format("\r  {:<60}", what) << std::flush;
  };

  // Settings: the config's (or DeepSpeed's defaults), then the command line.
  config::DeepSpeedConfig cfg;
  if (!o.config.empty()) cfg = load_bench_config(o.config);
  auto& z = cfg.zero;
  if (!z.offload_optimizer) z.offload_optimizer = config::OffloadOptimizerConfig{};
  z.offload_param.reset();  // the bench measures the optimizer step; parameters stay in host memory
  auto& oo = *z.offload_optimizer;
  oo.device = o.device_text == "cpu" ? OffloadDevice::kCpu : OffloadDevice::kNvme;
  if (!o.path.empty()) oo.nvme_path = o.path;
  if (o.ratio >= 0) oo.ratio = o.ratio;
  if (o.sub_group > 0) z.sub_group_size = static_cast<std::int64_t>(o.sub_group);
  if (o.buffer_count > 0) oo.buffer_count = o.buffer_count;
  const bool nvme = oo.device == OffloadDevice::kNvme;
  if (nvme && oo.nvme_path.empty()) {
    throw Error("--device nvme needs --path DIR: config '{}' has no offload_optimizer.nvme_path", o.config);
  }
  if (!nvme) oo.ratio = 1.0;
  offload::OffloadSettings settings = offload::offload_settings(cfg);
  if (o.io != "default") settings.stepper.phased = o.io == "phased";
  const double nvme_fraction = nvme ? settings.store.nvme_ratio : 0.0;

  // Units: --units equal shards (the last takes the remainder), like the layers of a model.
  const std::size_t n = o.params;
  const unsigned units = static_cast<unsigned>(std::min<std::size_t>(o.units, n));
  std::vector<offload::UnitSpec> specs;
  for (unsigned u = 0; u < units; ++u) {
    const std::size_t begin = n * u / units, end = n * (u + 1) / units;
    specs.push_back({fmt::format("layers.{}", u), end - begin});
  }

  // 1. The kernel bound (arrays of at most 128M parameters: far past every cache).
  progress("kernel bound ...");
  const std::size_t kernel_n = std::min<std::size_t>(n, 128u << 20);
  const double kernel_pps = kernel_bound(kernel_n, arena, 3);

  // 2. The disk bound: sequential read and write with the engine, same directory, same aio; best
  // of two rounds now and one more after the steps (the bound is the fastest the disk was seen).
  double read_gbps = 0, write_gbps = 0;
  std::uint64_t disk_file_bytes = 0;
  std::uint64_t disk_footprint = 0;
  Json disk_points = Json::array();
  std::unique_ptr<io::IoBench> disk;
  // One bandwidth sample: kept for the report, and the fastest of each direction is the bound.
  auto record = [&](const char* when, const char* what, io::IoOp op, double gbps) {
    double& best = op == io::IoOp::kRead ? read_gbps : write_gbps;
    best = std::max(best, gbps);
    disk_points.push_back(
        Json{{"when", when}, {"what", what}, {"op", op == io::IoOp::kRead ? "read" : "write"}, {"GBps", gbps}});
  };
  auto measure_disk = [&](const char* when, int rounds) {
    for (int r = 0; r < rounds; ++r) {
      for (io::IoOp op : {io::IoOp::kWrite, io::IoOp::kRead}) {
        progress(fmt::format("disk bound ({}): {} ...", when, op == io::IoOp::kRead ? "read" : "write"));
        record(when, "zinf bench io", op, disk->run_engine(settings.aio, op, false).gbps);
      }
    }
  };
  if (nvme && nvme_fraction > 0) {
    const std::string dir = settings.optimizer_paths.front();
    // As large as the state on NVMe by default: a smaller file can be served partly from a cache
    // in front of the drive (a virtual disk's host, a drive's own), which the swap files are too
    // large for, and would make the bound unreachable for reasons that are not the step's.
    const auto state_bytes = static_cast<std::uint64_t>(static_cast<double>(n) * 12 * nvme_fraction);
    const std::uint64_t size = o.disk_size > 0 ? o.disk_size : std::max<std::uint64_t>(state_bytes, 256u << 20);
    disk_file_bytes = size;
    progress(fmt::format("disk bound: writing a {:.1f} GiB file in {} ...", static_cast<double>(size) / (1ull << 30), dir));
    // The engine's requests land in as much memory as the step's staging buffers, as the step's
    // do: reads into a small cache-warm window can be faster than any streaming workload sees
    // (25% on the GPU machine's virtual disk; see bench/results/offload.md).
    io::BenchLimits limits;
    limits.buffer_footprint = settings.store.optimizer_buffers * std::min<std::uint64_t>(settings.store.slice_elems, n) * 12;
    disk_footprint = limits.buffer_footprint;
    disk = std::make_unique<io::IoBench>(dir, size, limits);
    measure_disk("before", 2);
  }

  // 3. The offloaded step through the partition store.
  progress("allocating the partition store ...");
  std::vector<std::uint16_t> grads(n);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n, 1u << 20), [&](const tbb::blocked_range<std::size_t>& r) {
      std::fill(grads.begin() + static_cast<std::ptrdiff_t>(r.begin()), grads.begin() + static_cast<std::ptrdiff_t>(r.end()),
                std::uint16_t{0x3b00});
    });
  });
  std::vector<const std::uint16_t*> unit_grads;
  std::size_t offset = 0;
  for (const auto& s : specs) {
    unit_grads.push_back(grads.data() + offset);
    offset += s.numel;
  }
  offload::Offload off(settings, specs, 0, arena);
  // The store passes: zeros first (every slice then holds valid state), then reads, twice.
  auto measure_store = [&](const char* when, std::initializer_list<io::IoOp> ops) {
    for (io::IoOp op : ops) {
      progress(fmt::format("disk bound ({}): store {} pass ...", when, op == io::IoOp::kRead ? "read" : "write"));
      record(when, "store pass", op, store_pass(off.store(), op));
    }
  };
  if (off.store().nvme_state_elements() > 0) {
    for (std::size_t b = 0; b < off.store().optimizer_buffer_count(); ++b) {
      std::memset(off.store().optimizer_buffer(b), 0, off.store().optimizer_state_bytes());
    }
    measure_store("before", {io::IoOp::kWrite, io::IoOp::kRead, io::IoOp::kWrite, io::IoOp::kRead});
  }
  const auto init0 = Clock::now();
  for (std::size_t u = 0; u < specs.size(); ++u) {
    progress(fmt::format("writing the initial state: unit {} of {} ...", u + 1, specs.size()));
    off.store().set_state(u, std::vector<float>(specs[u].numel, 0.01f));
  }
  const double init_seconds = std::chrono::duration<double>(Clock::now() - init0).count();

  auto run_steps = [&](offload::OptimizerStepper& stepper, unsigned count, std::int64_t first_step) {
    Times t;
    for (unsigned i = 0; i <= count; ++i) {  // the first is a warm-up
      progress(fmt::format("step {} of {}{} ...", i, count, stepper.options().overlap ? "" : " (overlap off)"));
      offload::StepInputs in;
      in.adam.lr = 1e-4;
      in.adam.weight_decay = 0.01;
      in.adam.step = first_step + i;
      in.adam.grad_scale = 0.5f;
      in.gradient = [&](std::size_t u) -> const void* { return unit_grads[u]; };
      const offload::StepStats st = stepper.step(in);
      if (i > 0) t.steps.push_back(st);
    }
    return t;
  };
  const Times pipelined = run_steps(off.stepper(), o.steps, 1);
  Times serial;
  if (o.serial) {
    offload::StepperOptions so = off.stepper().options();
    so.overlap = false;
    offload::OptimizerStepper serial_stepper(off.store(), arena, so);
    serial = run_steps(serial_stepper, 1, static_cast<std::int64_t>(o.steps) + 2);
  }
  double mixed_gbps = 0;
  if (disk) {
    measure_store("after", {io::IoOp::kRead, io::IoOp::kWrite});  // the state is not needed any more
    progress("disk: store mixed pass ...");
    mixed_gbps = store_pass(off.store(), std::nullopt);
    measure_disk("after", 1);
    disk.reset();
  }
  if (show_progress) std::cerr << fmt::format("\r{:64}\r", "");

  const double nvme_bytes_per_param = 12.0 * nvme_fraction;  // each way
  const double disk_pps = nvme_fraction > 0 ? 1e9 / (nvme_bytes_per_param / read_gbps + nvme_bytes_per_param / write_gbps)
                                            : 0;
  const double bound_pps = disk_pps > 0 ? std::min(disk_pps, kernel_pps) : kernel_pps;
  // The same bound from the median bandwidth of each direction over every sample: how the step
  // compares with the drive on a typical round rather than its fastest one.
  auto median_of = [&](const char* op) {
    std::vector<double> v;
    for (const auto& d : disk_points) {
      if (d["op"] == op) v.push_back(d["GBps"].get<double>());
    }
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v.size() % 2 == 1 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  const double median_read = median_of("read"), median_write = median_of("write");
  const double disk_median_pps =
      nvme_fraction > 0 ? 1e9 / (nvme_bytes_per_param / median_read + nvme_bytes_per_param / median_write) : 0;
  // A stricter reference for drives that serve reads and writes at once: the slower direction alone.
  const double overlapped_pps =
      nvme_fraction > 0 ? 1e9 / std::max(nvme_bytes_per_param / read_gbps, nvme_bytes_per_param / write_gbps) : 0;

  const offload::StepStats best = pipelined.best();
  const double step_pps = static_cast<double>(best.elements) / best.seconds;
  const double fraction = step_pps / bound_pps;
  const std::string place = nvme ? fmt::format("nvme (ratio {})", nvme_fraction) : "cpu";
  const std::string isa = kc::isa_name(kc::active_isa());
  if (o.json) {
    Json j;
    j["machine"] = machine_json(nvme ? settings.optimizer_paths.front() : ".");
    j["cpu_features"] = kernels::describe(kernels::cpu_features());
    j["isa"] = isa;
    j["threads"] = threads;
    j["params"] = n;
    j["units"] = units;
    j["device"] = nvme ? "nvme" : "cpu";
    j["ratio"] = nvme_fraction;
    j["sub_group_size"] = z.sub_group_size;
    j["slice_elems"] = off.store().slice_elems();
    j["buffer_count"] = oo.buffer_count;
    j["io"] = settings.stepper.phased ? "phased" : "mixed";
    j["aio"] = Json{{"block_size", settings.aio.block_size},
                    {"queue_depth", settings.aio.queue_depth},
                    {"intra_op_parallelism", settings.aio.intra_op_parallelism}};
    j["host_memory"] = off.memory().report();
    j["init_seconds"] = init_seconds;
    j["kernel_bound_params_per_s"] = kernel_pps;
    j["disk"] = disk_points;
    j["disk_file_bytes"] = disk_file_bytes;
    j["disk_buffer_footprint"] = disk_footprint;
    j["disk_bound_params_per_s"] = disk_pps > 0 ? Json(disk_pps) : Json(nullptr);
    j["bound_params_per_s"] = bound_pps;
    j["disk_median_bound_params_per_s"] = disk_median_pps > 0 ? Json(disk_median_pps) : Json(nullptr);
    if (disk_median_pps > 0) j["fraction_of_median_bound"] = step_pps / std::min(disk_median_pps, kernel_pps);
    j["disk_mixed_pass_GBps"] = mixed_gbps > 0 ? Json(mixed_gbps) : Json(nullptr);
    j["disk_overlapped_bound_params_per_s"] = overlapped_pps > 0 ? Json(overlapped_pps) : Json(nullptr);
    Json steps = Json::array();
    for (const auto& s : pipelined.steps) steps.push_back(stats_json(s));
    j["steps"] = steps;
    j["best"] = stats_json(best);
    j["median_seconds"] = pipelined.median();
    j["fraction_of_bound"] = fraction;
    if (overlapped_pps > 0) j["fraction_of_overlapped_bound"] = step_pps / std::min(overlapped_pps, kernel_pps);
    if (o.serial) j["overlap_off"] = stats_json(serial.best());
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("zinf bench offload: {} parameters in {} units, state on {}, {} threads ({}), {} I/O\n", n,
                           units, place, threads, isa, settings.stepper.phased ? "phased" : "mixed");
  std::cout << fmt::format("  store: {}\n  host memory: {}\n", off.store().describe(), off.memory().report());
  if (nvme) {
    std::cout << fmt::format("  aio: block {} KiB, queue depth {}, {} ring(s); initial state written in {:.2f} s\n",
                             settings.aio.block_size / 1024, settings.aio.queue_depth,
                             settings.aio.intra_op_parallelism, init_seconds);
  }
  std::cout << "\nbounds measured in this run:\n";
  std::cout << fmt::format("  cpu kernel (fused host step, in memory)  {:>8.3f} Gparam/s\n", kernel_pps / 1e9);
  if (disk_pps > 0) {
    std::cout << fmt::format("  disk ({:.0f}+{:.0f} B/param at read {:.2f}, write {:.2f} GB/s)  {:>8.3f} Gparam/s\n",
                             nvme_bytes_per_param, nvme_bytes_per_param, read_gbps, write_gbps, disk_pps / 1e9);
  }
  std::cout << fmt::format("  min                                      {:>8.3f} Gparam/s\n", bound_pps / 1e9);
  if (disk_median_pps > 0) {
    std::cout << fmt::format("  (disk at the median read {:.2f}, write {:.2f} GB/s: {:.3f} Gparam/s; serving reads and "
                             "writes at once: {:.3f} Gparam/s)\n",
                             median_read, median_write, disk_median_pps / 1e9, overlapped_pps / 1e9);
  }
  std::cout << "\n";
  std::cout << fmt::format("{:<22} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}\n", "step", "seconds", "Gparam/s", "NVMe GB/s",
                           "kernel s", "rd-wait s", "wr-wait s");
  auto row = [&](const std::string& name, const offload::StepStats& s) {
    std::cout << fmt::format("{:<22} {:>9.3f} {:>10.3f} {:>9.2f} {:>9.3f} {:>9.3f} {:>9.3f}\n", name, s.seconds,
                             static_cast<double>(s.elements) / s.seconds / 1e9,
                             static_cast<double>(s.bytes_read + s.bytes_written) / s.seconds / 1e9, s.kernel_seconds,
                             s.read_wait_seconds, s.write_wait_seconds);
  };
  for (std::size_t i = 0; i < pipelined.steps.size(); ++i) row(fmt::format("pipelined #{}", i + 1), pipelined.steps[i]);
  if (o.serial) row("overlap off", serial.best());
  std::cout << fmt::format("\nbest pipelined step: {:.3f} Gparam/s = {:.0f}% of min(disk, kernel) (median {:.3f} s)\n",
                           step_pps / 1e9, 100 * fraction, pipelined.median());
  if (overlapped_pps > 0) {
    std::cout << fmt::format("  = {:.0f}% of min(disk at the median, kernel); {:.0f}% of min(overlapped disk, kernel)\n",
                             100 * step_pps / std::min(disk_median_pps, kernel_pps),
                             100 * step_pps / std::min(overlapped_pps, kernel_pps));
  }
  if (nvme_fraction > 0) {
    std::cout << fmt::format("disk: the fastest read and write seen in 3 rounds of `zinf bench io` (sequential, same aio, "
                             "{:.1f} GiB file,\nrequests rotating through {:.0f} MiB of memory like the staging "
                             "buffers) and 3 pure read and write passes over the store's own\nslices; 2 rounds "
                             "before the steps, 1 after:\n",
                             static_cast<double>(disk_file_bytes) / (1ull << 30),
                             static_cast<double>(disk_footprint) / (1 << 20));
    for (const auto& d : disk_points) {
      std::cout << fmt::format("  {:<6} {:<13} {:<5} {:>7.3f} GB/s\n", d["when"].get<std::string>(),
                               d["what"].get<std::string>(), d["op"].get<std::string>(), d["GBps"].get<double>());
    }
  }
  if (mixed_gbps > 0) {
    std::cout << fmt::format("mixed pass (reads and writes of alternate slices in flight together): {:.3f} GB/s; the best "
                             "pipelined step moved {:.3f} GB/s\n",
                             mixed_gbps, static_cast<double>(best.bytes_read + best.bytes_written) / best.seconds / 1e9);
  }
  std::cout << "kernel/wait seconds are summed over pipeline threads.\n";
  return kExitOk;
}

}  // namespace

void add_bench_offload_command(CLI::App& bench, Action& action) {
  auto o = std::make_shared<BenchOffloadOptions>();
  auto* cmd = bench.add_subcommand(
      "offload", "The offloaded optimizer step (state in host memory or on NVMe) against same-run disk and CPU bounds");
  cmd->add_option("--params", o->params_text, "parameters (default 256M = 256 x 2^20)");
  cmd->add_option("--device", o->device_text, "where the optimizer state lives: nvme (default) or cpu")
      ->check(CLI::IsMember({"cpu", "nvme"}));
  cmd->add_option("--path", o->path, "swap directory for --device nvme (offload_optimizer.nvme_path)");
  cmd->add_option("--ratio", o->ratio, "fraction of the state on NVMe (offload_optimizer.ratio; default 1)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--sub-group", o->sub_group_text, "elements per slice (zero_optimization.sub_group_size)");
  cmd->add_option("--buffer-count", o->buffer_count, "staging buffers (offload_optimizer.buffer_count; default 4)")
      ->check(CLI::Range(1u, 1024u));
  cmd->add_option("--units", o->units, "units the parameters are split into (default 16)")->check(CLI::Range(1u, 100000u));
  cmd->add_option("--threads", o->threads, "threads (default: all cores)")->check(CLI::Range(1u, 4096u));
  cmd->add_option("--steps", o->steps, "timed steps after one warm-up (default 3)")->check(CLI::Range(1u, 1000u));
  cmd->add_option("--config", o->config, "take offload_optimizer, sub_group_size and aio from this config (file or preset)");
  cmd->add_option("--disk-size", o->disk_size_text, "file size for zinf bench io's part of the disk bound (default: the size of the state on NVMe)");
  cmd->add_option("--io", o->io, "I/O schedule of the step: phased or mixed (default: ZINF_OFFLOAD_IO, else zinf's default)")
      ->check(CLI::IsMember({"default", "phased", "mixed"}));
  cmd->add_flag("--serial", o->serial, "also time one step with overlap off (ZINF_OFFLOAD_OVERLAP=0)");
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback([o, &action] {
    o->params = parse_count(o->params_text, "--params");
    if (!o->sub_group_text.empty()) o->sub_group = parse_count(o->sub_group_text, "--sub-group");
    if (!o->disk_size_text.empty()) o->disk_size = parse_size(o->disk_size_text, "--disk-size");
    if (o->device_text == "nvme" && o->path.empty() && o->config.empty()) {
      throw CLI::ValidationError("--path", "--device nvme needs --path DIR (or --config with offload_optimizer.nvme_path)");
    }
    action = [o] { return run_bench_offload(*o); };
  });
}

}  // namespace zinf::tools
