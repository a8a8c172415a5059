// CPU optimizers: every ISA agrees with the scalar reference bit for bit (all dtype combinations,
// lengths around the vector widths), the fp32 kernels track a float64 reference, conversions round
// to nearest even, gradient statistics find every inf/NaN, and results do not depend on threads.
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <oneapi/tbb/task_arena.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/half.hpp"

namespace zinf::kernels::cpu {
namespace {

constexpr std::size_t kLengths[] = {0, 1, 15, 16, 17, 31, 33, 1000003};

struct Variant {
  Isa isa;
  bool native_bf16;
  std::string name;
};

// Every dispatch branch this CPU can run, besides scalar.
std::vector<Variant> simd_variants() {
  std::vector<Variant> v;
  if (isa_supported(Isa::kAvx2)) v.push_back({Isa::kAvx2, false, "avx2"});
  if (isa_supported(Isa::kAvx512)) {
    v.push_back({Isa::kAvx512, false, "avx512 (emulated bf16)"});
    v.push_back({Isa::kAvx512, true, "avx512 (native bf16 where the CPU has it)"});
  }
  return v;
}

Exec exec_of(const Variant& v) {
  Exec e(v.isa);
  e.native_bf16 = v.native_bf16;
  return e;
}

// Raw storage of n elements of a dtype, filled from floats.
struct Buf {
  DType dtype;
  std::vector<std::uint8_t> bytes;
  Buf(DType d, std::size_t n) : dtype(d), bytes(n * dtype_bytes(d) + 1) {}
  void* data() { return bytes.data(); }
  void fill(const std::vector<float>& v) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (dtype == DType::kF32) {
        std::memcpy(bytes.data() + 4 * i, &v[i], 4);
      } else {
        const std::uint16_t h = dtype == DType::kBF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
    }
  }
};

std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// First differing byte as an element index, or -1.
long first_diff(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b, std::size_t elem) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return static_cast<long>(i / elem);
  }
  return -1;
}

struct OptimCase {
  std::vector<float> param;
  Buf grad, m, v, out;
  OptimCase(std::size_t n, DType g, DType s, DType o, std::uint64_t seed)
      : param(random_floats(n, seed, -1.0f, 1.0f)), grad(g, n), m(s, n), v(s, n), out(o, n) {
    grad.fill(random_floats(n, seed + 1, -0.5f, 0.5f));
    m.fill(random_floats(n, seed + 2, -0.1f, 0.1f));
    v.fill(random_floats(n, seed + 3, 0.0f, 0.01f));
  }
};

enum class Opt { kAdamW, kAdamL2, kAdamNoBias, kAdagrad, kLion };
const char* opt_name(Opt o) {
  switch (o) {
    case Opt::kAdamW: return "adamw";
    case Opt::kAdamL2: return "adam-l2";
    case Opt::kAdamNoBias: return "adam-no-bias-correction";
    case Opt::kAdagrad: return "adagrad";
    case Opt::kLion: return "lion";
  }
  return "?";
}

void run(Opt o, OptimCase& c, bool with_out, const Exec& exec) {
  const std::size_t n = c.param.size();
  void* out = with_out ? c.out.data() : nullptr;
  switch (o) {
    case Opt::kAdamW:
    case Opt::kAdamL2:
    case Opt::kAdamNoBias: {
      AdamConfig cfg;
      cfg.lr = 1e-3;
      cfg.weight_decay = 0.01;
      cfg.adam_w_mode = o != Opt::kAdamL2;
      cfg.bias_correction = o != Opt::kAdamNoBias;
      cfg.step = 7;
      cfg.grad_scale = 0.37f;
      adam_step(cfg, {c.param.data(), c.grad.data(), c.grad.dtype, c.m.data(), c.v.data(), c.m.dtype, out, c.out.dtype, n},
                exec);
      break;
    }
    case Opt::kAdagrad: {
      AdagradConfig cfg;
      cfg.lr = 0.05;
      cfg.lr_decay = 0.01;
      cfg.weight_decay = 0.02;
      cfg.step = 3;
      cfg.grad_scale = 2.0f;
      adagrad_step(cfg, {c.param.data(), c.grad.data(), c.grad.dtype, c.v.data(), c.v.dtype, out, c.out.dtype, n}, exec);
      break;
    }
    case Opt::kLion: {
      LionConfig cfg;
      cfg.lr = 1e-3;
      cfg.weight_decay = 0.1;
      cfg.grad_scale = 0.5f;
      lion_step(cfg, {c.param.data(), c.grad.data(), c.grad.dtype, c.m.data(), c.m.dtype, out, c.out.dtype, n}, exec);
      break;
    }
  }
}

TEST(CpuOptim, EveryIsaMatchesScalarBitForBit) {
  const auto variants = simd_variants();
  if (variants.empty()) GTEST_SKIP() << "this CPU has neither AVX2+FMA+F16C nor AVX-512: only scalar kernels exist";
  int checked = 0;
  for (const Variant& var : variants) {
    for (Opt o : {Opt::kAdamW, Opt::kAdamL2, Opt::kAdamNoBias, Opt::kAdagrad, Opt::kLion}) {
      for (DType g : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (DType s : {DType::kF32, DType::kBF16}) {
          for (int out = 0; out < 4; ++out) {
            const DType od = out == 3 ? DType::kF16 : (out == 2 ? DType::kBF16 : DType::kF32);
            for (std::size_t n : kLengths) {
              // The large length on a subset keeps the test fast; small ones cover every branch.
              if (n > 1000 && (s != DType::kF32 || out != 2 || g == DType::kF16)) continue;
              OptimCase ref(n, g, s, od, 11 + n);
              OptimCase got(n, g, s, od, 11 + n);
              Exec scalar(Isa::kScalar);
              run(o, ref, out != 0, scalar);
              run(o, got, out != 0, exec_of(var));
              const std::string what = fmt::format("{} on {}: grad {}, state {}, out {}, n={}", opt_name(o), var.name,
                                                   dtype_name(g), dtype_name(s), out ? dtype_name(od) : "none", n);
              std::vector<std::uint8_t> pr(n * 4), pg(n * 4);
              if (n > 0) {
                std::memcpy(pr.data(), ref.param.data(), n * 4);
                std::memcpy(pg.data(), got.param.data(), n * 4);
              }
              ASSERT_EQ(first_diff(pr, pg, 4), -1) << "param differs at that element: " << what;
              ASSERT_EQ(first_diff(ref.m.bytes, got.m.bytes, dtype_bytes(s)), -1) << "exp_avg: " << what;
              ASSERT_EQ(first_diff(ref.v.bytes, got.v.bytes, dtype_bytes(s)), -1) << "exp_avg_sq/sum: " << what;
              ASSERT_EQ(first_diff(ref.out.bytes, got.out.bytes, dtype_bytes(od)), -1) << "param_out: " << what;
              ++checked;
            }
          }
        }
      }
    }
  }
  std::printf("[   NOTE   ] %d kernel variants compared bit for bit with scalar\n", checked);
}

// Adam in float64 with PyTorch's formulas.
void adam_f64(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v, const std::vector<double>& g,
              double lr, double b1, double b2, double eps, double wd, int step) {
  const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
  for (std::size_t i = 0; i < p.size(); ++i) {
    p[i] *= 1 - lr * wd;
    m[i] = b1 * m[i] + (1 - b1) * g[i];
    v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
    p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + eps);
  }
}

TEST(CpuOptim, AdamWTracksAFloat64ReferenceOverTenSteps) {
  constexpr std::size_t n = 4099;
  std::vector<float> p = random_floats(n, 1, -1, 1), m(n, 0.0f), v(n, 0.0f);
  std::vector<double> pd(p.begin(), p.end()), md(n, 0.0), vd(n, 0.0);
  for (int step = 1; step <= 10; ++step) {
    const std::vector<float> g = random_floats(n, 100 + step, -0.3f, 0.3f);
    AdamConfig cfg;
    cfg.lr = 1e-2;
    cfg.weight_decay = 0.1;
    cfg.step = step;
    adam_step(cfg, {p.data(), g.data(), DType::kF32, m.data(), v.data(), DType::kF32, nullptr, DType::kBF16, n});
    adam_f64(pd, md, vd, std::vector<double>(g.begin(), g.end()), 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
  }
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double err = std::abs(p[i] - pd[i]) / (1e-6 + 1e-5 * std::abs(pd[i]));
    if (err > worst) worst = err, at = i;
  }
  EXPECT_LE(worst, 1.0) << "worst element " << at << ": " << p[at] << " vs float64 " << pd[at];
}

// Lion against its definition (Chen et al. 2023, Algorithm 2), written out in float64.
TEST(CpuOptim, LionFollowsItsDefinition) {
  constexpr std::size_t n = 1031;
  std::vector<float> p = random_floats(n, 31, -1, 1), m(n, 0.0f);
  std::vector<double> pd(p.begin(), p.end()), md(n, 0.0);
  const double lr = 1e-3, b1 = 0.9, b2 = 0.99, wd = 0.1;
  for (int step = 1; step <= 10; ++step) {
    const std::vector<float> g = random_floats(n, 300 + step, -0.3f, 0.3f);
    LionConfig c;
    c.lr = lr;
    c.beta1 = b1;
    c.beta2 = b2;
    c.weight_decay = wd;
    lion_step(c, {p.data(), g.data(), DType::kF32, m.data(), DType::kF32, nullptr, DType::kBF16, n});
    for (std::size_t i = 0; i < n; ++i) {
      const double u = b1 * md[i] + (1 - b1) * g[i];
      pd[i] = pd[i] * (1 - lr * wd) - lr * ((u > 0) - (u < 0));
      md[i] = b2 * md[i] + (1 - b2) * g[i];
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(p[i], pd[i], 1e-6) << "element " << i;
    ASSERT_NEAR(m[i], md[i], 1e-6) << "exp_avg element " << i;
  }
}

// The accuracy cost of bf16 optimizer state (docs/cpu-optimizers.md quotes these figures): 500
// AdamW steps pulling parameters towards a target through noisy gradients.
TEST(CpuOptim, Bf16StateTracksFp32StateWithinDocumentedBounds) {
  constexpr std::size_t n = 8192;
  const std::vector<float> target = random_floats(n, 21, -1, 1);
  const std::vector<float> p0 = random_floats(n, 22, -1, 1);
  std::vector<float> p32 = p0, p16 = p0, m32(n, 0), v32(n, 0);
  std::vector<std::uint16_t> m16(n, 0), v16(n, 0);
  std::mt19937_64 rng(23);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  std::vector<float> g32(n), g16(n);
  for (int step = 1; step <= 500; ++step) {
    for (std::size_t i = 0; i < n; ++i) {
      const float e = noise(rng);
      g32[i] = p32[i] - target[i] + e;
      g16[i] = p16[i] - target[i] + e;
    }
    AdamConfig c;
    c.lr = 1e-3;
    c.weight_decay = 0.01;
    c.step = step;
    adam_step(c, {p32.data(), g32.data(), DType::kF32, m32.data(), v32.data(), DType::kF32, nullptr, DType::kBF16, n});
    adam_step(c, {p16.data(), g16.data(), DType::kF32, m16.data(), v16.data(), DType::kBF16, nullptr, DType::kBF16, n});
  }
  double max_diff = 0, sum_diff = 0, moved = 0, loss32 = 0, loss16 = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(p32[i]) - p16[i]);
    max_diff = std::max(max_diff, d);
    sum_diff += d;
    moved += std::abs(static_cast<double>(p32[i]) - p0[i]);
    loss32 += (p32[i] - target[i]) * (p32[i] - target[i]);
    loss16 += (p16[i] - target[i]) * (p16[i] - target[i]);
  }
  std::printf("[   NOTE   ] bf16 vs fp32 state after 500 AdamW steps: mean |dp| %.3g, max |dp| %.3g, mean distance "
              "moved %.3g, loss %.5g vs %.5g\n",
              sum_diff / n, max_diff, moved / n, loss16 / n, loss32 / n);
  EXPECT_LT(sum_diff / moved, 0.05);  // parameters stay within 5% of the distance travelled (1.8% here)
  EXPECT_LT(std::abs(loss16 - loss32), 0.05 * loss32);  // and the same loss within 5% (3.2% here)
}

TEST(CpuOptim, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one.
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);  // 1 + 3*2^-8 -> 1 + 2^-6 (even)
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);  // above the tie: up
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7f800001u)))));  // NaN never becomes inf
}

TEST(CpuOptim, Fp16ConversionsAreExactAndRoundToNearestEven) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_f32(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << "round trip of fp16 0x" << std::hex << h;
  }
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the tie rounds to even: infinity
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);  // tie between 0 and the smallest subnormal: even
  EXPECT_EQ(f32_to_f16(0x1.8p-24f), 0x0002);  // 1.5 x smallest subnormal: tie, to even (2)
  EXPECT_EQ(f32_to_f16(1.0f + 0x1p-11f), 0x3c00);  // tie at 1: even
}

TEST(CpuOptim, ConversionsAgreeAcrossIsasOnEveryKindOfValue) {
  std::vector<float> v;
  std::mt19937 rng(5);
  for (int i = 0; i < 200000; ++i) v.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  for (float s : {0.0f, -0.0f, 1.0f, 65504.0f, 65520.0f, 0x1p-25f, 0x1p-14f, 0x1p-24f, 3.4e38f}) v.push_back(s);
  v.push_back(std::numeric_limits<float>::infinity());
  v.push_back(std::numeric_limits<float>::denorm_min());
  for (DType d : {DType::kBF16, DType::kF16}) {
    std::vector<std::uint16_t> ref(v.size()), got(v.size());
    convert(v.data(), DType::kF32, ref.data(), d, v.size(), Exec(Isa::kScalar));
    for (const Variant& var : simd_variants()) {
      std::fill(got.begin(), got.end(), 0);
      convert(v.data(), DType::kF32, got.data(), d, v.size(), exec_of(var));
      for (std::size_t i = 0; i < v.size(); ++i) {
        const bool nan_ref = d == DType::kBF16 ? std::isnan(bf16_to_f32(ref[i])) : std::isnan(f16_to_f32(ref[i]));
        const bool nan_got = d == DType::kBF16 ? std::isnan(bf16_to_f32(got[i])) : std::isnan(f16_to_f32(got[i]));
        if (nan_ref || nan_got) {
          ASSERT_TRUE(nan_ref && nan_got) << var.name << " " << dtype_name(d) << " element " << i;
          continue;
        }
        if (var.native_bf16 && d == DType::kBF16 && std::fpclassify(v[i]) == FP_SUBNORMAL &&
            cpu_features().avx512bf16) {
          // vcvtneps2bf16 treats fp32 subnormals as zero (documented in cpu_optim.hpp).
          ASSERT_EQ(got[i] & 0x7fff, 0) << "native bf16 of a subnormal should be +-0";
          continue;
        }
        ASSERT_EQ(ref[i], got[i]) << var.name << " " << dtype_name(d) << " of " << v[i] << " (bits 0x" << std::hex << std::bit_cast<std::uint32_t>(v[i]) << ", element " << std::dec << i << ")";
      }
      // And back to fp32.
      std::vector<float> back_ref(v.size()), back_got(v.size());
      convert(ref.data(), d, back_ref.data(), DType::kF32, v.size(), Exec(Isa::kScalar));
      convert(ref.data(), d, back_got.data(), DType::kF32, v.size(), exec_of(var));
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (std::isnan(back_ref[i])) {
          ASSERT_TRUE(std::isnan(back_got[i]));
        } else {
          ASSERT_EQ(std::bit_cast<std::uint32_t>(back_ref[i]), std::bit_cast<std::uint32_t>(back_got[i])) << i;
        }
      }
    }
  }
}

TEST(CpuOptim, GradStatsCountsEveryNonFiniteAndSumsInFloat64) {
  for (std::size_t n : kLengths) {
    if (n == 0) continue;
    std::vector<float> g = random_floats(n, n, -2.0f, 2.0f);
    std::vector<std::size_t> bad;
    for (std::size_t i : {std::size_t{0}, n / 2, n - 1}) {
      if (std::find(bad.begin(), bad.end(), i) == bad.end()) bad.push_back(i);
    }
    for (std::size_t i = 0; i < bad.size(); ++i) {
      g[bad[i]] = i % 2 == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    }
    std::vector<float> clean = g;
    for (std::size_t i : bad) clean[i] = 0.0f;
    double ref = 0;
    for (float x : clean) ref += static_cast<double>(x) * x;
    for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
      Buf b(d, n), bc(d, n);
      b.fill(g);
      bc.fill(clean);
      std::vector<float> rounded(n);
      convert(bc.data(), d, rounded.data(), DType::kF32, n, Exec(Isa::kScalar));
      double ref_d = 0;
      for (float x : rounded) ref_d += static_cast<double>(x) * x;
      std::vector<Variant> all = simd_variants();
      all.push_back({Isa::kScalar, false, "scalar"});
      for (const Variant& var : all) {
        const GradStats s = grad_stats(b.data(), d, n, exec_of(var));
        EXPECT_EQ(s.nonfinite, bad.size()) << var.name << " " << dtype_name(d) << " n=" << n;
        const GradStats c = grad_stats(bc.data(), d, n, exec_of(var));
        EXPECT_EQ(c.nonfinite, 0u);
        EXPECT_NEAR(c.sum_sq, ref_d, 1e-12 * ref_d + 1e-300) << var.name << " " << dtype_name(d) << " n=" << n;
      }
    }
    (void)ref;
  }
}

TEST(CpuOptim, ResultsDoNotDependOnTheThreadCount) {
  constexpr std::size_t n = 1000003;
  tbb::task_arena one(1), two(2);
  std::vector<float> g = random_floats(n, 9, -1, 1);
  std::vector<std::vector<float>> params;
  std::vector<GradStats> stats;
  for (tbb::task_arena* arena : {static_cast<tbb::task_arena*>(nullptr), &one, &two}) {
    std::vector<float> p = random_floats(n, 8, -1, 1), m(n, 0.01f), v(n, 0.02f);
    std::vector<std::uint16_t> out(n);
    Exec e;
    e.arena = arena;
    e.chunk = 4096;
    adam_step(AdamConfig{}, {p.data(), g.data(), DType::kF32, m.data(), v.data(), DType::kF32, out.data(), DType::kBF16, n},
              e);
    params.push_back(p);
    stats.push_back(grad_stats(g.data(), DType::kF32, n, e));
  }
  EXPECT_EQ(params[0], params[1]);
  EXPECT_EQ(params[0], params[2]);
  EXPECT_EQ(stats[0].sum_sq, stats[1].sum_sq);
  EXPECT_EQ(stats[0].sum_sq, stats[2].sum_sq);
}

TEST(CpuOptim, BadArgumentsAreClearErrors) {
  std::vector<float> p(4), g(4), m(4), v(4);
  EXPECT_THROW(adam_step(AdamConfig{}, {nullptr, g.data(), DType::kF32, m.data(), v.data(), DType::kF32, nullptr,
                                        DType::kBF16, 4}),
               Error);
  EXPECT_THROW(adam_step(AdamConfig{}, {p.data(), g.data(), DType::kF32, m.data(), v.data(), DType::kF16, nullptr,
                                        DType::kBF16, 4}),
               Error);
  AdamConfig zero;
  zero.step = 0;
  EXPECT_THROW(adam_step(zero, {p.data(), g.data(), DType::kF32, m.data(), v.data(), DType::kF32, nullptr, DType::kBF16, 4}),
               Error);
  EXPECT_THROW(parse_isa("sse9"), Error);
  EXPECT_EQ(parse_isa("avx2"), Isa::kAvx2);
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      EXPECT_THROW(adam_step(AdamConfig{}, {p.data(), g.data(), DType::kF32, m.data(), v.data(), DType::kF32, nullptr,
                                            DType::kBF16, 4},
                             Exec(isa)),
                   Error);
    }
  }
}

}  // namespace
}  // namespace zinf::kernels::cpu
