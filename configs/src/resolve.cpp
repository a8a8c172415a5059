#include "zinf/configs/resolve.hpp"

#include <fmt/format.h>

#include <cmath>
#include <functional>

namespace zinf::config {

namespace {

bool is_auto(const Json* v) { return v != nullptr && v->is_string() && v->get<std::string>() == "auto"; }

// Finds a dotted path ("optimizer.params.lr"); nullptr when any part is absent.
Json* find_path(Json& root, const std::string& path) {
  Json* cur = &root;
  std::size_t start = 0;
  while (start <= path.size()) {
    const auto dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!cur->is_object()) return nullptr;
    auto it = cur->find(part);
    if (it == cur->end()) return nullptr;
    cur = &*it;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return cur;
}

std::string show(const Json& v) {
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d == std::floor(d) && std::fabs(d) < 1e15) return fmt::format("{}", static_cast<long long>(d));
    return fmt::format("{}", d);
  }
  return v.dump(-1, ' ', false, Json::error_handler_t::replace);
}

bool same_value(const Json& a, const Json& b) {
  if (a.is_number() && b.is_number()) return a.get<double>() == b.get<double>();
  if (a.is_array() && b.is_array() && a.size() == b.size()) {
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (!same_value(a[i], b[i])) return false;
    }
    return true;
  }
  return a == b;
}

class Resolver {
 public:
  Resolver(const Json& config, bool use_defaults) : use_defaults_(use_defaults) { out_.resolved = config; }

  // `value` is the argument's value if given, `fallback` what an "auto" gets otherwise (nullopt:
  // stays unresolved). A non-auto config value that differs from a given argument is a mismatch
  // when `must_match`.
  void fill(const std::string& path, const std::string& arg, const std::optional<Json>& given,
            const std::optional<Json>& fallback, bool must_match = true) {
    Json* v = find_path(out_.resolved, path);
    if (v == nullptr) return;
    if (is_auto(v)) {
      if (given) {
        *v = *given;
        out_.filled.push_back(fmt::format("{} = {} (from {})", path, show(*given), arg));
      } else if (fallback && use_defaults_) {
        *v = *fallback;
        out_.defaulted.push_back(fmt::format("{} = {} (default of {})", path, show(*fallback), arg));
      } else {
        out_.unresolved.push_back(fmt::format("{}: pass {}", path, arg));
      }
      return;
    }
    if (must_match && given && !same_value(*v, *given)) {
      out_.mismatches.push_back(fmt::format("- ds {}={} vs arg {}={}", path, show(*v), arg, show(*given)));
      out_.mismatch_paths.push_back(path);
    }
  }

  // Value of a config key if it is a plain number, else nullopt.
  std::optional<std::int64_t> int_at(const std::string& path) {
    Json* v = find_path(out_.resolved, path);
    if (v == nullptr || !v->is_number()) return std::nullopt;
    const double d = v->get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9e18) return std::nullopt;
    return static_cast<std::int64_t>(d);
  }

  Resolution take() { return std::move(out_); }

 private:
  bool use_defaults_;
  Resolution out_;
};

template <typename T>
std::optional<Json> opt_json(const std::optional<T>& v) {
  return v ? std::optional<Json>(Json(*v)) : std::nullopt;
}

}  // namespace

std::string Resolution::mismatch_report() const {
  if (mismatches.empty()) return {};
  std::string out = "Please correct the following DeepSpeed config values that mismatch the training arguments:\n";
  for (const auto& m : mismatches) out += m + "\n";
  out += "The easiest method is to set these DeepSpeed config values to \"auto\".";
  return out;
}

Resolution resolve_auto(const Json& config, const TrainingArgs& a, bool use_defaults, const TrainingDefaults& d) {
  Resolver r(config, use_defaults);

  // Batch. train_batch_size = world * micro * GAS with the values in effect (argument, else the
  // config's own number, else the default), as the HF Trainer computes it.
  r.fill("train_micro_batch_size_per_gpu", "--micro-batch", opt_json(a.micro_batch), Json(d.micro_batch));
  r.fill("gradient_accumulation_steps", "--grad-accum", opt_json(a.grad_accum), Json(d.grad_accum));
  const std::int64_t world = a.world_size.value_or(d.world_size);
  const auto micro = a.micro_batch ? a.micro_batch : r.int_at("train_micro_batch_size_per_gpu");
  const auto gas = a.grad_accum ? a.grad_accum : r.int_at("gradient_accumulation_steps");
  // (A product that overflows is left out: the parse then reports the sizes that cannot be.)
  const auto product = [world](std::int64_t m, std::int64_t g) -> std::optional<Json> {
    std::int64_t wm = 0, wmg = 0;
    if (__builtin_mul_overflow(world, m, &wm) || __builtin_mul_overflow(wm, g, &wmg)) return std::nullopt;
    return Json(wmg);
  };
  std::optional<Json> train_given;
  if (a.micro_batch && a.grad_accum) train_given = product(*a.micro_batch, *a.grad_accum);
  const std::optional<Json> train_fallback =
      micro && gas ? product(*micro, *gas) : product(micro.value_or(d.micro_batch), gas.value_or(d.grad_accum));
  r.fill("train_batch_size", "--world-size*--micro-batch*--grad-accum", train_given ? train_given : std::nullopt,
         train_fallback);
  // An "auto" train_batch_size is filled by the rule even without arguments, like HF does.

  r.fill("gradient_clipping", "--max-grad-norm", opt_json(a.max_grad_norm), Json(d.max_grad_norm));

  // Optimizer.
  r.fill("optimizer.params.lr", "--lr", opt_json(a.lr), Json(d.lr));
  std::optional<Json> betas_given;
  if (a.beta1 || a.beta2) betas_given = Json::array({a.beta1.value_or(d.beta1), a.beta2.value_or(d.beta2)});
  r.fill("optimizer.params.betas", "--beta1/--beta2", betas_given, Json::array({d.beta1, d.beta2}));
  r.fill("optimizer.params.eps", "--eps", opt_json(a.eps), Json(d.eps));
  r.fill("optimizer.params.weight_decay", "--weight-decay", opt_json(a.weight_decay), Json(d.weight_decay));

  // Scheduler.
  r.fill("scheduler.params.warmup_min_lr", "(always 0)", Json(0), Json(0), /*must_match=*/false);
  r.fill("scheduler.params.warmup_max_lr", "--lr", opt_json(a.lr), Json(d.lr));
  r.fill("scheduler.params.warmup_num_steps", "--warmup-steps", opt_json(a.warmup_steps), Json(d.warmup_steps));
  r.fill("scheduler.params.total_num_steps", "--total-steps", opt_json(a.total_steps), std::nullopt);

  // Precision: the flags are booleans that default to false; only a given flag can mismatch.
  for (const char* section : {"fp16", "bf16", "bfloat16"}) {
    const bool is_fp16 = std::string(section) == "fp16";
    const bool flag = is_fp16 ? a.fp16 : a.bf16;
    const char* name = is_fp16 ? "--fp16" : "--bf16";
    r.fill(std::string(section) + ".enabled", name, flag ? std::optional<Json>(Json(true)) : std::nullopt,
           Json(false));
  }

  // ZeRO sizes from the model's hidden size (fill only, never a mismatch).
  std::optional<Json> rbs, pbs, ppt;
  if (a.hidden_size) {
    const std::int64_t h = *a.hidden_size;
    rbs = Json(h * h);
    pbs = Json(static_cast<std::int64_t>(0.9 * static_cast<double>(h * h)));
    ppt = Json(10 * h);
  }
  // Without a hidden size, DeepSpeed's own defaults apply (what its config would do with "auto").
  r.fill("zero_optimization.reduce_bucket_size", "--hidden-size", rbs, Json(500'000'000), false);
  r.fill("zero_optimization.stage3_prefetch_bucket_size", "--hidden-size", pbs, Json(50'000'000), false);
  r.fill("zero_optimization.stage3_param_persistence_threshold", "--hidden-size", ppt, Json(100'000), false);
  return r.take();
}

}  // namespace zinf::config
