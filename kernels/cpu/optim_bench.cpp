// `zinf bench adam`'s measurement: see cpu_optim_bench.hpp.
#include "zinf/kernels/cpu_optim_bench.hpp"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf::kernels::cpu {
namespace {

using Clock = std::chrono::steady_clock;

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
  if (t.empty()) throw Error("bench: repeat must be at least 1");
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};
}

}  // namespace

std::vector<KernelTiming> bench_optimizers(const OptimBenchOptions& o, const std::function<void(const std::string&)>& progress) {
  tbb::task_arena arena(static_cast<int>(o.threads));
  const std::size_t n = o.params;
  std::vector<Isa> isas = o.isas;
  const char* forced = std::getenv("ZINF_CPU_ISA");
  if (isas.empty() && forced != nullptr && *forced != '\0') {
    isas.push_back(active_isa());  // validates the variable
  } else if (isas.empty()) {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
      if (isa_supported(isa)) isas.push_back(isa);
    }
  }
  for (Isa isa : isas) {
    if (!isa_supported(isa)) throw Error("this CPU cannot run the {} kernels", isa_name(isa));
  }
  const std::size_t gb = dtype_bytes(o.grad_dtype);
  progress(fmt::format("allocating {:.1f} GiB for {} parameters ...", static_cast<double>(n) * (16 + gb + 2 + 8) / (1ull << 30), n));
  // fp32 master, moments, grads in the chosen dtype, bf16 out; bf16 moments for the bf16-state run.
  Array p = make_array(n * 4, arena, 0x3c), m = make_array(n * 4, arena, 0), v = make_array(n * 4, arena, 0);
  Array g = make_array(n * gb, arena, 0x3b), g32 = make_array(n * 4, arena, 0x3b), out = make_array(n * 2, arena, 0);
  Array m16 = make_array(n * 2, arena, 0), v16 = make_array(n * 2, arena, 0);

  std::vector<KernelTiming> results;
  const auto add = [&](const std::string& kernel, Isa isa, double bytes_per_param, const std::function<void()>& fn) {
    progress(fmt::format("{:<28} {:<7}", kernel, isa_name(isa)));
    const Timing t = time_it(o.repeat, fn);
    results.push_back({kernel, isa_name(isa), bytes_per_param, t.best, t.median, n});
  };

  // STREAM copy and triad over the same arena, with the best ISA's vector code (bytes as STREAM
  // counts them: no write-allocate, so the reference errs on the high side).
  {
    Exec exec(isas.front(), &arena);
    float* a = p.as<float>();
    const float* b = m.as<float>();
    const float* c = v.as<float>();
    add("stream_copy", isas.front(), 8, [&] { convert(b, DType::kF32, a, DType::kF32, n, exec); });
    add("stream_triad", isas.front(), 12, [&] { stream_triad(a, b, c, 0.5f, n, exec); });
    std::fill(a, a + n, 0.01f);
  }

  for (Isa isa : isas) {
    Exec exec(isa, &arena);
    AdamConfig adam;
    adam.lr = 1e-4;
    adam.weight_decay = 0.01;
    adam.step = 10;
    // Bare fp32 AdamW: read p, g, m, v; write p, m, v.
    add("adamw_fp32", isa, 28, [&] {
      adam_step(adam, {p.as<float>(), g32.mem.get(), DType::kF32, m.mem.get(), v.mem.get(), DType::kF32,
                           nullptr, DType::kBF16, n},
                    exec);
    });
    // The fused host step: scaled grads in (grad dtype), fp32 state, bf16 parameters out.
    adam.grad_scale = 0.5f;
    add(fmt::format("host_step_adamw_{}", dtype_name(o.grad_dtype)), isa, 24.0 + gb + 2, [&] {
      adam_step(adam, {p.as<float>(), g.mem.get(), o.grad_dtype, m.mem.get(), v.mem.get(), DType::kF32,
                           out.mem.get(), DType::kBF16, n},
                    exec);
    });
    // The whole host step as training runs it: gradient statistics (norm, inf/NaN), the clip
    // coefficient, then the fused update.
    add(fmt::format("full_host_step_adamw_{}", dtype_name(o.grad_dtype)), isa, 24.0 + 2 * gb + 2, [&] {
      const GradStats st = grad_stats(g.mem.get(), o.grad_dtype, n, exec);
      AdamConfig step = adam;
      const double norm = std::sqrt(st.sum_sq) * 0.5;  // x grad_scale
      step.grad_scale = static_cast<float>(0.5 * std::min(1.0, 1.0 / (norm + 1e-6)));
      adam_step(step, {p.as<float>(), g.mem.get(), o.grad_dtype, m.mem.get(), v.mem.get(), DType::kF32,
                           out.mem.get(), DType::kBF16, n},
                    exec);
    });
    add(fmt::format("host_step_adamw_{}_bf16_state", dtype_name(o.grad_dtype)), isa, 8.0 + 8 + gb + 2, [&] {
      adam_step(adam, {p.as<float>(), g.mem.get(), o.grad_dtype, m16.mem.get(), v16.mem.get(), DType::kBF16,
                           out.mem.get(), DType::kBF16, n},
                    exec);
    });
    add(fmt::format("grad_stats_{}", dtype_name(o.grad_dtype)), isa, static_cast<double>(gb),
        [&] { (void)grad_stats(g.mem.get(), o.grad_dtype, n, exec); });
    AdagradConfig ada;
    add("adagrad_fp32", isa, 20, [&] {
      adagrad_step(ada, {p.as<float>(), g32.mem.get(), DType::kF32, v.mem.get(), DType::kF32, nullptr,
                             DType::kBF16, n},
                       exec);
    });
    LionConfig lion;
    add("lion_fp32", isa, 20, [&] {
      lion_step(lion, {p.as<float>(), g32.mem.get(), DType::kF32, m.mem.get(), DType::kF32, nullptr,
                           DType::kBF16, n},
                    exec);
    });
  }
  return results;
}

}  // namespace zinf::kernels::cpu
