// LoRA (TrainOptions::lora, docs/lora.md): the base is frozen in bf16 (offloaded per
// offload_param, no gradients, no optimizer state) and only the adapters train. Their parameters,
// gradients and Adam moments are one flat fp32 buffer each, on the compute device, or the moments
// in host memory (lora_offload_optimizer: stepped there by the CPU optimizer); they are
// replicated over the ranks, their gradients summed as in data parallelism. Checkpoints hold the
// adapters' state (also in PEFT's format) and the base's fingerprint; at the end of the run the
// base is checked bit for bit against the one loaded.
#include <xxhash.h>

#include <algorithm>
#include <chrono>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/dropout.hpp"
#include "zinf/runtime/lora.hpp"
#include "gradient_path.hpp"

namespace zinf::runtime {
namespace {

using config::Json;
using kernels::cpu::DType;

std::string hex64(std::uint64_t v) { return fmt::format("{:016x}", v); }

class LoraPath final : public GradientPath {
 public:
  explicit LoraPath(PathEnv& env) : GradientPath(env), layout_(env.model.lora()), n_(static_cast<std::size_t>(layout_.numel)) {
    Backend& b = env.backend;
    offloaded_ = env.options.lora_offload_optimizer && b.name() != "cpu";
    params_ = DeviceBuffer(b, n_ * sizeof(float));
    grads_ = DeviceBuffer(b, n_ * sizeof(float));
    if (offloaded_) {
      host_.assign(3 * n_, 0.0f);  // master | exp_avg | exp_avg_sq
    } else {
      moments_ = DeviceBuffer(b, 2 * n_ * sizeof(float));
    }
    sq_ = DeviceBuffer(b, sizeof(double));
    frozen_.dtype = DType::kF32;  // no units: the base has no gradients
    base_unit_hash_.assign(env.layout.units.size(), 0);
    base_shard_hash_.assign(env.layout.units.size(), 0);
    spdlog::info("LoRA {}: {} adapted linears, {} trainable parameters ({:.3f}% of the frozen base, which is held in "
                 "bf16 with no gradients or optimizer state); the adapters' Adam state on the {}",
                 layout_.config.describe(), layout_.adapters.size(), layout_.parameter_count(),
                 100.0 * static_cast<double>(layout_.parameter_count()) / static_cast<double>(env.layout.parameter_count()),
                 state_on_host() ? std::string("host") : b.name());
  }

  void begin_step(const StepInfo& step) override {
    step_ = step;
    env_.backend.fill_zero(grads_.data(), grads_.bytes());
  }
  // The dropout masks of micro-batch m of this step on this rank (the same after a resume); an
  // evaluation has none.
  void before_forward(std::int64_t m, bool training) override {
    std::uint64_t seed = 0;
    if (training) {
      const std::uint64_t step = kernels::dropout_stream(step_.seed ^ 0x4C6F5241ull, static_cast<std::uint64_t>(step_.done));
      seed = kernels::dropout_stream(step, static_cast<std::uint64_t>(m * env_.mode.world + env_.comm.rank()));
    }
    env_.model.set_lora({params_.f32(), training ? grads_.f32() : nullptr, seed, training});
  }
  // The frozen base: activation gradients only; the adapters' gradients accumulate in grads_.
  const UnitBuffers& gradients() override { return frozen_; }
  std::vector<void*> gradients_complete() override { return {}; }

  // The adapters' gradients summed over the ranks (apply() reuses the host copy this leaves).
  void reduce() override {
    if (env_.mode.world == 1) return;
    if (env_.backend.name() == "cpu") {  // the backend's memory is host memory: in place
      env_.comm.all_reduce_sum(std::span<float>(grads_.f32(), n_));
      return;
    }
    grad_host_.resize(n_);
    env_.backend.download(grad_host_.data(), grads_.data(), n_ * sizeof(float));
    env_.comm.all_reduce_sum(std::span<float>(grad_host_));
    env_.backend.upload(grads_.data(), grad_host_.data(), n_ * sizeof(float));
  }
  // Of the gradient summed over the ranks: the same on every rank.
  double squared_norm() override {
    env_.backend.sum_squares(static_cast<double*>(sq_.data()), grads_.data(), static_cast<std::int64_t>(n_));
    double sq = 0;
    env_.backend.download(&sq, sq_.data(), sizeof(double));
    return sq;
  }
  // The base is frozen: nothing to refresh.
  void apply(double grad_scale) override {
    const offload::StepInputs in = step_inputs(step_, grad_scale, DType::kF32);
    kernels::cpu::AdamTensors t;
    t.grad_dtype = DType::kF32;
    t.state_dtype = DType::kF32;
    t.param_out = nullptr;
    t.n = n_;
    if (offloaded_) {
      // The CPU optimizer on the host copy; the new adapters go back up. (With several ranks
      // reduce() has left the summed gradients in grad_host_ already.)
      if (env_.mode.world == 1) {
        grad_host_.resize(n_);
        env_.backend.download(grad_host_.data(), grads_.data(), n_ * sizeof(float));
      }
      t.param = host_.data();
      t.grad = grad_host_.data();
      t.exp_avg = host_.data() + n_;
      t.exp_avg_sq = host_.data() + 2 * n_;
      kernels::cpu::adam_step(in.adam, t, kernels::cpu::Exec(kernels::cpu::active_isa(), &env_.arena));
      env_.backend.upload(params_.data(), host_.data(), n_ * sizeof(float));
    } else {
      t.param = params_.f32();
      t.grad = grads_.data();
      t.exp_avg = moments_.f32();
      t.exp_avg_sq = moments_.f32() + n_;
      env_.backend.adam_step(in.adam, t);
    }
  }

  // The bf16 values the store now holds, hashed: the whole unit (the same on every rank) and this
  // rank's piece.
  void base_loaded(std::size_t u, std::span<const float> full, std::span<const float> piece) override {
    std::vector<std::uint16_t> bf(full.size());
    kernels::cpu::convert(full.data(), DType::kF32, bf.data(), DType::kBF16, full.size());
    base_unit_hash_[u] = XXH3_64bits(bf.data(), full.size() * 2);
    base_shard_hash_[u] = base_unit_hash_[u];
    if (env_.mode.sharded) {
      bf.resize(piece.size());
      kernels::cpu::convert(piece.data(), DType::kF32, bf.data(), DType::kBF16, piece.size());
      base_shard_hash_[u] = XXH3_64bits(bf.data(), piece.size() * 2);
    }
  }

  // The adapters at the start: PEFT's initialisation from the seed, or --lora-init's.
  void initialise(std::uint64_t seed) override {
    const TrainOptions& o = env_.options;
    std::vector<float> v(n_);
    if (!o.lora_init.empty()) {
      LoadedAdapter a = load_adapter(o.lora_init, o.model);
      const LoraConfig& got = a.layout.config;
      const LoraConfig& want = layout_.config;
      if (got.rank != want.rank || got.targets != want.targets || got.alpha != want.alpha || got.rslora != want.rslora) {
        throw Error("--lora-init {} holds adapters of {}, but this run asks for {}: pass the same --lora-rank, "
                    "--lora-alpha and --lora-targets (or --lora-rslora) as the adapter",
                    o.lora_init, got.describe(), want.describe());
      }
      v = std::move(a.params);
      spdlog::info("LoRA adapters from {}", o.lora_init);
    } else {
      init_lora(layout_, seed, v);
    }
    const std::vector<float> zero(v.size(), 0.0f);
    set_state(v, zero, zero);
  }

  // The adapters' master, exp_avg and exp_avg_sq, one flat tensor each ("lora.master", ...).
  StateSource checkpoint_state() override {
    saved_ = state();
    StateSource s;
    s.entries.emplace_back("lora", n_);
    s.read = [this](std::size_t, std::span<float> m, std::span<float> a, std::span<float> v) {
      std::copy_n(saved_.data(), n_, m.data());
      std::copy_n(saved_.data() + n_, n_, a.data());
      std::copy_n(saved_.data() + 2 * n_, n_, v.data());
    };
    return s;
  }
  // The options and the base in trainer_state.json; the adapters also in PEFT's format, so the
  // checkpoint directory loads as a PEFT adapter.
  void add_to_checkpoint(CheckpointManifest& m, CheckpointSave& save) override {
    m.lora = options_json();
    m.lora["numel"] = layout_.numel;
    save.extra_files = [this](const std::string& dir) {
      save_adapter(dir, layout_, std::span<const float>(saved_.data(), n_), base_source());
    };
  }
  // The same adapters' shape and options, the same base (read again here), and the adapters' state.
  void load_checkpoint(const CheckpointReader& ck, const std::function<void()>& load_base) override {
    const std::string& dir = ck.dir();
    std::string fingerprint;
    try {
      const Json& j = ck.manifest().lora;
      LoraConfig c;
      c.rank = j.at("rank").get<std::int64_t>();
      c.alpha = j.at("alpha").get<double>();
      c.dropout = j.at("dropout").get<double>();
      c.targets = parse_lora_targets(j.at("targets").get<std::string>());
      c.rslora = j.at("rslora").get<bool>();
      if (c != layout_.config) {
        throw Error("checkpoint '{}' trains LoRA adapters of {}, this run asks for {}: resume with the same --lora-* "
                    "options",
                    dir, c.describe(), layout_.config.describe());
      }
      fingerprint = j.at("base").at("fingerprint").get<std::string>();
      if (fingerprint.empty()) throw Error("{}/{}: the base's fingerprint is empty", dir, kTrainerStateFile);
    } catch (const Json::exception& e) {
      throw Error("{}/{} is damaged: {}", dir, kTrainerStateFile, e.what());
    }
    load_base();
    if (hex64(base_fingerprint()) != fingerprint) {
      throw Error("checkpoint '{}' holds adapters trained on another base model ({}) than this run's ({}): resume with "
                  "the base they were trained on (--init, or the same --seed for a seeded one)",
                  dir, ck.manifest().lora.at("base").value("source", std::string("?")), base_source());
    }
    set_state(ck.tensor("lora", "master", n_), ck.tensor("lora", "exp_avg", n_), ck.tensor("lora", "exp_avg_sq", n_));
  }

  // At the end of a run: the store's bf16 shards and the compute copies (stages 0-2) are still the
  // base as loaded, bit for bit. (Fails only on a bug: the base must never change.)
  void finish_run() override {
    const auto t0 = std::chrono::steady_clock::now();
    env_.gather.drop_read_ahead();  // read-aheads give their staging buffers back
    std::vector<std::uint16_t> shard, copy;
    for (std::size_t u = 0; u < env_.layout.units.size(); ++u) {
      shard.resize(static_cast<std::size_t>(env_.mode.shard[u]));
      env_.offload.store().fetch(u).copy_to(shard);
      copy.clear();
      if (env_.compute != nullptr) {
        copy.resize(static_cast<std::size_t>(env_.layout.units[u].numel));
        env_.backend.download(copy.data(), env_.compute->view().units[u], copy.size() * 2);
      }
      if (env_.options.inspect_base) env_.options.inspect_base(u, shard, copy);
      const bool store_same = XXH3_64bits(shard.data(), shard.size() * 2) == base_shard_hash_[u];
      const bool copy_same = copy.empty() || XXH3_64bits(copy.data(), copy.size() * 2) == base_unit_hash_[u];
      if (!store_same || !copy_same) {
        throw Error("the frozen base's {} changed during LoRA training ({}); this is a zinf bug: please report it",
                    env_.layout.units[u].name, store_same ? "its compute copy" : "its stored shard");
      }
    }
    spdlog::info("LoRA: the frozen base is bit-identical to the one loaded ({} units checked in {:.1f}s)",
                 env_.layout.units.size(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  void describe(Json& summary) const override {
    Json& j = summary["lora"];
    j = options_json();
    j["adapted_linears"] = layout_.adapters.size();
    j["trainable_parameters"] = layout_.parameter_count();
    j["optimizer_state"] = state_on_host() ? "host" : "gpu";
    j["base"]["verified_unchanged"] = true;
  }

 private:
  bool state_on_host() const { return offloaded_ || env_.backend.name() == "cpu"; }
  void set_state(std::span<const float> master, std::span<const float> m, std::span<const float> v) {
    env_.backend.upload(params_.data(), master.data(), n_ * sizeof(float));
    if (offloaded_) {
      std::copy(master.begin(), master.end(), host_.begin());
      std::copy(m.begin(), m.end(), host_.begin() + static_cast<std::ptrdiff_t>(n_));
      std::copy(v.begin(), v.end(), host_.begin() + static_cast<std::ptrdiff_t>(2 * n_));
    } else {
      env_.backend.upload(moments_.data(), m.data(), n_ * sizeof(float));
      env_.backend.upload(moments_.f32() + n_, v.data(), n_ * sizeof(float));
    }
  }
  // [master | exp_avg | exp_avg_sq], 3 x numel.
  std::vector<float> state() {
    if (offloaded_) return host_;
    std::vector<float> out(3 * n_);
    env_.backend.download(out.data(), params_.data(), n_ * sizeof(float));
    env_.backend.download(out.data() + n_, moments_.data(), 2 * n_ * sizeof(float));
    return out;
  }
  // One number for the frozen base as loaded (every rank computes the same).
  std::uint64_t base_fingerprint() const {
    return XXH3_64bits(base_unit_hash_.data(), base_unit_hash_.size() * sizeof(std::uint64_t));
  }
  std::string base_source() const {
    const TrainOptions& o = env_.options;
    return o.init_weights.empty() ? fmt::format("seeded initialisation (seed {})", o.seed) : o.init_weights;
  }
  // The LoRA options and the base, as checkpoints and summary.json record them.
  Json options_json() const {
    const LoraConfig& c = layout_.config;
    return {{"rank", c.rank},
            {"alpha", c.alpha},
            {"dropout", c.dropout},
            {"targets", lora_targets_string(c.targets)},
            {"rslora", c.rslora},
            {"base", {{"source", base_source()}, {"fingerprint", hex64(base_fingerprint())}}}};
  }

  const LoraLayout& layout_;
  std::size_t n_;
  bool offloaded_ = false;  // the adapters' optimizer state in host memory
  StepInfo step_;
  DeviceBuffer params_, grads_, moments_, sq_;
  std::vector<float> host_;       // offloaded_: [master | exp_avg | exp_avg_sq]
  std::vector<float> grad_host_;  // the gradients brought down (reduction, host step)
  std::vector<float> saved_;      // the state a checkpoint is writing
  UnitBuffers frozen_;            // no units: the base has no gradients
  std::vector<std::uint64_t> base_unit_hash_, base_shard_hash_;  // the base as loaded (finish_run())
};

}  // namespace

std::unique_ptr<GradientPath> make_lora_path(PathEnv& env) { return std::make_unique<LoraPath>(env); }

}  // namespace zinf::runtime
