// LoRA against PyTorch (tests/reference/gen_lora_reference.py, which CTest runs first): for each
// case the adapters are read from the reference's PEFT-format adapter directory, and a training
// pass (zinf's dropout masks, which the reference reproduces) must give the reference's loss and
// the gradient of every lora_A and lora_B; an eval pass (no dropout) its eval loss. With an fp32
// base, a bf16 base, activation checkpointing on and off, and on the GPU where there is one.
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
#include "zinf/configs/document.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/weights.hpp"

namespace zinf::runtime {
namespace {

using zinf::testing::all_close;
using zinf::testing::gpu_here;
using zinf::testing::max_abs;

std::string reference_dir() { return zinf::testing::reference_dir("ZINF_LORA_REFERENCE", ZINF_LORA_REFERENCE); }
std::vector<std::string> cases() { return zinf::testing::reference_cases(reference_dir()); }

struct Tol {
  double atol_rel, rtol, loss_rtol;
};
// fp32 base: the same math in another order (fused products, chunked softmax, LoRA's products).
constexpr Tol kF32{1e-5, 5e-5, 3e-6};
// bf16 base: activations rounded to bf16 inside the base's products, the reference in fp32.
constexpr Tol kBF16{5e-2, 6e-2, 1.5e-2};

struct LoraRun {
  ModelConfig config;
  std::unique_ptr<Backend> backend;
  LoadedAdapter adapter;
  std::unique_ptr<Model> model;
  std::unique_ptr<UnitStorage> params;
  DeviceBuffer lora, grads;

  LoraRun(const std::string& dir, DType dtype, bool checkpoint, const std::string& weights, bool gpu = false) {
    backend = gpu ? make_cuda_backend() : make_cpu_backend();
    config = load_model_config(dir + "/config.json");
    adapter = load_adapter(dir + "/adapter", config);  // PEFT's format, as the reference wrote it
    model = std::make_unique<Model>(config, *backend, ModelOptions{dtype, checkpoint, adapter.layout.config});
    params = std::make_unique<UnitStorage>(*backend, model->layout(), dtype);
    load_weights(dir + "/" + weights, config, model->layout(), *backend, params->view());
    lora = DeviceBuffer(*backend, adapter.params.size() * 4);
    grads = DeviceBuffer(*backend, adapter.params.size() * 4);
    backend->upload(lora.data(), adapter.params.data(), lora.bytes());
    std::int64_t b = 0, s = 0;
    const auto batch = io::SafetensorsFile::open(dir + "/batch.safetensors");
    const auto tokens = zinf::testing::read_i32(*batch, "tokens", b, s);
    const auto targets = zinf::testing::read_i32(*batch, "targets", b, s);
    model->set_batch(tokens, targets, b, s);
  }
  // A training pass: the loss; the adapters' gradients in `grads`.
  float train(std::uint64_t seed) {
    backend->fill_zero(grads.data(), grads.bytes());
    model->set_lora({lora.f32(), grads.f32(), seed, true});
    const float loss = model->forward(params->view());
    model->backward(params->view(), UnitBuffers{});  // the base is frozen: no units, no gradients
    return loss;
  }
  float eval() {
    model->set_lora({lora.f32(), nullptr, 0, false});
    return model->forward(params->view());
  }
  std::vector<float> host_grads() {
    std::vector<float> g(adapter.params.size());
    backend->download(g.data(), grads.data(), grads.bytes());
    return g;
  }
};

void compare(const std::string& c, DType dtype, const std::string& weights, const std::string& ref, Tol tol,
             bool gpu = false) {
  const std::string dir = reference_dir() + "/" + c;
  const nlohmann::json j = nlohmann::json::parse(config::read_text_file(dir + "/" + ref + ".json"));
  LoraRun run(dir, dtype, true, weights, gpu);
  const float loss = run.train(j.at("micro_seed").get<std::uint64_t>());
  const double want = j.at("train_loss").get<double>();
  EXPECT_NEAR(loss, want, tol.loss_rtol * std::abs(want)) << c << " training loss";
  const std::vector<float> g = run.host_grads();
  const auto file = io::SafetensorsFile::open(dir + "/" + ref + ".safetensors");
  const std::int64_t r = run.adapter.layout.config.rank;
  for (const LoraAdapter& a : run.adapter.layout.adapters) {
    for (const char which : {'A', 'B'}) {
      const std::string name = peft_tensor_name(a, which);
      const io::StTensor* t = file->find("grad." + name);
      ASSERT_NE(t, nullptr) << name;
      std::vector<float> refg(static_cast<std::size_t>(t->numel()));
      std::memcpy(refg.data(), file->bytes(*t).data(), refg.size() * 4);
      const std::int64_t off = which == 'A' ? a.a : a.b;
      const std::int64_t n = r * (which == 'A' ? a.in : a.out);
      ASSERT_EQ(static_cast<std::size_t>(n), refg.size()) << name;
      const std::span<const float> got(g.data() + off, static_cast<std::size_t>(n));
      EXPECT_TRUE(all_close(got, refg, tol.atol_rel * max_abs(refg), tol.rtol, c + " " + name));
    }
  }
  const double want_eval = j.at("eval_loss").get<double>();
  EXPECT_NEAR(run.eval(), want_eval, tol.loss_rtol * std::abs(want_eval)) << c << " eval loss";
}

class LoraReference : public ::testing::TestWithParam<std::string> {};

TEST_P(LoraReference, Fp32AdapterGradientsAndLosses) {
  compare(GetParam(), DType::kF32, "model.safetensors", "ref", kF32);
}

TEST_P(LoraReference, Bf16BaseWithinBf16Tolerances) {
  compare(GetParam(), DType::kBF16, "model_bf16.safetensors", "ref_bf16", kBF16);
}

TEST_P(LoraReference, CheckpointingChangesNothing) {
  const std::string dir = reference_dir() + "/" + GetParam();
  LoraRun on(dir, DType::kF32, true, "model.safetensors"), off(dir, DType::kF32, false, "model.safetensors");
  EXPECT_EQ(on.train(77), off.train(77));
  EXPECT_EQ(on.host_grads(), off.host_grads());
}

TEST_P(LoraReference, AnotherSeedDrawsOtherMasks) {
  const std::string dir = reference_dir() + "/" + GetParam();
  LoraRun run(dir, DType::kF32, true, "model.safetensors");
  const float a = run.train(1), b = run.train(1), c = run.train(2);
  EXPECT_EQ(a, b);  // the same seed: the same masks, the same pass
  if (run.adapter.layout.config.dropout > 0) {
    EXPECT_NE(a, c);
  } else {
    EXPECT_EQ(a, c);
  }
}

TEST_P(LoraReference, CudaFp32AdapterGradientsAndLosses) {
  std::string why;
  if (!gpu_here(why)) GTEST_SKIP() << "no GPU here: " << why;
  compare(GetParam(), DType::kF32, "model.safetensors", "ref", Tol{2 * kF32.atol_rel, 2 * kF32.rtol, 2 * kF32.loss_rtol}, true);
}

TEST_P(LoraReference, CudaBf16BaseWithinBf16Tolerances) {
  std::string why;
  if (!gpu_here(why)) GTEST_SKIP() << "no GPU here: " << why;
  compare(GetParam(), DType::kBF16, "model_bf16.safetensors", "ref_bf16", kBF16, true);
}

INSTANTIATE_TEST_SUITE_P(Cases, LoraReference, ::testing::ValuesIn(cases()),
                         [](const auto& p) { return p.param; });

}  // namespace
}  // namespace zinf::runtime
