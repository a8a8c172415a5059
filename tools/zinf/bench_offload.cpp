// `zinf bench offload`: the offloaded optimizer step against same-run disk and CPU bounds. The
// measurement is offload::run_offload_bench (offload/src/bench.cpp); this prints it.
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <thread>

#include <fmt/format.h>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/offload/bench.hpp"

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

Json disk_json(const offload::OffloadBenchResult& r) {
  Json a = Json::array();
  for (const auto& d : r.disk) {
    a.push_back(Json{{"when", d.when}, {"what", d.what}, {"op", d.op == io::IoOp::kRead ? "read" : "write"}, {"GBps", d.gbps}});
  }
  return a;
}

// The figures both reports show.
struct Figures {
  offload::StepStats best;
  double step_pps, kernel_pps, bound_pps, disk_pps, disk_median_pps, overlapped_pps, fraction, nvme_fraction,
      nvme_bytes_per_param;
  std::string isa;
};
Figures figures(const offload::OffloadBenchResult& r) {
  return {r.best(),         r.step_pps(),       r.kernel_pps,     r.bound_pps(),
          r.disk_pps(),     r.disk_median_pps(), r.overlapped_pps(), r.step_pps() / r.bound_pps(),
          r.nvme_fraction,  r.nvme_bytes_per_param(), kc::isa_name(kc::active_isa())};
}

Json result_json(const offload::OffloadBenchResult& r) {
  const auto [best, step_pps, kernel_pps, bound_pps, disk_pps, disk_median_pps, overlapped_pps, fraction, nvme_fraction,
              nvme_bytes_per_param, isa] = figures(r);
  (void)nvme_bytes_per_param;
    Json j;
    j["machine"] = machine_json(r.nvme ? r.nvme_dir : ".");
    j["cpu_features"] = kernels::describe(kernels::cpu_features());
    j["isa"] = isa;
    j["threads"] = r.threads;
    j["params"] = r.params;
    j["units"] = r.units;
    j["device"] = r.nvme ? "nvme" : "cpu";
    j["ratio"] = nvme_fraction;
    j["sub_group_size"] = r.sub_group_size;
    j["slice_elems"] = r.slice_elems;
    j["buffer_count"] = r.buffer_count;
    j["io"] = r.phased ? "phased" : "mixed";
    j["aio"] = Json{{"block_size", r.aio.block_size},
                    {"queue_depth", r.aio.queue_depth},
                    {"intra_op_parallelism", r.aio.intra_op_parallelism}};
    j["host_memory"] = r.host_memory;
    j["init_seconds"] = r.init_seconds;
    j["kernel_bound_params_per_s"] = kernel_pps;
    j["disk"] = disk_json(r);
    j["disk_file_bytes"] = r.disk_file_bytes;
    j["disk_buffer_footprint"] = r.disk_footprint;
    j["disk_bound_params_per_s"] = disk_pps > 0 ? Json(disk_pps) : Json(nullptr);
    j["bound_params_per_s"] = bound_pps;
    j["disk_median_bound_params_per_s"] = disk_median_pps > 0 ? Json(disk_median_pps) : Json(nullptr);
    if (disk_median_pps > 0) j["fraction_of_median_bound"] = step_pps / std::min(disk_median_pps, kernel_pps);
    j["disk_mixed_pass_GBps"] = r.mixed_gbps > 0 ? Json(r.mixed_gbps) : Json(nullptr);
    j["disk_overlapped_bound_params_per_s"] = overlapped_pps > 0 ? Json(overlapped_pps) : Json(nullptr);
    Json steps = Json::array();
    for (const auto& s : r.steps) steps.push_back(stats_json(s));
    j["steps"] = steps;
    j["best"] = stats_json(best);
    j["median_seconds"] = r.median_seconds();
    j["fraction_of_bound"] = fraction;
    if (overlapped_pps > 0) j["fraction_of_overlapped_bound"] = step_pps / std::min(overlapped_pps, kernel_pps);
    if (r.serial) j["overlap_off"] = stats_json(*r.serial);
  return j;
}

void print_result(const offload::OffloadBenchResult& r) {
  const auto [best, step_pps, kernel_pps, bound_pps, disk_pps, disk_median_pps, overlapped_pps, fraction, nvme_fraction,
              nvme_bytes_per_param, isa] = figures(r);
  const std::string place = r.nvme ? fmt::format("nvme (ratio {})", nvme_fraction) : "cpu";
  std::cout << fmt::format("zinf bench offload: {} parameters in {} units, state on {}, {} threads ({}), {} I/O\n", r.params,
                           r.units, place, r.threads, isa, r.phased ? "phased" : "mixed");
  std::cout << fmt::format("  store: {}\n  host memory: {}\n", r.store, r.host_memory);
  if (r.nvme) {
    std::cout << fmt::format("  aio: block {} KiB, queue depth {}, {} ring(s); initial state written in {:.2f} s\n",
                             r.aio.block_size / 1024, r.aio.queue_depth,
                             r.aio.intra_op_parallelism, r.init_seconds);
  }
  std::cout << "\nbounds measured in this run:\n";
  std::cout << fmt::format("  cpu kernel (fused host step, in memory)  {:>8.3f} Gparam/s\n", kernel_pps / 1e9);
  if (disk_pps > 0) {
    std::cout << fmt::format("  disk ({:.0f}+{:.0f} B/param at read {:.2f}, write {:.2f} GB/s)  {:>8.3f} Gparam/s\n",
                             nvme_bytes_per_param, nvme_bytes_per_param, r.read_gbps, r.write_gbps, disk_pps / 1e9);
  }
  std::cout << fmt::format("  min                                      {:>8.3f} Gparam/s\n", bound_pps / 1e9);
  if (disk_median_pps > 0) {
    std::cout << fmt::format("  (disk at the median read {:.2f}, write {:.2f} GB/s: {:.3f} Gparam/s; serving reads and "
                             "writes at once: {:.3f} Gparam/s)\n",
                             r.median_gbps(io::IoOp::kRead), r.median_gbps(io::IoOp::kWrite), disk_median_pps / 1e9, overlapped_pps / 1e9);
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
  for (std::size_t i = 0; i < r.steps.size(); ++i) row(fmt::format("pipelined #{}", i + 1), r.steps[i]);
  if (r.serial) row("overlap off", *r.serial);
  std::cout << fmt::format("\nbest pipelined step: {:.3f} Gparam/s = {:.0f}% of min(disk, kernel) (median {:.3f} s)\n",
                           step_pps / 1e9, 100 * fraction, r.median_seconds());
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
                             static_cast<double>(r.disk_file_bytes) / (1ull << 30),
                             static_cast<double>(r.disk_footprint) / (1 << 20));
    for (const auto& d : r.disk) {
      std::cout << fmt::format("  {:<6} {:<13} {:<5} {:>7.3f} GB/s\n", d.when, d.what, d.op == io::IoOp::kRead ? "read" : "write",
                               d.gbps);
    }
  }
  if (r.mixed_gbps > 0) {
    std::cout << fmt::format("mixed pass (reads and writes of alternate slices in flight together): {:.3f} GB/s; the best "
                             "pipelined step moved {:.3f} GB/s\n",
                             r.mixed_gbps, static_cast<double>(best.bytes_read + best.bytes_written) / best.seconds / 1e9);
  }
  std::cout << "kernel/wait seconds are summed over pipeline threads.\n";
}

int run_bench_offload(const BenchOffloadOptions& o) {
  const bool show_progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  auto progress = [&](const std::string& what) {
    if (show_progress) std::cerr << fmt::format("\r  {:<60}", what) << std::flush;
  };
  // Settings: the config's (or DeepSpeed's defaults), then the command line.
  offload::OffloadBenchOptions b;
  if (!o.config.empty()) b.config = load_bench_config(o.config);
  auto& z = b.config.zero;
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
  b.io = o.io;
  b.params = o.params;
  b.units = o.units;
  b.threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  b.steps = o.steps;
  b.serial = o.serial;
  b.disk_size = o.disk_size;
  const offload::OffloadBenchResult r = offload::run_offload_bench(b, progress);
  if (show_progress) std::cerr << fmt::format("\r{:64}\r", "");
  if (o.json) {
    std::cout << result_json(r).dump(2) << "\n";
    return kExitOk;
  }
  print_result(r);
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
