// What every gradient path shares: see gradient_path.hpp.
#include "gradient_path.hpp"

#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cstring>

#include "gpu_memory_plan.hpp"

namespace zinf::runtime {

using kernels::cpu::DType;

double sum_squares(const float* g, std::int64_t n) {
  constexpr std::int64_t kBlock = 1 << 16;
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<std::size_t>(blocks), 0.0);
  tbb::parallel_for(std::int64_t{0}, blocks, [&](std::int64_t b) {
    double s = 0;
    const std::int64_t end = std::min(n, (b + 1) * kBlock);
    for (std::int64_t i = b * kBlock; i < end; ++i) s += static_cast<double>(g[i]) * g[i];
    partial[static_cast<std::size_t>(b)] = s;
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

std::unique_ptr<GradientPath> make_gradient_path(PathEnv& env) {
  if (env.mode.lora) return make_lora_path(env);
  if (env.mode.pipeline) return make_gpu_pipeline(env);
  return make_sync_path(env);
}

offload::StepInputs GradientPath::step_inputs(const StepInfo& step, double grad_scale, DType grad_dtype) const {
  offload::StepInputs in;
  const auto& oc = env_.options.ds.optimizer;
  in.adam.lr = step.lr;
  in.adam.beta1 = oc.beta1;
  in.adam.beta2 = oc.beta2;
  in.adam.eps = oc.eps;
  in.adam.weight_decay = oc.weight_decay;
  in.adam.adam_w_mode = oc.type == config::OptimizerType::kAdamW || oc.adam_w_mode;
  in.adam.bias_correction = oc.bias_correction;
  in.adam.step = step.applied + 1;
  in.adam.grad_scale = static_cast<float>(grad_scale);
  in.grad_dtype = grad_dtype;
  return in;
}

double GradientPath::sum_over_ranks(double sq) {
  if (!env_.mode.sharded) return sq;
  // Every rank's double, gathered and summed in rank order.
  float mine[2];
  std::memcpy(mine, &sq, sizeof(sq));
  std::vector<float> all(2 * static_cast<std::size_t>(env_.mode.world));
  env_.comm.all_gather(mine, all);
  double total = 0;
  for (int r = 0; r < env_.mode.world; ++r) {
    double v = 0;
    std::memcpy(&v, all.data() + 2 * r, sizeof(v));
    total += v;
  }
  return total;
}

void GradientPath::refresh_compute() { env_.gather.refresh(env_.coord, env_.compute, env_.comm); }

StateSource GradientPath::checkpoint_state() {
  StateSource s;
  for (std::size_t u = 0; u < env_.layout.units.size(); ++u) {
    s.entries.emplace_back(env_.layout.units[u].name, static_cast<std::size_t>(env_.mode.shard[u]));
  }
  s.read = [this](std::size_t u, std::span<float> m, std::span<float> a, std::span<float> v) {
    env_.offload.store().read_state(u, m, a, v);
  };
  return s;
}

void GradientPath::load_checkpoint(const CheckpointReader& ck, const std::function<void()>& /*load_base*/) {
  const RunMode& m = env_.mode;
  read_state(ck, env_.layout, m.shard, m.sharded ? m.world : 1, m.sharded ? env_.comm.rank() : 0,
             [this](std::size_t u, std::span<const float> master, std::span<const float> a, std::span<const float> v) {
               env_.offload.store().set_state(u, master, a, v);
             });
}

// ---- GradientBuffers

GradientBuffers::GradientBuffers(Backend& backend, const RunMode& mode) : backend_(backend), mode_(mode) {
  view_.dtype = DType::kF32;
  view_.units.assign(mode.numel.size(), nullptr);
  live_.resize(mode.numel.size());
}

void GradientBuffers::take(std::size_t u) {
  if (live_[u].data() != nullptr) return;
  const auto bytes = static_cast<std::size_t>(mode_.gather_elements(u)) * sizeof(float);
  live_[u] = pooled(bytes);
  backend_.fill_zero(live_[u].data(), bytes);
  view_.units[u] = live_[u].data();
}

void GradientBuffers::release(std::size_t u, std::shared_ptr<Backend::Event> free_after) {
  give_back(std::move(live_[u]), std::move(free_after));
  view_.units[u] = nullptr;
}

DeviceBuffer GradientBuffers::take_out(std::size_t u) {
  view_.units[u] = nullptr;
  return std::move(live_[u]);
}

void GradientBuffers::give_back(DeviceBuffer b, std::shared_ptr<Backend::Event> free_after) {
  const std::size_t bytes = b.bytes();
  pool_[bytes].push_back({std::move(b), std::move(free_after)});
}

DeviceBuffer GradientBuffers::pooled(std::size_t bytes) {
  std::shared_ptr<Backend::Event> busy;
  DeviceBuffer b = pooled_for_collective(bytes, busy);
  if (busy) backend_.wait(Stream::kCompute, *busy);  // a buffer still being copied down
  return b;
}

DeviceBuffer GradientBuffers::pooled_for_collective(std::size_t bytes, std::shared_ptr<Backend::Event>& busy) {
  busy.reset();
  auto it = pool_.find(bytes);
  // A pooled buffer whose copy-down has finished; one still being copied is taken only while the
  // pool holds kGradBuffersInFlight of them (compute then waits for its copy), so the next unit's
  // backward does not queue behind the copy of the last one.
  std::vector<Pooled>* list = it != pool_.end() && !it->second.empty() ? &it->second : nullptr;
  std::size_t pick = 0;
  if (list != nullptr) {
    while (pick < list->size() && (*list)[pick].free_after && !(*list)[pick].free_after->ready()) ++pick;
    if (pick == list->size()) {
      if (list->size() < kGradBuffersInFlight) {
        list = nullptr;  // all busy: a new buffer
      } else {
        pick = 0;  // the oldest
      }
    }
  }
  if (list == nullptr) return DeviceBuffer(backend_, bytes);
  DeviceBuffer b = std::move((*list)[pick].buffer);
  if ((*list)[pick].free_after && !(*list)[pick].free_after->ready()) busy = (*list)[pick].free_after;
  list->erase(list->begin() + static_cast<std::ptrdiff_t>(pick));
  return b;
}

}  // namespace zinf::runtime
