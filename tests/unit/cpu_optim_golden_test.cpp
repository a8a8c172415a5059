// The CPU optimizers against PyTorch over 10 steps: AdamW, Adam with L2 weight decay, Adagrad, and
// AdamW fed scaled bf16 gradients with the bf16 parameter copy, on every ISA this CPU has. The
// reference comes from tests/reference/gen_optim_reference.py, which CTest runs first (fixture).
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/half.hpp"
#include "numeric_util.hpp"

namespace zinf::kernels::cpu {
namespace {

using nlohmann::json;

const json& reference() {
  static const json ref = [] {
    const char* path = std::getenv("ZINF_OPTIM_REFERENCE");
    const std::string file = path != nullptr ? path : ZINF_OPTIM_REFERENCE;
    std::ifstream in(file);
    if (!in) {
      ADD_FAILURE() << "no PyTorch reference at " << file
                    << ": run tests/reference/gen_optim_reference.py (CTest does it first)";
      return json::object();
    }
    return json::parse(in);
  }();
  return ref;
}

const json& find_case(const std::string& name) {
  for (const auto& c : reference()["cases"]) {
    if (c["name"] == name) return c;
  }
  static const json none;
  ADD_FAILURE() << "case " << name << " missing from the reference";
  return none;
}

std::vector<float> vec(const json& j) { return j.get<std::vector<float>>(); }

::testing::AssertionResult close(const std::vector<float>& got, const std::vector<float>& ref, double atol,
                                 double rtol, const std::string& what) {
  return zinf::testing::all_close(got, ref, atol, rtol, what);
}

// fp32 after 10 steps: the kernels and PyTorch order a few operations differently.
constexpr double kF32Atol = 1e-6, kF32Rtol = 1e-5;

std::vector<Exec> execs() {
  std::vector<Exec> v{Exec(Isa::kScalar)};
  if (isa_supported(Isa::kAvx2)) v.emplace_back(Isa::kAvx2);
  if (isa_supported(Isa::kAvx512)) v.emplace_back(Isa::kAvx512);
  return v;
}

void check_adam(const std::string& name) {
  const json& c = find_case(name);
  if (c.is_null()) return;
  const auto& cfg = c["config"];
  const bool bf16 = c["grad_dtype"] == "bf16";
  for (const Exec& exec : execs()) {
    std::vector<float> p = vec(c["param0"]);
    const std::size_t n = p.size();
    std::vector<float> m(n, 0.0f), v(n, 0.0f);
    std::vector<std::uint16_t> out(n);
    for (int step = 1; step <= c["steps"].get<int>(); ++step) {
      const std::vector<float> g32 = vec(c["grads"][step - 1]);
      std::vector<std::uint16_t> g16(n);
      for (std::size_t i = 0; i < n; ++i) g16[i] = f32_to_bf16(g32[i]);
      AdamConfig a;
      a.lr = cfg["lr"].get<double>();
      a.beta1 = cfg["beta1"].get<double>();
      a.beta2 = cfg["beta2"].get<double>();
      a.eps = cfg["eps"].get<double>();
      a.weight_decay = cfg["weight_decay"].get<double>();
      a.adam_w_mode = cfg["adam_w_mode"].get<bool>();
      a.step = step;
      a.grad_scale = c["grad_scale"].get<float>();
      adam_step(a, {p.data(), bf16 ? static_cast<const void*>(g16.data()) : g32.data(), bf16 ? DType::kBF16 : DType::kF32,
                    m.data(), v.data(), DType::kF32, out.data(), DType::kBF16, n},
                exec);
    }
    const std::string where = fmt::format("{} on {}", name, isa_name(exec.isa));
    EXPECT_TRUE(close(p, vec(c["param"]), kF32Atol, kF32Rtol, where + " param"));
    EXPECT_TRUE(close(m, vec(c["exp_avg"]), kF32Atol, kF32Rtol, where + " exp_avg"));
    EXPECT_TRUE(close(v, vec(c["exp_avg_sq"]), 1e-9, kF32Rtol, where + " exp_avg_sq"));
    // The bf16 copy may differ by one bf16 step where fp32 results straddle a rounding boundary.
    std::vector<float> out32(n);
    for (std::size_t i = 0; i < n; ++i) out32[i] = bf16_to_f32(out[i]);
    EXPECT_TRUE(close(out32, vec(c["param_bf16"]), 0.0, 0x1p-7, where + " param bf16"));
  }
}

TEST(CpuOptimGolden, AdamWMatchesPyTorch) { check_adam("adamw"); }
TEST(CpuOptimGolden, AdamWithL2MatchesPyTorch) { check_adam("adam_l2"); }
TEST(CpuOptimGolden, AdamWWithScaledBf16GradientsMatchesPyTorch) { check_adam("adamw_bf16_grads_scaled"); }

TEST(CpuOptimGolden, AdagradMatchesPyTorch) {
  const json& c = find_case("adagrad");
  if (c.is_null()) return;
  const auto& cfg = c["config"];
  for (const Exec& exec : execs()) {
    std::vector<float> p = vec(c["param0"]);
    const std::size_t n = p.size();
    std::vector<float> sum(n, 0.0f);
    for (int step = 1; step <= c["steps"].get<int>(); ++step) {
      const std::vector<float> g = vec(c["grads"][step - 1]);
      AdagradConfig a;
      a.lr = cfg["lr"].get<double>();
      a.lr_decay = cfg["lr_decay"].get<double>();
      a.eps = cfg["eps"].get<double>();
      a.weight_decay = cfg["weight_decay"].get<double>();
      a.step = step;
      adagrad_step(a, {p.data(), g.data(), DType::kF32, sum.data(), DType::kF32, nullptr, DType::kBF16, n}, exec);
    }
    const std::string where = fmt::format("adagrad on {}", isa_name(exec.isa));
    EXPECT_TRUE(close(p, vec(c["param"]), kF32Atol, kF32Rtol, where + " param"));
    EXPECT_TRUE(close(sum, vec(c["sum"]), 1e-9, kF32Rtol, where + " sum"));
  }
}

}  // namespace
}  // namespace zinf::kernels::cpu
