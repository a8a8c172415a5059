// Dispatch for the CPU optimizers: argument resolution (in double, rounded once), validation,
// ISA choice, and the split into fixed chunks over a oneTBB arena.
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "optim_tables.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"

namespace zinf::kernels::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "fp32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "fp16";
  }
  return "?";
}

std::size_t dtype_bytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return f.avx2 && f.fma && f.f16c;
    case Isa::kAvx512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx2 && f.fma && f.f16c;
  }
  return false;
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  throw Error("unknown CPU ISA '{}': choose scalar, avx2 or avx512", name);
}

namespace {

Isa detect_active_isa() {
  const char* forced = std::getenv("ZINF_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    Isa isa;
    try {
      isa = parse_isa(forced);
    } catch (Error& e) {
      throw std::move(e).with_context("in the environment variable ZINF_CPU_ISA");
    }
    if (!isa_supported(isa)) {
      throw Error("ZINF_CPU_ISA={} but this CPU cannot run it (it has: {}); unset it or choose {}", forced,
                  describe(cpu_features()), best_cpu_isa());
    }
    return isa;
  }
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

const detail::KernelTable& table_for(const Exec& exec) {
  if (!isa_supported(exec.isa)) {
    throw Error("the {} kernels cannot run on this CPU (it has: {})", isa_name(exec.isa), describe(cpu_features()));
  }
  switch (exec.isa) {
    case Isa::kScalar: return detail::scalar_table();
    case Isa::kAvx2: return detail::avx2_table();
    case Isa::kAvx512: return detail::avx512_table(exec.native_bf16 && cpu_features().avx512bf16);
  }
  return detail::scalar_table();
}

// Runs fn(begin, end) over [0, n) in chunks of exec.chunk, in the arena when there is one.
template <class Fn>
void run_chunks(std::size_t n, const Exec& exec, Fn&& fn) {
  if (n == 0) return;
  const std::size_t chunk = exec.chunk == 0 ? n : exec.chunk;
  const std::size_t n_chunks = (n + chunk - 1) / chunk;
  auto body = [&](const tbb::blocked_range<std::size_t>& r) {
    for (std::size_t c = r.begin(); c != r.end(); ++c) fn(c, c * chunk, std::min(n, (c + 1) * chunk));
  };
  if (exec.arena == nullptr || n_chunks == 1) {
    body(tbb::blocked_range<std::size_t>(0, n_chunks));
  } else {
    exec.arena->execute([&] { tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n_chunks, 1), body); });
  }
}

int out_index(const void* out, DType dtype) {
  if (out == nullptr) return 0;
  return dtype == DType::kF32 ? 1 : (dtype == DType::kBF16 ? 2 : 3);
}

void check_state_dtype(DType d, const char* what) {
  if (d == DType::kF16) throw Error("{}: optimizer state can be fp32 or bf16, not fp16", what);
}

void require(bool ok, const char* what, const char* name) {
  if (!ok) throw Error("{}: {} is null", what, name);
}

}  // namespace

Isa active_isa() {
  static const Isa isa = detect_active_isa();
  return isa;
}

Exec::Exec() : isa(active_isa()) {}

AdamScalars adam_scalars(const AdamConfig& c) {
  if (c.step < 1) throw Error("adam_step: step must be >= 1 (it is {})", c.step);
  AdamScalars a{};
  a.beta1 = static_cast<float>(c.beta1);
  a.beta2 = static_cast<float>(c.beta2);
  a.one_minus_beta1 = static_cast<float>(1.0 - c.beta1);
  a.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  a.eps = static_cast<float>(c.eps);
  const double bc1 = c.bias_correction ? 1.0 - std::pow(c.beta1, static_cast<double>(c.step)) : 1.0;
  const double bc2 = c.bias_correction ? 1.0 - std::pow(c.beta2, static_cast<double>(c.step)) : 1.0;
  a.step_size = static_cast<float>(c.lr / bc1);
  a.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(bc2));
  a.decay = c.adam_w_mode ? static_cast<float>(1.0 - c.lr * c.weight_decay) : 1.0f;
  a.l2 = c.adam_w_mode ? 0.0f : static_cast<float>(c.weight_decay);
  a.grad_scale = c.grad_scale;
  return a;
}

void adam_step(const AdamConfig& c, const AdamTensors& t, const Exec& exec) {
  if (t.n == 0) return;
  require(t.param && t.grad && t.exp_avg && t.exp_avg_sq, "adam_step", "param, grad, exp_avg or exp_avg_sq");
  check_state_dtype(t.state_dtype, "adam_step");
  const detail::AdamArgs a = adam_scalars(c);
  const auto fn = table_for(exec).adam[static_cast<int>(t.grad_dtype)][static_cast<int>(t.state_dtype)]
                                     [out_index(t.param_out, t.out_dtype)];
  run_chunks(t.n, exec, [&](std::size_t, std::size_t b, std::size_t e) { fn(a, t, b, e); });
}

void adagrad_step(const AdagradConfig& c, const AdagradTensors& t, const Exec& exec) {
  if (t.n == 0) return;
  require(t.param && t.grad && t.sum, "adagrad_step", "param, grad or sum");
  check_state_dtype(t.state_dtype, "adagrad_step");
  if (c.step < 1) throw Error("adagrad_step: step must be >= 1 (it is {})", c.step);
  detail::AdagradArgs a{};
  a.clr = static_cast<float>(c.lr / (1.0 + static_cast<double>(c.step - 1) * c.lr_decay));
  a.eps = static_cast<float>(c.eps);
  a.l2 = static_cast<float>(c.weight_decay);
  a.grad_scale = c.grad_scale;
  const auto fn = table_for(exec).adagrad[static_cast<int>(t.grad_dtype)][static_cast<int>(t.state_dtype)]
                                        [out_index(t.param_out, t.out_dtype)];
  run_chunks(t.n, exec, [&](std::size_t, std::size_t b, std::size_t e) { fn(a, t, b, e); });
}

void lion_step(const LionConfig& c, const LionTensors& t, const Exec& exec) {
  if (t.n == 0) return;
  require(t.param && t.grad && t.exp_avg, "lion_step", "param, grad or exp_avg");
  check_state_dtype(t.state_dtype, "lion_step");
  detail::LionArgs a{};
  a.lr = static_cast<float>(c.lr);
  a.beta1 = static_cast<float>(c.beta1);
  a.beta2 = static_cast<float>(c.beta2);
  a.one_minus_beta1 = static_cast<float>(1.0 - c.beta1);
  a.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  a.decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
  a.grad_scale = c.grad_scale;
  const auto fn = table_for(exec).lion[static_cast<int>(t.grad_dtype)][static_cast<int>(t.state_dtype)]
                                     [out_index(t.param_out, t.out_dtype)];
  run_chunks(t.n, exec, [&](std::size_t, std::size_t b, std::size_t e) { fn(a, t, b, e); });
}

GradStats grad_stats(const void* grad, DType dtype, std::size_t n, const Exec& exec) {
  if (n == 0) return {};
  require(grad != nullptr, "grad_stats", "grad");
  const auto fn = table_for(exec).stats[static_cast<int>(dtype)];
  const std::size_t chunk = exec.chunk == 0 ? n : exec.chunk;
  // Per-chunk partials summed in chunk order: the result does not depend on the thread count.
  std::vector<GradStats> partial((n + chunk - 1) / chunk);
  run_chunks(n, exec, [&](std::size_t c, std::size_t b, std::size_t e) { partial[c] = fn(grad, b, e); });
  GradStats total;
  for (const GradStats& p : partial) {
    total.sum_sq += p.sum_sq;
    total.nonfinite += p.nonfinite;
  }
  return total;
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n, const Exec& exec) {
  if (n == 0) return;
  require(src != nullptr && dst != nullptr, "convert", "src or dst");
  const auto fn = table_for(exec).convert[static_cast<int>(src_dtype)][static_cast<int>(dst_dtype)];
  run_chunks(n, exec, [&](std::size_t, std::size_t b, std::size_t e) { fn(src, dst, b, e); });
}

void stream_triad(float* a, const float* b, const float* c, float s, std::size_t n, const Exec& exec) {
  if (n == 0) return;
  require(a != nullptr && b != nullptr && c != nullptr, "stream_triad", "an array");
  const auto fn = table_for(exec).triad;
  run_chunks(n, exec, [&](std::size_t, std::size_t begin, std::size_t end) { fn(a, b, c, s, begin, end); });
}

}  // namespace zinf::kernels::cpu
