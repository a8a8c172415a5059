// `zinf bench adam`: throughput of the CPU optimizer kernels (params/s and bytes/s actually moved)
// for each ISA, next to a STREAM-style copy and triad measured in the same run with the same
// threads, so each kernel's bandwidth reads as a fraction of what the memory system delivers.
#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"

namespace zinf::tools {

// Element counts: "256M" = 256 x 2^20, "1G", "1000000".
std::size_t parse_count(const std::string& text, const std::string& option) {
  std::size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw CLI::ValidationError(option, fmt::format("'{}' is not a count (examples: 256M, 1G, 1000000)", text));
  }
  const std::string unit = text.substr(pos);
  double mult = 1;
  if (unit == "K" || unit == "k") mult = 1024.0;
  else if (unit == "M" || unit == "m") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "g") mult = 1024.0 * 1024 * 1024;
  else if (!unit.empty()) throw CLI::ValidationError(option, fmt::format("'{}': unknown unit '{}' (K, M, G)", text, unit));
  if (!(v * mult >= 1) || v * mult > 1e12) throw CLI::ValidationError(option, fmt::format("'{}' is out of range", text));
  return static_cast<std::size_t>(v * mult);
}

namespace {

using config::Json;
namespace kc = kernels::cpu;
using Clock = std::chrono::steady_clock;

struct BenchAdamOptions {
  std::string params_text = "256M";
  std::size_t params = 256u << 20;
  unsigned threads = 0;
  std::string grad_dtype_text = "bf16";
  kc::DType grad_dtype = kc::DType::kBF16;
  std::vector<std::string> isas_text;
  unsigned repeat = 5;
  bool json = false;
};

kc::DType parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "f32") return kc::DType::kF32;
  if (s == "bf16") return kc::DType::kBF16;
  if (s == "fp16" || s == "f16") return kc::DType::kF16;
  throw CLI::ValidationError("--grad-dtype", fmt::format("'{}': choose fp32, bf16 or fp16", s));
}

// Page-aligned, first touched in parallel inside the arena (so pages land near their threads).
struct Array {
  std::unique_ptr<std::uint8_t[], void (*)(void*)> mem{nullptr, std::free};
  std::size_t bytes = 0;
  template <class T>
  T* as() {
    return reinterpret_cast<T*>(mem.get());
  }
};

Array make_array(std::size_t bytes, tbb::task_arena& arena, std::uint8_t fill) {
  Array a;
  void* p = nullptr;
  if (::posix_memalign(&p, 4096, std::max<std::size_t>(bytes, 4096)) != 0) {
    throw Error("cannot allocate {:.1f} GiB for the benchmark: lower --params", static_cast<double>(bytes) / (1 << 30));
  }
  a.mem.reset(static_cast<std::uint8_t*>(p));
  a.bytes = bytes;
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, bytes, 1u << 20), [&](const tbb::blocked_range<std::size_t>& r) {
      std::memset(a.mem.get() + r.begin(), fill, r.size());
    });
  });
  return a;
}

struct Timing {
  double best = 0;    // seconds
  double median = 0;  // seconds
};

Timing time_it(unsigned repeat, const std::function<void()>& fn) {
  fn();  // warm-up: page faults, frequency ramp
  std::vector<double> t;
  for (unsigned i = 0; i < repeat; ++i) {
    const auto t0 = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};
}

struct Result {
  std::string kernel;
  std::string isa;
  double bytes_per_param = 0;
  Timing time;
  std::size_t n = 0;
  double params_per_s() const { return static_cast<double>(n) / time.best; }
  double bytes_per_s() const { return params_per_s() * bytes_per_param; }
};

int run_bench_adam(const BenchAdamOptions& o) {
  const unsigned threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  tbb::task_arena arena(static_cast<int>(threads));
  const std::size_t n = o.params;
  std::vector<kc::Isa> isas;
  const char* forced = std::getenv("ZINF_CPU_ISA");
  if (o.isas_text.empty() && forced != nullptr && *forced != '\0') {
    isas.push_back(kc::active_isa());  // validates the variable
  } else if (o.isas_text.empty()) {
    for (kc::Isa isa : {kc::Isa::kAvx512, kc::Isa::kAvx2, kc::Isa::kScalar}) {
      if (kc::isa_supported(isa)) isas.push_back(isa);
    }
  } else {
    for (const auto& s : o.isas_text) {
      const kc::Isa isa = kc::parse_isa(s);
      if (!kc::isa_supported(isa)) throw Error("this CPU cannot run the {} kernels", s);
      isas.push_back(isa);
    }
  }
  const std::size_t gb = kc::dtype_bytes(o.grad_dtype);
  if (!o.json && ::isatty(STDERR_FILENO) != 0) {
    std::cerr << fmt::format("  allocating {:.1f} GiB for {} parameters ...\n",
                             static_cast<double>(n) * (16 + gb + 2 + 8) / (1ull << 30), n);
  }
  // fp32 master, moments, grads in the chosen dtype, bf16 out; bf16 moments for the bf16-state run.
  Array p = make_array(n * 4, arena, 0x3c), m = make_array(n * 4, arena, 0), v = make_array(n * 4, arena, 0);
  Array g = make_array(n * gb, arena, 0x3b), g32 = make_array(n * 4, arena, 0x3b), out = make_array(n * 2, arena, 0);
  Array m16 = make_array(n * 2, arena, 0), v16 = make_array(n * 2, arena, 0);

  std::vector<Result> results;
  const bool show_progress = !o.json && ::isatty(STDERR_FILENO) != 0;
  const auto add = [&](const std::string& kernel, kc::Isa isa, double bytes_per_param, const std::function<void()>& fn) {
    if (show_progress) std::cerr << fmt::format("\r  {:<28} {:<7}", kernel, kc::isa_name(isa)) << std::flush;
    results.push_back({kernel, kc::isa_name(isa), bytes_per_param, time_it(o.repeat, fn), n});
  };

  // STREAM copy and triad over the same arena, with the best ISA's vector code (bytes as STREAM
  // counts them: no write-allocate, so the reference errs on the high side).
  {
    kc::Exec exec(isas.front(), &arena);
    float* a = p.as<float>();
    const float* b = m.as<float>();
    const float* c = v.as<float>();
    add("stream_copy", isas.front(), 8, [&] { kc::convert(b, kc::DType::kF32, a, kc::DType::kF32, n, exec); });
    add("stream_triad", isas.front(), 12, [&] { kc::stream_triad(a, b, c, 0.5f, n, exec); });
    std::fill(a, a + n, 0.01f);
  }

  for (kc::Isa isa : isas) {
    kc::Exec exec(isa, &arena);
    kc::AdamConfig adam;
    adam.lr = 1e-4;
    adam.weight_decay = 0.01;
    adam.step = 10;
    // Bare fp32 AdamW: read p, g, m, v; write p, m, v.
    add("adamw_fp32", isa, 28, [&] {
      kc::adam_step(adam, {p.as<float>(), g32.mem.get(), kc::DType::kF32, m.mem.get(), v.mem.get(), kc::DType::kF32,
                           nullptr, kc::DType::kBF16, n},
                    exec);
    });
    // The fused host step: scaled grads in (grad dtype), fp32 state, bf16 parameters out.
    adam.grad_scale = 0.5f;
    add(fmt::format("host_step_adamw_{}", kc::dtype_name(o.grad_dtype)), isa, 24.0 + gb + 2, [&] {
      kc::adam_step(adam, {p.as<float>(), g.mem.get(), o.grad_dtype, m.mem.get(), v.mem.get(), kc::DType::kF32,
                           out.mem.get(), kc::DType::kBF16, n},
                    exec);
    });
    // The whole host step as training runs it: gradient statistics (norm, inf/NaN), the clip
    // coefficient, then the fused update.
    add(fmt::format("full_host_step_adamw_{}", kc::dtype_name(o.grad_dtype)), isa, 24.0 + 2 * gb + 2, [&] {
      const kc::GradStats st = kc::grad_stats(g.mem.get(), o.grad_dtype, n, exec);
      kc::AdamConfig step = adam;
      const double norm = std::sqrt(st.sum_sq) * 0.5;  // x grad_scale
      step.grad_scale = static_cast<float>(0.5 * std::min(1.0, 1.0 / (norm + 1e-6)));
      kc::adam_step(step, {p.as<float>(), g.mem.get(), o.grad_dtype, m.mem.get(), v.mem.get(), kc::DType::kF32,
                           out.mem.get(), kc::DType::kBF16, n},
                    exec);
    });
    add(fmt::format("host_step_adamw_{}_bf16_state", kc::dtype_name(o.grad_dtype)), isa, 8.0 + 8 + gb + 2, [&] {
      kc::adam_step(adam, {p.as<float>(), g.mem.get(), o.grad_dtype, m16.mem.get(), v16.mem.get(), kc::DType::kBF16,
                           out.mem.get(), kc::DType::kBF16, n},
                    exec);
    });
    add(fmt::format("grad_stats_{}", kc::dtype_name(o.grad_dtype)), isa, static_cast<double>(gb),
        [&] { (void)kc::grad_stats(g.mem.get(), o.grad_dtype, n, exec); });
    kc::AdagradConfig ada;
    add("adagrad_fp32", isa, 20, [&] {
      kc::adagrad_step(ada, {p.as<float>(), g32.mem.get(), kc::DType::kF32, v.mem.get(), kc::DType::kF32, nullptr,
                             kc::DType::kBF16, n},
                       exec);
    });
    kc::LionConfig lion;
    add("lion_fp32", isa, 20, [&] {
      kc::lion_step(lion, {p.as<float>(), g32.mem.get(), kc::DType::kF32, m.mem.get(), kc::DType::kF32, nullptr,
                           kc::DType::kBF16, n},
                    exec);
    });
  }
  if (show_progress) std::cerr << fmt::format("\r{:50}\r", "");

  double triad = 0;
  for (const auto& r : results) {
    if (r.kernel == "stream_triad") triad = r.bytes_per_s();
  }
  const auto& f = kernels::cpu_features();
  const std::string date = utc_timestamp();
  if (o.json) {
    Json j;
    j["date"] = date;
    j["cpu"] = kernels::describe(f);
    j["threads"] = threads;
    j["params"] = n;
    j["grad_dtype"] = kc::dtype_name(o.grad_dtype);
    j["repeat"] = o.repeat;
    j["stream_triad_GBps"] = triad / 1e9;
    Json ks = Json::array();
    for (const auto& r : results) {
      ks.push_back({{"kernel", r.kernel},
                    {"isa", r.isa},
                    {"params_per_s", r.params_per_s()},
                    {"bytes_per_s", r.bytes_per_s()},
                    {"bytes_per_param", r.bytes_per_param},
                    {"seconds_best", r.time.best},
                    {"seconds_median", r.time.median},
                    {"fraction_of_triad", r.bytes_per_s() / triad}});
    }
    j["kernels"] = ks;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << fmt::format("zinf bench adam: {} parameters, {} threads, {} gradients, best of {} (cpu: {})\n\n", n,
                           threads, kc::dtype_name(o.grad_dtype), o.repeat, kernels::describe(f));
  std::cout << fmt::format("{:<34} {:<7} {:>10} {:>9} {:>9} {:>10}\n", "kernel", "isa", "Gparam/s", "B/param",
                           "GB/s", "of triad");
  for (const auto& r : results) {
    std::cout << fmt::format("{:<34} {:<7} {:>10.3f} {:>9.0f} {:>9.1f} {:>9.0f}%\n", r.kernel, r.isa,
                             r.params_per_s() / 1e9, r.bytes_per_param, r.bytes_per_s() / 1e9,
                             100.0 * r.bytes_per_s() / triad);
  }
  std::cout << "\nbytes are those each kernel must move (reads + writes, no write-allocate), as STREAM counts them.\n";
  return kExitOk;
}

}  // namespace

void add_bench_adam_command(CLI::App& bench, Action& action) {
  auto o = std::make_shared<BenchAdamOptions>();
  auto* cmd = bench.add_subcommand("adam", "CPU optimizer kernels (params/s, bytes/s) against a same-run STREAM triad");
  cmd->add_option("--params", o->params_text, "parameters per kernel call (default 256M = 256 x 2^20)");
  cmd->add_option("--threads", o->threads, "threads (default: all cores)")->check(CLI::Range(1u, 4096u));
  cmd->add_option("--grad-dtype", o->grad_dtype_text, "gradient dtype of the host step: bf16 (default), fp16, fp32");
  cmd->add_option("--isa", o->isas_text,
                  "ISAs to run (default: ZINF_CPU_ISA if set, else every one this CPU has): avx512, avx2, scalar")
      ->delimiter(',');
  cmd->add_option("--repeat", o->repeat, "timed runs per kernel after one warm-up (default 5)")
      ->check(CLI::Range(1u, 1000u));
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback([o, &action] {
    o->params = parse_count(o->params_text, "--params");
    o->grad_dtype = parse_dtype(o->grad_dtype_text);
    action = [o] { return run_bench_adam(*o); };
  });
}

}  // namespace zinf::tools
