// `zinf bench io` and `zinf tune nvme`: storage throughput and latency of the io_uring engine
// against a plain pread/pwrite baseline on the same file, and the `aio` block that suits a drive.
#include <fmt/format.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/io/bench.hpp"

namespace zinf::tools {

std::string utc_timestamp() {
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return date;
}

namespace {

using config::Json;
using io::BenchPoint;
using io::EngineOptions;
using io::IoOp;

struct BenchIoOptions {
  std::string path;
  std::string size_text = "4G";
  std::uint64_t size = 4ull << 30;
  bool sweep = false;
  bool json = false;
  std::string config;  // take the aio settings from this config
  std::string block_text;
  unsigned queue_depth = 0;
  unsigned parallelism = 0;
  bool single_submit = false;
  bool no_overlap = false;
  double seconds = -1;  // per point; <0 = default (whole file; 3 s in a sweep)
  std::string max_inflight_text = "2G";
  std::uint64_t max_inflight = 2ull << 30;
  std::string footprint_text;  // --buffer-footprint; empty = the requests in flight
  std::uint64_t footprint = 0;
  std::vector<std::string> sweep_blocks_text = {"256K", "1M", "4M", "16M"};
  std::vector<std::uint64_t> sweep_blocks;
  std::vector<unsigned> sweep_depths = {4, 16, 64, 128};
  std::vector<unsigned> sweep_parallelism = {1, 2, 4, 8};
  std::string output;  // tune nvme: config file to write
};

std::string read_first_line(const std::string& file, const std::string& key) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    if (key.empty()) return line;
    if (line.rfind(key, 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return {};
}

// The mount (device, mount point) holding `path`: the longest mount point that prefixes it.
std::pair<std::string, std::string> mount_of(const std::string& path) {
  char resolved[PATH_MAX];
  const std::string real = ::realpath(path.c_str(), resolved) != nullptr ? std::string(resolved) : path;
  std::ifstream in("/proc/self/mounts");
  std::string dev, mnt, rest, best_dev = "unknown", best_mnt;
  while (in >> dev >> mnt && std::getline(in, rest)) {
    const bool prefix = real == mnt || (real.rfind(mnt, 0) == 0 && (mnt == "/" || real[mnt.size()] == '/'));
    if (prefix && mnt.size() >= best_mnt.size()) {
      best_dev = dev;
      best_mnt = mnt;
    }
  }
  return {best_dev, best_mnt};
}

Json point_json(const BenchPoint& p) {
  Json j{{"impl", p.impl},
         {"op", p.op == IoOp::kRead ? "read" : "write"},
         {"pattern", p.random ? "random" : "sequential"},
         {"block_size", p.settings.block_size},
         {"queue_depth", p.impl == "zinf" ? Json(p.settings.queue_depth) : Json(nullptr)},
         {"intra_op_parallelism", p.settings.intra_op_parallelism},
         {"GBps", std::round(p.gbps * 1000) / 1000},
         {"bytes", p.bytes},
         {"seconds", p.seconds},
         {"latency_us",
          {{"p50", p.latency.p50}, {"p90", p.latency.p90}, {"p99", p.latency.p99}, {"max", p.latency.max}}}};
  if (p.impl == "zinf") {
    j["single_submit"] = p.settings.single_submit;
    j["overlap_events"] = p.settings.overlap_events;
    j["registered_buffers"] = p.registered_buffers;
    j["effective_queue_depth"] = p.effective_queue_depth;
    if (p.impl == "zinf") j["buffer_footprint"] = p.buffer_footprint;
    j["resubmitted"] = p.resubmitted;
  }
  return j;
}

Json aio_json(const EngineOptions& o) {
  return Json{{"block_size", o.block_size},         {"queue_depth", o.queue_depth},
              {"intra_op_parallelism", o.intra_op_parallelism}, {"single_submit", o.single_submit},
              {"overlap_events", o.overlap_events}, {"use_gds", false}};
}

std::string table(const std::vector<BenchPoint>& points) {
  std::string out = fmt::format("{:<6} {:<5} {:<6} {:>5} {:>4} {:>4} {:>8} {:>9} {:>9} {:>9}\n", "impl", "op",
                                "access", "block", "qd", "par", "GB/s", "p50 us", "p99 us", "max us");
  for (const auto& p : points) {
    const std::string qd = p.impl == "zinf" ? (p.effective_queue_depth < p.settings.queue_depth
                                                   ? fmt::format("{}*", p.settings.queue_depth)
                                                   : std::to_string(p.settings.queue_depth))
                                            : std::string("-");
    out += fmt::format("{:<6} {:<5} {:<6} {:>5} {:>4} {:>4} {:>8.3f} {:>9.0f} {:>9.0f} {:>9.0f}\n", p.impl,
                       p.op == IoOp::kRead ? "read" : "write", p.random ? "random" : "seq",
                       size_label(p.settings.block_size), qd, p.settings.intra_op_parallelism, p.gbps, p.latency.p50,
                       p.latency.p99, p.latency.max);
  }
  return out;
}

void progress(bool enabled, const std::string& line) {
  if (enabled) std::cerr << line << std::flush;
}

Json sweep_json(const io::SweepResult& s) {
  Json j;
  j["best"] = aio_json(s.best);
  j["best"]["read_GBps"] = std::round(s.best_read * 1000) / 1000;
  j["best"]["write_GBps"] = std::round(s.best_write * 1000) / 1000;
  j["best_read"] = point_json(*s.top_read);
  j["best_write"] = point_json(*s.top_write);
  j["baseline_best_read"] = point_json(*s.base_read);
  j["baseline_best_write"] = point_json(*s.base_write);
  j["aio"] = aio_json(s.best);
  Json pts = Json::array();
  for (const auto& p : s.engine) pts.push_back(point_json(p));
  for (const auto& p : s.baseline) pts.push_back(point_json(p));
  j["points"] = pts;
  return j;
}

std::string sweep_text(const io::SweepResult& s) {
  std::string out;
  for (IoOp op : {IoOp::kRead, IoOp::kWrite}) {
    std::vector<BenchPoint> v;
    for (const auto& p : s.engine) {
      if (p.op == op) v.push_back(p);
    }
    for (const auto& p : s.baseline) {
      if (p.op == op) v.push_back(p);
    }
    std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.gbps > b.gbps; });
    out += fmt::format("\nsequential {} (sorted by throughput; qd* = capped by --max-inflight)\n",
                       op == IoOp::kRead ? "read" : "write");
    out += table(v);
  }
  out += fmt::format("\nbest of each: zinf read {:.3f} GB/s vs pread {:.3f} GB/s ({:.2f}x), zinf write {:.3f} GB/s vs "
                     "pread {:.3f} GB/s ({:.2f}x)\n",
                     s.top_read->gbps, s.base_read->gbps, s.top_read->gbps / s.base_read->gbps, s.top_write->gbps,
                     s.base_write->gbps, s.top_write->gbps / s.base_write->gbps);
  out += fmt::format("best aio block (read {:.3f} GB/s, write {:.3f} GB/s):\n", s.best_read, s.best_write);
  out += Json{{"aio", aio_json(s.best)}}.dump(2) + "\n";
  return out;
}

EngineOptions settings_from(const BenchIoOptions& o) {
  EngineOptions e;
  if (!o.config.empty()) {
    const config::DeepSpeedConfig cfg = load_bench_config(o.config);
    const auto& aio = cfg.aio;
    e.block_size = static_cast<std::uint64_t>(aio.block_size);
    e.queue_depth = static_cast<unsigned>(aio.queue_depth);
    e.intra_op_parallelism = static_cast<unsigned>(aio.intra_op_parallelism);
    e.single_submit = aio.single_submit;
    e.overlap_events = aio.overlap_events;
  }
  if (!o.block_text.empty()) e.block_size = parse_size(o.block_text, "--block-size");
  if (o.queue_depth > 0) e.queue_depth = o.queue_depth;
  if (o.parallelism > 0) e.intra_op_parallelism = o.parallelism;
  if (o.single_submit) e.single_submit = true;
  if (o.no_overlap) e.overlap_events = false;
  io::validate(e);
  return e;
}

int run_bench_io(const BenchIoOptions& o) {
  const bool show_progress = ::isatty(STDERR_FILENO) != 0;
  io::BenchLimits limits;
  limits.max_inflight_bytes = o.max_inflight;
  limits.buffer_footprint = o.footprint;
  limits.max_seconds = o.seconds >= 0 ? o.seconds : (o.sweep ? 3.0 : 0.0);
  const EngineOptions settings = o.sweep ? EngineOptions{} : settings_from(o);
  progress(show_progress, fmt::format("  writing a {} test file in {} ...", size_label(o.size), o.path));
  io::IoBench bench(o.path, o.size, limits);
  progress(show_progress, fmt::format("\r{:70}\r", ""));

  Json out;
  out["path"] = o.path;
  out["machine"] = machine_json(o.path);
  out["direct"] = bench.direct();
  out["size"] = bench.size();
  out["fill_seconds"] = bench.fill_seconds();
  out["max_seconds_per_point"] = limits.max_seconds;
  std::string header = fmt::format(
      "zinf bench io: {} ({} on {}, {}), test file {:.2f} GiB written in {:.1f} s\n", o.path,
      out["machine"]["filesystem"].get<std::string>(), out["machine"]["device"].get<std::string>(),
      bench.direct() ? "O_DIRECT" : "buffered: O_DIRECT refused, page cache in play",
      static_cast<double>(bench.size()) / (1ull << 30), bench.fill_seconds());

  if (o.sweep) {
    const io::SweepResult s = bench.sweep({o.sweep_blocks, o.sweep_depths, o.sweep_parallelism},
                                          [&](const std::string& line) { progress(show_progress, line); });
    const Json sj = sweep_json(s);
    for (const auto& [k, v] : sj.items()) out[k] = v;
    if (o.json) {
      std::cout << out.dump(2) << "\n";
    } else {
      std::cout << header << sweep_text(s);
    }
    return kExitOk;
  }

  std::vector<BenchPoint> points;
  for (bool random : {false, true}) {
    for (IoOp op : {IoOp::kWrite, IoOp::kRead}) {
      progress(show_progress, fmt::format("\r  {} {} ...          ", random ? "random" : "sequential",
                                          op == IoOp::kRead ? "read" : "write"));
      points.push_back(bench.run_engine(settings, op, random));
      points.push_back(bench.run_baseline(settings.block_size, settings.intra_op_parallelism, op, random));
    }
  }
  progress(show_progress, fmt::format("\r{:40}\r", ""));
  Json pts = Json::array();
  for (const auto& p : points) pts.push_back(point_json(p));
  out["settings"] = aio_json(settings);
  out["points"] = pts;
  const BenchPoint* r = io::top(points, IoOp::kRead);
  const BenchPoint* w = io::top(points, IoOp::kWrite);
  double eng_r = 0, eng_w = 0;
  for (const auto& p : points) {
    if (p.impl == "zinf" && !p.random) (p.op == IoOp::kRead ? eng_r : eng_w) = p.gbps;
  }
  out["best"] = aio_json(settings);
  out["best"]["read_GBps"] = std::round(eng_r * 1000) / 1000;
  out["best"]["write_GBps"] = std::round(eng_w * 1000) / 1000;
  if (o.json) {
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << header
            << fmt::format("settings: block {}, queue depth {}, {} ring(s)/thread(s), single_submit {}, "
                           "overlap_events {}\n{}\n",
                           size_label(settings.block_size), settings.queue_depth, settings.intra_op_parallelism,
                           settings.single_submit, settings.overlap_events,
                           o.footprint > 0 ? fmt::format("zinf's requests rotate through {:.0f} MiB of memory\n",
                                                         static_cast<double>(points.front().buffer_footprint) / (1 << 20))
                                           : std::string())
            << table(points)
            << fmt::format("\nfastest: read {} {:.3f} GB/s, write {} {:.3f} GB/s. `--sweep` searches block size, "
                           "queue depth and parallelism.\n",
                           r->impl, r->gbps, w->impl, w->gbps);
  return kExitOk;
}

// The config that `tune nvme -o` updates: read and checked before the sweep, so a bad file
// costs nothing.
Json load_output_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    const std::filesystem::path dir = std::filesystem::path(path).parent_path();
    if (!dir.empty() && !std::filesystem::is_directory(dir)) {
      throw Error("cannot write '{}': directory '{}' does not exist; create it first", path, dir.string());
    }
    return Json::object();
  }
  std::stringstream text;
  text << in.rdbuf();
  Json cfg = config::parse_json(text.str(), path);
  if (!cfg.is_object()) throw Error("'{}' does not hold a JSON object; cannot add an aio block to it", path);
  return cfg;
}

int run_tune_nvme(const BenchIoOptions& o) {
  const bool show_progress = ::isatty(STDERR_FILENO) != 0;
  Json cfg = o.output.empty() ? Json::object() : load_output_config(o.output);
  io::BenchLimits limits;
  limits.max_inflight_bytes = o.max_inflight;
  limits.buffer_footprint = o.footprint;
  limits.max_seconds = o.seconds >= 0 ? o.seconds : 3.0;
  io::IoBench bench(o.path, o.size, limits);
  const io::SweepResult s = bench.sweep({o.sweep_blocks, o.sweep_depths, o.sweep_parallelism},
                                          [&](const std::string& line) { progress(show_progress, line); });
  if (!o.json) {
    std::cout << fmt::format("zinf tune nvme: {} ({})\n", o.path, bench.direct() ? "O_DIRECT" : "buffered")
              << sweep_text(s);
  }
  if (!o.output.empty()) {
    cfg["aio"] = aio_json(s.best);
    write_file_atomic(o.output, cfg.dump(2) + "\n");
    if (!o.json) std::cout << fmt::format("wrote the aio block into {}\n", o.output);
  }
  if (o.json) {
    Json out = sweep_json(s);
    out["path"] = o.path;
    out["machine"] = machine_json(o.path);
    out["direct"] = bench.direct();
    if (!o.output.empty()) out["output"] = o.output;
    std::cout << out.dump(2) << "\n";
  }
  return kExitOk;
}

void add_common(CLI::App& cmd, BenchIoOptions& o) {
  cmd.add_option("--path", o.path, "directory on the drive to test (a test file is created and removed there)")
      ->required();
  cmd.add_option("--size", o.size_text, "test file size (default 4G; K/M/G/T, binary)");
  cmd.add_flag("--json", o.json, "print one JSON object instead of tables");
  cmd.add_option("--seconds", o.seconds,
                 "time limit per measured point (default: whole file; 3 in a sweep)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--max-inflight", o.max_inflight_text,
                 "host memory for buffers in flight (default 2G); deeper settings are capped and marked qd*");
  cmd.add_option("--buffer-footprint", o.footprint_text,
                 "memory the engine's requests rotate through (default: only the requests in flight); "
                 "as large as the staging buffers to measure what a streaming workload gets");
  cmd.add_option("--sweep-block-sizes", o.sweep_blocks_text, "block sizes to sweep (default 256K,1M,4M,16M)")
      ->delimiter(',');
  cmd.add_option("--sweep-queue-depths", o.sweep_depths, "queue depths to sweep (default 4,16,64,128)")
      ->delimiter(',')
      ->check(CLI::Range(1u, 4096u));
  cmd.add_option("--sweep-parallelism", o.sweep_parallelism, "rings/threads to sweep (default 1,2,4,8)")
      ->delimiter(',')
      ->check(CLI::Range(1u, 64u));
}

void finish_parse(BenchIoOptions& o) {
  o.size = parse_size(o.size_text, "--size");
  o.max_inflight = parse_size(o.max_inflight_text, "--max-inflight");
  o.footprint = o.footprint_text.empty() ? 0 : parse_size(o.footprint_text, "--buffer-footprint");
  o.sweep_blocks.clear();
  for (const auto& b : o.sweep_blocks_text) {
    const std::uint64_t v = parse_size(b, "--sweep-block-sizes");
    if (v % 4096 != 0 || v > (256u << 20)) {
      throw CLI::ValidationError("--sweep-block-sizes", fmt::format("{}: must be a multiple of 4K, at most 256M", b));
    }
    o.sweep_blocks.push_back(v);
  }
}

}  // namespace

// Shared by the bench commands (commands.hpp).

// "4G", "512M", "1.5GiB", "256k", "1048576" (binary units).
std::uint64_t parse_size(const std::string& text, const std::string& option) {
  std::size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw CLI::ValidationError(option, fmt::format("'{}' is not a size (examples: 4G, 512M, 1048576)", text));
  }
  std::string unit = text.substr(pos);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  if (unit.ends_with("ib")) unit.resize(unit.size() - 2);
  else if (unit.size() == 2 && unit[1] == 'b') unit.resize(1);
  double mult = 1;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k") mult = 1024.0;
  else if (unit == "m") mult = 1024.0 * 1024;
  else if (unit == "g") mult = 1024.0 * 1024 * 1024;
  else if (unit == "t") mult = 1024.0 * 1024 * 1024 * 1024;
  else throw CLI::ValidationError(option, fmt::format("'{}': unknown unit '{}' (use K, M, G or T)", text, unit));
  const double bytes = value * mult;
  if (!(bytes >= 1) || bytes > 1e18) throw CLI::ValidationError(option, fmt::format("'{}' is not a size of at least one byte", text));
  return static_cast<std::uint64_t>(bytes);
}

std::string size_label(std::uint64_t b) { return io::size_label(b); }

Json machine_json(const std::string& path) {
  struct utsname u {};
  ::uname(&u);
  const auto [dev, mnt] = mount_of(path);
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::string date = utc_timestamp();
  return Json{{"date", date},
              {"host", host},
              {"cpu", read_first_line("/proc/cpuinfo", "model name")},
              {"cores", std::thread::hardware_concurrency()},
              {"kernel", u.release},
              {"device", dev},
              {"mount", mnt},
              {"filesystem", io::filesystem_type(path)}};
}

config::DeepSpeedConfig load_bench_config(const std::string& path) {
  const config::LoadedDocument doc = config::load_document(path);
  config::ParseOptions popts;
  popts.allow_auto = true;
  const config::ParseResult parsed = config::parse_config(doc.json, popts);
  if (parsed.diagnostics.count(config::Severity::kError) > 0) {
    throw Error("config '{}' has errors:\n{}", path, parsed.diagnostics.format());
  }
  return parsed.config;
}

void add_bench_commands(CLI::App& app, Action& action) {
  auto* bench = app.add_subcommand("bench", "Benchmarks: storage (io), CPU optimizers (adam), the offloaded optimizer step (offload), the model (model), "
                                   "collectives between ranks (comm), PCIe (pcie), host memory (mem), GEMM peak (gemm), all of them (all)");
  bench->require_subcommand(1);
  add_bench_adam_command(*bench, action);
  add_bench_offload_command(*bench, action);
  add_bench_model_command(*bench, action);
  add_bench_suite_commands(*bench, action);
  add_bench_comm_command(*bench, action);
  add_launch_commands(app, action);
  auto io_opts = std::make_shared<BenchIoOptions>();
  auto* io_cmd = bench->add_subcommand(
      "io", "NVMe/storage throughput and latency: the io_uring engine against pread/pwrite threads, same file");
  add_common(*io_cmd, *io_opts);
  io_cmd->add_flag("--sweep", io_opts->sweep,
                   "sweep block size x queue depth x parallelism (sequential read and write) and print the best "
                   "aio block");
  io_cmd->add_option("--config", io_opts->config, "take the aio settings from this config (file or preset)");
  io_cmd->add_option("--block-size", io_opts->block_text, "aio.block_size (default 1M)");
  io_cmd->add_option("--queue-depth", io_opts->queue_depth, "aio.queue_depth (default 8)")
      ->check(CLI::Range(1u, 4096u));
  io_cmd->add_option("--parallelism", io_opts->parallelism, "aio.intra_op_parallelism (default 1)")
      ->check(CLI::Range(1u, 64u));
  io_cmd->add_flag("--single-submit", io_opts->single_submit, "aio.single_submit = true");
  io_cmd->add_flag("--no-overlap-events", io_opts->no_overlap, "aio.overlap_events = false");
  io_cmd->callback([io_opts, &action] {
    finish_parse(*io_opts);
    if (!io_opts->block_text.empty()) (void)parse_size(io_opts->block_text, "--block-size");
    action = [io_opts] { return run_bench_io(*io_opts); };
  });

}

void add_tune_nvme_command(CLI::App& tune, Action& action) {
  auto tune_opts = std::make_shared<BenchIoOptions>();
  auto* nvme = tune.add_subcommand("nvme", "Sweep the drive at --path and write the best aio block into a config");
  add_common(*nvme, *tune_opts);
  nvme->add_option("-o,--output", tune_opts->output,
                   "config to write the aio block into (created, or updated keeping its other keys)");
  nvme->callback([tune_opts, &action] {
    finish_parse(*tune_opts);
    action = [tune_opts] { return run_tune_nvme(*tune_opts); };
  });
}

}  // namespace zinf::tools
