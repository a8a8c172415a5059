// The model on the CPU backend against PyTorch (tests/reference/gen_model_reference.py, which
// CTest runs first): for each tiny config, loss, logits and every parameter gradient in fp32 and
// with bf16 weights, the reference's AdamW steps (also on the GPU), and activation checkpointing on
// and off.
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "numeric_util.hpp"
#include "reference_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/weights.hpp"

namespace zinf::runtime {
namespace {

using zinf::testing::all_close;
using zinf::testing::gpu_here;
using zinf::testing::max_abs;

std::string reference_dir() { return zinf::testing::reference_dir("ZINF_MODEL_REFERENCE", ZINF_MODEL_REFERENCE); }
std::vector<std::string> cases() { return zinf::testing::reference_cases(reference_dir()); }

// Tolerances, as |got - ref| <= atol * max|ref| + rtol * |ref| per tensor.
struct Tol {
  double atol_rel, rtol;
};
// fp32: the same math in a different order (oneDNN blocking, fused projections, chunked softmax).
constexpr Tol kF32Logits{2e-6, 1e-5};
constexpr Tol kF32Grad{5e-6, 2.5e-5};
constexpr double kF32LossRtol = 2e-6;
// bf16 weights with activations rounded to bf16 inside products vs fp32 math on the same weights.
constexpr Tol kBF16Logits{2.5e-2, 2.5e-2};
constexpr Tol kBF16Grad{4e-2, 5e-2};
constexpr double kBF16LossRtol = 1e-2;
// AdamW steps: per-step differences compound through the updates. On one batch the loss falls to
// a thousandth of its start, so the bound also has a part relative to the first loss.
constexpr double kAdamLossRtol = 1e-5;

std::vector<float> f32(const io::SafetensorsFile& f, const std::string& name) {
  const io::StTensor* t = f.find(name);
  EXPECT_NE(t, nullptr) << name << " missing from " << f.path();
  if (t == nullptr) return {};
  EXPECT_EQ(t->dtype, io::StDType::kF32);
  std::vector<float> v(static_cast<std::size_t>(t->numel()));
  std::memcpy(v.data(), f.bytes(*t).data(), v.size() * 4);
  return v;
}

// The gradient of one Hugging Face tensor, read out of the fp32 gradient units.
std::vector<float> grad_of(const ModelLayout& layout, const UnitBuffers& grads, const std::string& name) {
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    for (const TensorSpec& t : layout.units[u].tensors) {
      if (t.name != name) continue;
      const float* base = static_cast<const float*>(grads.units[u]) + t.offset;
      return {base, base + t.numel()};
    }
  }
  ADD_FAILURE() << "no tensor " << name << " in the layout";
  return {};
}

struct ModelRun {
  ModelConfig config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<UnitStorage> params, grads;
  std::vector<std::int32_t> tokens, targets;
  std::int64_t batch = 0, seq = 0;

  ModelRun(const std::string& dir, DType dtype, bool checkpoint, const std::string& weights, bool gpu = false) {
    backend = gpu ? make_cuda_backend() : make_cpu_backend();
    config = load_model_config(dir + "/config.json");
    model = std::make_unique<Model>(config, *backend, ModelOptions{dtype, checkpoint, {}});
    params = std::make_unique<UnitStorage>(*backend, model->layout(), dtype);
    grads = std::make_unique<UnitStorage>(*backend, model->layout(), DType::kF32);
    load_weights(dir + "/" + weights, config, model->layout(), *backend, params->view());
    const auto batch_file = io::SafetensorsFile::open(dir + "/batch.safetensors");
    tokens = zinf::testing::read_i32(*batch_file, "tokens", batch, seq);
    targets = zinf::testing::read_i32(*batch_file, "targets", batch, seq);
    model->set_batch(tokens, targets, batch, seq);
  }
  float step() {
    grads->zero();
    const float loss = model->forward(params->view());
    model->backward(params->view(), grads->view());
    return loss;
  }
  // The gradient units in host memory (downloaded from a GPU backend).
  UnitBuffers host_grads() {
    host_grad_units.clear();
    UnitBuffers v;
    v.dtype = DType::kF32;
    for (std::size_t u = 0; u < model->layout().units.size(); ++u) {
      host_grad_units.emplace_back(static_cast<std::size_t>(model->layout().units[u].numel));
      backend->download(host_grad_units.back().data(), grads->view().units[u], host_grad_units.back().size() * 4);
      v.units.push_back(host_grad_units.back().data());
    }
    return v;
  }
  std::vector<std::vector<float>> host_grad_units;
};

void compare_pass(const std::string& c, DType dtype, const std::string& weights, const std::string& ref_name,
                  Tol logits_tol, Tol grad_tol, double loss_rtol, bool gpu = false) {
  const std::string dir = reference_dir() + "/" + c;
  ModelRun run(dir, dtype, true, weights, gpu);
  const auto ref = io::SafetensorsFile::open(dir + "/" + ref_name);
  const float loss = run.step();
  const float ref_loss = f32(*ref, "loss").at(0);
  EXPECT_NEAR(loss, ref_loss, loss_rtol * std::abs(ref_loss)) << c;

  const std::vector<float> ref_logits = f32(*ref, "logits");
  std::vector<float> logits(ref_logits.size());
  run.model->logits(run.params->view(), logits.data());
  EXPECT_TRUE(all_close(logits, ref_logits, logits_tol.atol_rel * max_abs(ref_logits), logits_tol.rtol, c + " logits"));

  std::size_t compared = 0;
  const UnitBuffers grads = run.host_grads();
  for (const auto& [name, t] : ref->tensors()) {
    if (!name.starts_with("grad.")) continue;
    const std::vector<float> want = f32(*ref, name);
    const std::vector<float> got = grad_of(run.model->layout(), grads, name.substr(5));
    EXPECT_TRUE(all_close(got, want, grad_tol.atol_rel * max_abs(want), grad_tol.rtol, c + " " + name));
    ++compared;
  }
  std::size_t expected = 0;
  for (const UnitLayout& u : run.model->layout().units) expected += u.tensors.size();
  EXPECT_EQ(compared, expected) << "every parameter's gradient is compared";
}

class ModelReference : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelReference, Fp32LossLogitsAndEveryGradient) {
  compare_pass(GetParam(), DType::kF32, "model.safetensors", "ref.safetensors", kF32Logits, kF32Grad, kF32LossRtol);
}

TEST_P(ModelReference, Bf16WeightsWithinBf16Tolerances) {
  compare_pass(GetParam(), DType::kBF16, "model_bf16.safetensors", "ref_bf16.safetensors", kBF16Logits, kBF16Grad,
               kBF16LossRtol);
}

// The CUDA backend against the same references (generated by PyTorch on the GPU on the GPU
// machine: gen_model_reference.py --device cuda). fp32 within twice the CPU's tolerances (cuBLASLt
// and the attention kernels sum in other orders); bf16 as the CPU.
TEST_P(ModelReference, CudaFp32LossLogitsAndEveryGradient) {
  std::string why;
  if (!gpu_here(why)) GTEST_SKIP() << "no GPU here: " << why;
  compare_pass(GetParam(), DType::kF32, "model.safetensors", "ref.safetensors", Tol{2 * kF32Logits.atol_rel, 2 * kF32Logits.rtol},
               Tol{2 * kF32Grad.atol_rel, 2 * kF32Grad.rtol}, 2 * kF32LossRtol, true);
}

TEST_P(ModelReference, CudaBf16WeightsWithinBf16Tolerances) {
  std::string why;
  if (!gpu_here(why)) GTEST_SKIP() << "no GPU here: " << why;
  compare_pass(GetParam(), DType::kBF16, "model_bf16.safetensors", "ref_bf16.safetensors", kBF16Logits, kBF16Grad,
               kBF16LossRtol, true);
}

TEST_P(ModelReference, CheckpointingChangesNothing) {
  const std::string dir = reference_dir() + "/" + GetParam();
  ModelRun with(dir, DType::kF32, true, "model.safetensors");
  ModelRun without(dir, DType::kF32, false, "model.safetensors");
  EXPECT_EQ(with.step(), without.step());
  for (std::size_t u = 0; u < with.model->layout().units.size(); ++u) {
    EXPECT_EQ(0, std::memcmp(with.grads->view().units[u], without.grads->view().units[u], with.grads->unit_bytes(u)))
        << "unit " << with.model->layout().units[u].name << " differs";
  }
  if (with.config.num_layers > 1) {
    EXPECT_LT(with.model->activation_bytes(), without.model->activation_bytes());
  }
}

// The reference's AdamW steps (10 in CTest's references; 50 with --adam-steps 50) on one batch,
// with the optimizer on the host as zinf's trainer runs it: fp32 weights, or bf16 weights on the
// backend updated from an fp32 master. Returns the loss before each step and after the last.
std::vector<double> adam_losses(const std::string& dir, const nlohmann::json& h, DType dtype, bool gpu) {
  ModelRun run(dir, DType::kF32, true, "model.safetensors", gpu);
  const ModelLayout& layout = run.model->layout();
  // The fp32 master in host memory; the backend's weights (fp32, or a bf16 copy) from it.
  std::vector<std::vector<float>> master, m, v;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    master.emplace_back(static_cast<std::size_t>(layout.units[u].numel));
    run.backend->download(master.back().data(), run.params->view().units[u], master.back().size() * 4);
    m.emplace_back(master.back().size(), 0.0f);
    v.emplace_back(master.back().size(), 0.0f);
  }
  std::unique_ptr<Model> model = dtype == DType::kF32 ? nullptr
                                                      : std::make_unique<Model>(run.config, *run.backend, ModelOptions{dtype, true, {}});
  std::unique_ptr<UnitStorage> weights = dtype == DType::kF32 ? nullptr : std::make_unique<UnitStorage>(*run.backend, layout, dtype);
  if (model) model->set_batch(run.tokens, run.targets, run.batch, run.seq);
  Model& mdl = model ? *model : *run.model;
  const UnitBuffers& w = weights ? weights->view() : run.params->view();
  const auto upload = [&] {
    for (std::size_t u = 0; u < layout.units.size(); ++u) {
      if (dtype == DType::kF32) {
        run.backend->upload(w.units[u], master[u].data(), master[u].size() * 4);
      } else {
        std::vector<std::uint16_t> b(master[u].size());
        for (std::size_t i = 0; i < b.size(); ++i) b[i] = kernels::f32_to_bf16(master[u][i]);
        run.backend->upload(w.units[u], b.data(), b.size() * 2);
      }
    }
  };
  upload();
  std::vector<double> got;
  std::vector<float> g;
  const int steps = h["steps"].get<int>();
  for (int s = 1; s <= steps; ++s) {
    run.grads->zero();
    got.push_back(mdl.forward(w));
    mdl.backward(w, run.grads->view());
    kernels::cpu::AdamConfig cfg;
    cfg.lr = h["lr"].get<double>();
    cfg.beta1 = h["betas"][0].get<double>();
    cfg.beta2 = h["betas"][1].get<double>();
    cfg.eps = h["eps"].get<double>();
    cfg.weight_decay = h["weight_decay"].get<double>();
    cfg.step = s;
    for (std::size_t u = 0; u < layout.units.size(); ++u) {
      g.resize(master[u].size());
      run.backend->download(g.data(), run.grads->view().units[u], g.size() * 4);
      kernels::cpu::AdamTensors t;
      t.param = master[u].data();
      t.grad = g.data();
      t.exp_avg = m[u].data();
      t.exp_avg_sq = v[u].data();
      t.n = master[u].size();
      kernels::cpu::adam_step(cfg, t);
    }
    upload();
  }
  got.push_back(mdl.forward(w));
  return got;
}

void expect_curve(const std::string& c, const std::vector<double>& got, const std::vector<double>& want, double rtol,
                  double atol_first) {
  ASSERT_EQ(got.size(), want.size()) << c;
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], rtol * std::abs(want[i]) + atol_first * std::abs(want[0]))
        << c << " loss before step " << i + 1 << " of " << got.size() - 1;
  }
}

nlohmann::json adam_reference(const std::string& dir) {
  nlohmann::json ref;
  std::ifstream(dir + "/ref.json") >> ref;
  return ref;
}

TEST_P(ModelReference, AdamWStepsFollowPyTorch) {
  const std::string dir = reference_dir() + "/" + GetParam();
  const nlohmann::json ref = adam_reference(dir);
  expect_curve(GetParam(), adam_losses(dir, ref["adamw"], DType::kF32, false), ref["losses"].get<std::vector<double>>(),
               kAdamLossRtol, 1e-7);
}

// On the GPU: fp32 tightly (the GPU's sums in other orders compound over the steps, so 10x the
// CPU's bound on a 50-step curve); bf16 weights (fp32 master) within bf16 tolerance of the fp32
// curve.
TEST_P(ModelReference, CudaAdamWStepsFollowPyTorch) {
  std::string why;
  if (!gpu_here(why)) GTEST_SKIP() << "no GPU here: " << why;
  const std::string dir = reference_dir() + "/" + GetParam();
  const nlohmann::json ref = adam_reference(dir);
  const auto want = ref["losses"].get<std::vector<double>>();
  expect_curve(GetParam() + " fp32", adam_losses(dir, ref["adamw"], DType::kF32, true), want, 10 * kAdamLossRtol, 1e-5);
  expect_curve(GetParam() + " bf16", adam_losses(dir, ref["adamw"], DType::kBF16, true), want, kBF16LossRtol, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Cases, ModelReference, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace zinf::runtime
