// `zinf bench model`'s measurement: see model_bench.hpp.
#include "zinf/runtime/model_bench.hpp"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>

#include <fmt/format.h>

#include "zinf/runtime/flops.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/weights.hpp"

namespace zinf::runtime {

ModelBenchResult bench_model_step(const ModelBenchOptions& o, const std::function<void(const std::string&)>& progress) {
  const ModelConfig& cfg = o.model;
  auto backend = o.backend == "cuda" ? make_cuda_backend(CudaBackendOptions{o.device}) : make_cpu_backend();
  Model model(cfg, *backend, ModelOptions{o.dtype, o.checkpoint_activations, {}});
  const ModelLayout& layout = model.layout();
  UnitStorage params(*backend, layout, o.dtype), grads(*backend, layout, kernels::cpu::DType::kF32);
  init_parameters(cfg, layout, 1234, *backend, params.view());

  // Random tokens, next-token targets.
  const std::int64_t n = o.batch * o.seq;
  std::mt19937 rng(42);
  std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(cfg.vocab_size - 1));
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(n)), targets(static_cast<std::size_t>(n));
  for (auto& t : tokens) t = tok(rng);
  for (std::int64_t i = 0; i < n; ++i) targets[i] = (i + 1) % o.seq == 0 ? -100 : tokens[i + 1];
  model.set_batch(tokens, targets, o.batch, o.seq);

  ModelBenchResult r;
  double profiled_wall = 0;
  for (int s = 0; s < o.warmup + 2 * o.steps; ++s) {
    progress(fmt::format("step {}/{} ...", s + 1, o.warmup + 2 * o.steps));
    const bool timed = s >= o.warmup && s < o.warmup + o.steps;
    backend->set_profiling(s >= o.warmup + o.steps);
    const auto t0 = std::chrono::steady_clock::now();
    grads.zero();
    r.loss = model.forward(params.view());
    model.backward(params.view(), grads.view());
    backend->synchronize();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (timed) r.step_seconds.push_back(dt);
    if (backend->profiling()) profiled_wall += dt;
  }
  backend->set_profiling(false);
  std::sort(r.step_seconds.begin(), r.step_seconds.end());
  r.median_seconds = r.step_seconds.empty() ? 0.0 : r.step_seconds[r.step_seconds.size() / 2];
  for (const auto& [op, e] : backend->profile().ops) r.ops.push_back({op, e});
  std::sort(r.ops.begin(), r.ops.end(), [](const auto& a, const auto& b) { return a.e.seconds > b.e.seconds; });
  r.in_ops_seconds = std::accumulate(r.ops.begin(), r.ops.end(), 0.0, [](double s, const auto& x) { return s + x.e.seconds; });
  r.profiled_seconds = std::max(r.in_ops_seconds, profiled_wall);
  r.backend = backend->describe();
  r.parameters = layout.parameter_count();
  r.tokens = n;
  r.activation_bytes = model.activation_bytes();
  r.flops = static_cast<double>(n) * training_flops_per_token(cfg, o.seq);
  return r;
}

}  // namespace zinf::runtime
