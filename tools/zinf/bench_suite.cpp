// `zinf bench pcie`, `zinf bench gemm`, `zinf bench mem` and `zinf bench all` (every sub-bench,
// one report: a table, one JSON object, and PNG plots).
#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/runtime/gpu_bench.hpp"

namespace zinf::tools {
namespace {

namespace fs = std::filesystem;
namespace kc = kernels::cpu;
using config::Json;
using Clock = std::chrono::steady_clock;

// ---- pcie

struct PcieCli {
  int device = 0;
  std::vector<std::string> sizes_text;
  int repeat = 3;
  bool json = false;
};

Json pcie_json(const runtime::PcieResult& r) {
  Json rows = Json::array();
  for (const auto& x : r.rows) {
    rows.push_back({{"path", x.path}, {"memory", x.memory}, {"direction", x.direction}, {"bytes", x.bytes}, {"GBps", x.gbps}});
  }
  Json best;
  for (const char* path : {"cuda", "zinf"}) {
    for (const char* mem : {"pinned", "pageable"}) {
      if (std::string(path) == "zinf" && std::string(mem) == "pageable") continue;
      for (const char* dir : {"h2d", "d2h", "both"}) best[path][mem][dir] = r.best(path, mem, dir);
    }
  }
  Json frac;
  for (const char* dir : {"h2d", "d2h", "both"}) {
    const double c = r.best("cuda", "pinned", dir);
    frac[dir] = c > 0 ? r.best("zinf", "pinned", dir) / c : 0.0;
  }
  return {{"gpu", r.gpu}, {"rows", rows}, {"best", best}, {"zinf_fraction_of_cuda", frac}};
}

int run_pcie(const PcieCli& c) {
  runtime::PcieOptions o;
  o.device = c.device;
  o.repeat = c.repeat;
  for (const auto& s : c.sizes_text) o.sizes.push_back(parse_size(s, "--sizes"));
  const runtime::PcieResult r = runtime::bench_pcie(o);
  if (c.json) {
    Json j = pcie_json(r);
    j["date"] = utc_timestamp();
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << fmt::format("zinf bench pcie: {} (GB/s = 1e9 bytes/s; \"both\" counts both directions)\n\n", r.gpu);
  std::cout << fmt::format("{:>8}  {:>12} {:>12} {:>12}  {:>12} {:>12} {:>12}  {:>10} {:>10} {:>10}\n", "size",
                           "cuda h2d", "cuda d2h", "cuda both", "zinf h2d", "zinf d2h", "zinf both", "pageable h2d",
                           "d2h", "both");
  std::vector<std::uint64_t> sizes;
  for (const auto& x : r.rows) {
    if (std::find(sizes.begin(), sizes.end(), x.bytes) == sizes.end()) sizes.push_back(x.bytes);
  }
  for (auto n : sizes) {
    const auto at = [&](const char* path, const char* mem, const char* dir) {
      for (const auto& x : r.rows) {
        if (x.bytes == n && x.path == path && x.memory == mem && x.direction == dir) return x.gbps;
      }
      return 0.0;
    };
    std::cout << fmt::format("{:>8}  {:>12.1f} {:>12.1f} {:>12.1f}  {:>12.1f} {:>12.1f} {:>12.1f}  {:>10.1f} {:>10.1f} {:>10.1f}\n",
                             size_label(n), at("cuda", "pinned", "h2d"), at("cuda", "pinned", "d2h"),
                             at("cuda", "pinned", "both"), at("zinf", "pinned", "h2d"), at("zinf", "pinned", "d2h"),
                             at("zinf", "pinned", "both"), at("cuda", "pageable", "h2d"), at("cuda", "pageable", "d2h"),
                             at("cuda", "pageable", "both"));
  }
  std::cout << "\nzinf's path (pinned HostMemory, the CUDA backend's copy streams) against the best cudaMemcpyAsync:";
  for (const char* dir : {"h2d", "d2h", "both"}) {
    const double cu = r.best("cuda", "pinned", dir), z = r.best("zinf", "pinned", dir);
    std::cout << fmt::format(" {} {:.1f}/{:.1f} GB/s ({:.0f}%)", dir, z, cu, cu > 0 ? 100 * z / cu : 0.0);
  }
  std::cout << "\n";
  return 0;
}

// ---- gemm

struct GemmCli {
  int device = 0;
  std::vector<std::string> shapes_text;
  int repeat = 5;
  bool json = false;
};

int run_gemm(const GemmCli& c) {
  std::vector<runtime::GemmRow> shapes;
  for (const auto& s : c.shapes_text) {
    runtime::GemmRow r;
    char x1 = 0, x2 = 0;
    std::istringstream in(s);
    if (!(in >> r.m >> x1 >> r.n >> x2 >> r.k) || x1 != 'x' || x2 != 'x' || !in.eof() || r.m < 1 || r.n < 1 || r.k < 1) {
      throw CLI::ValidationError("--shapes", fmt::format("'{}' is not MxNxK (example: 8192x8192x8192)", s));
    }
    constexpr std::int64_t kMaxSide = 1 << 20, kMaxOperand = std::int64_t{1} << 33;  // elements
    if (r.m > kMaxSide || r.n > kMaxSide || r.k > kMaxSide || r.m * r.k > kMaxOperand || r.k * r.n > kMaxOperand ||
        r.m * r.n > kMaxOperand) {
      throw CLI::ValidationError("--shapes", fmt::format("'{}' is too large (each side at most {}, each matrix at most "
                                                         "{} elements)", s, kMaxSide, kMaxOperand));
    }
    shapes.push_back(r);
  }
  const runtime::GemmResult r = runtime::bench_gemm(c.device, shapes, c.repeat);
  if (c.json) {
    Json rows = Json::array();
    for (const auto& x : r.rows) rows.push_back({{"m", x.m}, {"n", x.n}, {"k", x.k}, {"tflops", x.tflops}});
    std::cout << Json{{"gpu", r.gpu}, {"dtype", "bf16, fp32 accumulation"}, {"rows", rows}, {"peak_tflops", r.peak_tflops},
                      {"date", utc_timestamp()}}
                     .dump(2)
              << "\n";
    return 0;
  }
  std::cout << fmt::format("zinf bench gemm: {} (cuBLASLt, bf16 in and out, fp32 accumulation)\n\n", r.gpu);
  for (const auto& x : r.rows) std::cout << fmt::format("  {:>6} x {:>6} x {:>6}   {:8.1f} TFLOP/s\n", x.m, x.n, x.k, x.tflops);
  std::cout << fmt::format("\npeak {:.1f} TFLOP/s\n", r.peak_tflops);
  return 0;
}

// ---- mem (STREAM copy and triad)

struct MemCli {
  std::string size_text = "1G";
  unsigned threads = 0;
  int repeat = 5;
  bool json = false;
};

int run_mem(const MemCli& c) {
  const std::uint64_t bytes = parse_size(c.size_text, "--size");
  const std::size_t n = std::max<std::size_t>(1 << 20, bytes / 4);
  const unsigned threads = c.threads > 0 ? c.threads : std::max(1u, std::thread::hardware_concurrency());
  tbb::task_arena arena(static_cast<int>(threads));
  std::unique_ptr<float[]> a(new float[n]), b(new float[n]), d(new float[n]);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n), [&](const auto& r) {
      for (std::size_t i = r.begin(); i < r.end(); ++i) a[i] = 1.0f, b[i] = 2.0f, d[i] = 0.5f;
    });
  });
  kc::Isa isa = kc::Isa::kScalar;
  for (kc::Isa i : {kc::Isa::kAvx512, kc::Isa::kAvx2}) {
    if (kc::isa_supported(i)) {
      isa = i;
      break;
    }
  }
  kc::Exec exec(isa, &arena);
  const auto best = [&](double bytes_per_elem, const std::function<void()>& fn) {
    fn();
    double b_s = 0;
    for (int r = 0; r < c.repeat; ++r) {
      const auto t0 = Clock::now();
      fn();
      b_s = std::max(b_s, static_cast<double>(n) * bytes_per_elem / std::chrono::duration<double>(Clock::now() - t0).count());
    }
    return b_s / 1e9;
  };
  const double copy = best(8, [&] { kc::convert(b.get(), kc::DType::kF32, a.get(), kc::DType::kF32, n, exec); });
  const double triad = best(12, [&] { kc::stream_triad(a.get(), b.get(), d.get(), 0.5f, n, exec); });
  if (c.json) {
    std::cout << Json{{"copy_GBps", copy}, {"triad_GBps", triad}, {"threads", threads}, {"array_bytes", n * 4},
                      {"isa", kc::isa_name(isa)}, {"cpu", kernels::describe(kernels::cpu_features())},
                      {"date", utc_timestamp()}}
                     .dump(2)
              << "\n";
    return 0;
  }
  std::cout << fmt::format("zinf bench mem: STREAM over 3 arrays of {}, {} threads, {} code, best of {}\n"
                           "  copy  {:8.1f} GB/s\n  triad {:8.1f} GB/s\n",
                           size_label(n * 4), threads, kc::isa_name(isa), c.repeat, copy, triad);
  return 0;
}

// ---- all

struct AllCli {
  std::string path;
  std::string report;
  std::string model;
  std::string io_size = "4G";
  bool io_sweep = false;
  bool json = false;
  int timeout_s = 1800;
  std::vector<std::string> skip;
};

std::string self_exe() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("zinf") : p.string();
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

// The last non-empty line of a file (a failed child's error).
std::string last_line(const std::string& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  }
  return last;
}

// Runs `zinf ARGS --json` as a child (ARGS: "bench pcie", or a launch of several ranks); its JSON,
// or why there is none (the child's last error line; its whole stderr is appended to `log` when
// there is one).
Json run_child(const std::string& name, const std::string& args, const std::string& log, int timeout_s) {
  const std::string err = (fs::temp_directory_path() / fmt::format("zinf-bench-{}-{}.err", ::getpid(), name)).string();
  struct Remove {
    std::string p;
    ~Remove() {
      std::error_code ec;
      fs::remove(p, ec);
    }
  } remove_err{err};
  // A sub-bench that hangs (a stuck driver, a dead drive) is stopped by timeout(1) when it exists.
  const bool can_time_out = timeout_s > 0 && fs::exists("/usr/bin/timeout");
  const std::string limit = can_time_out ? fmt::format("/usr/bin/timeout --kill-after=10 {} ", timeout_s) : std::string();
  const std::string cmd = fmt::format("{}{} {} --json 2>{}", limit, quote(self_exe()), args, quote(err));
  const auto t0 = Clock::now();
  std::FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return {{"status", fmt::format("failed: cannot start `{}`", cmd)}};
  std::string out;
  char buf[4096];
  std::size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, got);
  const int rc = ::pclose(f);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!log.empty()) {
    std::ifstream e(err);
    std::ofstream(log, std::ios::app) << fmt::format("== zinf {}\n", args) << e.rdbuf();
  }
  if (can_time_out && WIFEXITED(rc) && (WEXITSTATUS(rc) == 124 || WEXITSTATUS(rc) == 137)) {
    return {{"status", fmt::format("failed: no result within {} s (--timeout)", timeout_s)}, {"seconds", secs}};
  }
  if (rc != 0) {
    std::string why = last_line(err);
    if (why.empty()) why = WIFSIGNALED(rc) ? fmt::format("killed by signal {}", WTERMSIG(rc)) : "no message";
    return {{"status", fmt::format("failed (exit {}): {}", WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, why)}, {"seconds", secs}};
  }
  try {
    Json j = Json::parse(out);
    j["status"] = "ok";
    j["seconds"] = secs;
    j["command"] = fmt::format("zinf {} --json", args);
    return j;
  } catch (const std::exception&) {
    return {{"status", fmt::format("failed: `zinf {}` printed no JSON", args)}, {"seconds", secs}};
  }
}

std::string report_text(const Json& r) {
  std::string s = fmt::format("zinf bench all: {} ({} cores), {}\n\n", r["machine"].value("cpu", ""),
                              r["machine"].value("cores", 0), r.value("date", ""));
  const auto status = [&](const char* k) { return r.contains(k) ? r[k].value("status", "missing") : std::string("missing"); };
  s += fmt::format("{:<8} {:<9} {}\n", "bench", "status", "figures");
  const auto line = [&](const char* k, const std::string& figures) {
    const std::string st = status(k);
    s += fmt::format("{:<8} {:<9} {}\n", k, st == "ok" ? "ok" : st.substr(0, st.find(':')),
                     st == "ok" ? figures : st.substr(std::min(st.size(), st.find(':') == std::string::npos ? st.size() : st.find(':') + 2)));
  };
  if (status("pcie") == "ok") {
    const Json& b = r["pcie"]["best"];
    const Json& f = r["pcie"]["zinf_fraction_of_cuda"];
    line("pcie", fmt::format("pinned H2D {:.1f}, D2H {:.1f}, both {:.1f} GB/s (zinf's path: {:.0f}%, {:.0f}%, {:.0f}% of "
                             "cudaMemcpyAsync); pageable H2D {:.1f}, D2H {:.1f} GB/s",
                             b["zinf"]["pinned"]["h2d"].get<double>(), b["zinf"]["pinned"]["d2h"].get<double>(),
                             b["zinf"]["pinned"]["both"].get<double>(), 100 * f["h2d"].get<double>(),
                             100 * f["d2h"].get<double>(), 100 * f["both"].get<double>(),
                             b["cuda"]["pageable"]["h2d"].get<double>(), b["cuda"]["pageable"]["d2h"].get<double>()));
  } else {
    line("pcie", "");
  }
  line("mem", status("mem") == "ok" ? fmt::format("STREAM copy {:.1f}, triad {:.1f} GB/s", r["mem"]["copy_GBps"].get<double>(),
                                                  r["mem"]["triad_GBps"].get<double>())
                                    : "");
  if (status("io") == "ok") {
    const Json& b = r["io"]["best"];
    line("io", fmt::format("read {:.2f}, write {:.2f} GB/s (block {}, queue depth {}, {} ring(s))", b.value("read_GBps", 0.0),
                           b.value("write_GBps", 0.0), size_label(b.value("block_size", 0ull)), b.value("queue_depth", 0),
                           b.value("intra_op_parallelism", 0)));
  } else {
    line("io", "");
  }
  if (status("adam") == "ok") {
    double best = 0;
    std::string isa;
    for (const auto& k : r["adam"]["kernels"]) {
      if (k.value("kernel", "") == "host_step_adamw_bf16" && k.value("params_per_s", 0.0) > best) {
        best = k.value("params_per_s", 0.0);
        isa = k.value("isa", "");
      }
    }
    line("adam", fmt::format("host AdamW step {:.2f} Gparam/s ({}, bf16 gradients in, bf16 parameters out)", best / 1e9, isa));
  } else {
    line("adam", "");
  }
  line("gemm", status("gemm") == "ok" ? fmt::format("bf16 peak {:.1f} TFLOP/s", r["gemm"]["peak_tflops"].get<double>()) : "");
  if (r.contains("comm")) {
    line("comm", status("comm") == "ok"
                     ? fmt::format("NCCL on {} GPUs, 256 MiB: all-gather {:.1f}, reduce-scatter {:.1f} GB/s bus bandwidth",
                                   r["comm"].value("ranks", 0), r["comm"]["all_gather"].value("bus_GBps", 0.0),
                                   r["comm"]["reduce_scatter"].value("bus_GBps", 0.0))
                     : "");
  }
  line("step", status("step") == "ok"
                   ? fmt::format("{}: {:.3f} s per step, {:.0f} tokens/s, {:.1f} model TFLOP/s", r["step"].value("model", ""),
                                 r["step"].value("step_seconds_median", 0.0), r["step"].value("tokens_per_s", 0.0),
                                 r["step"].value("model_tflops", 0.0))
                   : "");
  return s;
}

int run_all(const AllCli& c) {
  const bool skip_any = !c.skip.empty();
  const auto skipped = [&](const char* k) { return skip_any && std::find(c.skip.begin(), c.skip.end(), k) != c.skip.end(); };
  std::string log;
  if (!c.report.empty()) {
    std::error_code ec;
    fs::create_directories(c.report, ec);
    if (ec) throw Error("--report {}: cannot create the directory: {}", c.report, ec.message());
    log = (fs::path(c.report) / "bench.log").string();
    std::ofstream out(log, std::ios::trunc);
    if (!out) throw Error("--report {}: cannot write {} (is the directory writable?)", c.report, log);
  }
  const auto gq = kernels::query_gpus();
  const bool gpu = !gq.gpus.empty();
  const std::string no_gpu = fmt::format("skipped: no GPU ({})", gq.problem);
  Json r;
  r["zinf_bench_report"] = 1;
  r["date"] = utc_timestamp();
  r["machine"] = machine_json(c.path.empty() ? "." : c.path);
  if (gpu) {
    r["machine"]["gpu"] = gq.gpus.front().name;
    r["machine"]["gpu_memory_bytes"] = gq.gpus.front().total_memory;
    r["machine"]["gpus"] = gq.gpus.size();
  }
  const bool progress = ::isatty(STDERR_FILENO) != 0;
  const auto run = [&](const char* key, const std::string& args, bool needs_gpu) {
    if (skipped(key)) {
      r[key] = {{"status", "skipped: --skip"}};
    } else if (needs_gpu && !gpu) {
      r[key] = {{"status", no_gpu}};
    } else {
      const std::string full = args.rfind("launch ", 0) == 0 ? args : "bench " + args;
      if (progress) std::cerr << fmt::format("  zinf {} ...\n", full);
      r[key] = run_child(key, full, log, c.timeout_s);
    }
  };
  run("pcie", "pcie", true);
  run("mem", "mem", false);
  if (c.path.empty()) {
    r["io"] = {{"status", "skipped: no --path (give a directory on the NVMe drive to measure it)"}};
  } else {
    run("io", fmt::format("io --path {} --size {}{}", quote(c.path), c.io_size, c.io_sweep ? " --sweep" : ""), false);
  }
  run("adam", "adam --params 64M --repeat 3", false);
  run("gemm", "gemm", true);
  // Collectives between the GPUs (NCCL, one rank per GPU), for `zinf plan --gpus N`.
  if (skipped("comm")) {
    r["comm"] = {{"status", "skipped: --skip"}};
  } else if (gq.gpus.size() < 2) {
    r["comm"] = {{"status", gpu ? "skipped: one GPU" : no_gpu}};
  } else {
    run("comm", fmt::format("launch --nproc {} -- {} bench comm --backend nccl --size 256M", gq.gpus.size(), quote(self_exe())),
        true);
  }
  // The synthetic step: the 3.1B shape on the GPU; without one, a small model on the CPU backend
  // (for `zinf plan --device cpu`).
  std::string model = c.model;
  if (model.empty()) {
    const fs::path dflt = fs::path(ZINF_SOURCE_DIR) / "configs" / "models" / (gpu ? "bench-3.1b.json" : "tiny-byte.json");
    if (fs::exists(dflt)) model = dflt.string();
  }
  if (model.empty()) {
    r["step"] = {{"status", "skipped: no --model (a Hugging Face config.json for the synthetic step)"}};
  } else if (gpu) {
    run("step", fmt::format("model --backend cuda --model {} --batch 4 --seq 2048 --steps 3 --warmup 1", quote(model)), true);
  } else {
    run("step", fmt::format("model --backend cpu --model {} --batch 8 --seq 256 --steps 3 --warmup 1", quote(model)), false);
  }
  const std::string text = report_text(r);
  if (!c.report.empty()) {
    write_file_atomic((fs::path(c.report) / "report.json").string(), r.dump(2) + "\n");
    write_file_atomic((fs::path(c.report) / "report.txt").string(), text);
    std::string script = (fs::path(ZINF_SOURCE_DIR) / "tools" / "plot_bench.py").string();
    if (const char* p = std::getenv("ZINF_BENCH_PLOT_SCRIPT"); p != nullptr && *p != '\0') script = p;
    std::string plots;
    if (!fs::exists(script)) {
      plots = fmt::format("plots not drawn: {} is missing (set ZINF_BENCH_PLOT_SCRIPT)", script);
    } else {
      const std::string cmd = fmt::format("{} {} {} >> {} 2>&1", quote(python_for_plots()), quote(script), quote(c.report), quote(log));
      plots = std::system(cmd.c_str()) == 0
                  ? fmt::format("plots: {}/*.png", c.report)
                  : fmt::format("plots not drawn (python3 with matplotlib is needed; see {}): rerun `{} {} {}`", log,
                                python_for_plots(), script, c.report);
    }
    if (!c.json) std::cout << text << fmt::format("\nreport: {}/report.json, report.txt; {}\n", c.report, plots);
  } else if (!c.json) {
    std::cout << text;
  }
  if (c.json) std::cout << r.dump(2) << "\n";
  return 0;
}

}  // namespace

void add_bench_suite_commands(CLI::App& bench, Action& action) {
  auto pc = std::make_shared<PcieCli>();
  auto* p = bench.add_subcommand("pcie", "Host <-> GPU copies over sizes: pinned, pageable, both directions; zinf's path "
                                         "against cudaMemcpyAsync");
  p->add_option("--device", pc->device, "GPU (default 0)")->check(CLI::NonNegativeNumber);
  p->add_option("--sizes", pc->sizes_text, "transfer sizes (default 64K,256K,1M,4M,16M,64M,256M)")->delimiter(',');
  p->add_option("--repeat", pc->repeat, "timed rounds per point, best kept (default 3)")->check(CLI::Range(1, 100));
  p->add_flag("--json", pc->json, "print one JSON object");
  p->callback([pc, &action] {
    for (const auto& s : pc->sizes_text) (void)parse_size(s, "--sizes");
    action = [pc] { return run_pcie(*pc); };
  });

  auto gc = std::make_shared<GemmCli>();
  auto* g = bench.add_subcommand("gemm", "bf16 GEMM rate of cuBLASLt (the GPU's peak for MFU)");
  g->add_option("--device", gc->device, "GPU (default 0)")->check(CLI::NonNegativeNumber);
  g->add_option("--shapes", gc->shapes_text, "MxNxK shapes (default: square 4K/8K/16K and an 8B layer's products)")
      ->delimiter(',');
  g->add_option("--repeat", gc->repeat, "timed rounds per shape, best kept (default 5)")->check(CLI::Range(1, 100));
  g->add_flag("--json", gc->json, "print one JSON object");
  g->callback([gc, &action] { action = [gc] { return run_gemm(*gc); }; });

  auto mc = std::make_shared<MemCli>();
  auto* m = bench.add_subcommand("mem", "Host memory bandwidth: STREAM copy and triad with all cores");
  m->add_option("--size", mc->size_text, "bytes per array (default 1G)");
  m->add_option("--threads", mc->threads, "threads (default: all cores)")->check(CLI::Range(1u, 4096u));
  m->add_option("--repeat", mc->repeat, "timed runs, best kept (default 5)")->check(CLI::Range(1, 100));
  m->add_flag("--json", mc->json, "print one JSON object");
  m->callback([mc, &action] {
    (void)parse_size(mc->size_text, "--size");
    action = [mc] { return run_mem(*mc); };
  });

  auto ac = std::make_shared<AllCli>();
  auto* a = bench.add_subcommand("all", "Every sub-bench (pcie, mem, io, adam, gemm, comm, step) in one report: a table, JSON, plots");
  a->add_option("--path", ac->path, "a directory on the NVMe drive for the io bench (without it, io is skipped)");
  a->add_option("--report", ac->report, "write report.json, report.txt, bench.log and PNG plots into this directory");
  a->add_option("--model", ac->model, "model config for the synthetic GPU step (default configs/models/bench-3.1b.json)");
  a->add_option("--io-size", ac->io_size, "test file size for the io bench (default 4G)");
  a->add_flag("--io-sweep", ac->io_sweep, "sweep the aio settings (what `zinf tune` needs for its aio block)");
  a->add_option("--skip", ac->skip, "sub-benches to leave out: pcie,mem,io,adam,gemm,comm,step")
      ->delimiter(',')
      ->check(CLI::IsMember({"pcie", "mem", "io", "adam", "gemm", "comm", "step"}));
  a->add_flag("--json", ac->json, "print the report as one JSON object");
  a->add_option("--timeout", ac->timeout_s, "seconds each sub-bench may take before it is stopped (default 1800; 0: none)")
      ->check(CLI::Range(0, 86400));
  a->callback([ac, &action] {
    (void)parse_size(ac->io_size, "--io-size");
    action = [ac] { return run_all(*ac); };
  });
}

}  // namespace zinf::tools
