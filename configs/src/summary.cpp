#include "zinf/configs/summary.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

namespace zinf::config {

namespace {

bool is_auto(const DeepSpeedConfig& c, const std::string& path) {
  return std::find(c.auto_keys.begin(), c.auto_keys.end(), path) != c.auto_keys.end();
}

template <typename T>
std::string val(const DeepSpeedConfig& c, const std::string& path, const T& value) {
  return is_auto(c, path) ? std::string("auto") : fmt::format("{}", value);
}

std::string placement(OffloadDevice device, const std::string& nvme_path, bool pin) {
  switch (device) {
    case OffloadDevice::kNone: return "GPU";
    case OffloadDevice::kCpu: return pin ? "host memory (pinned)" : "host memory (pageable)";
    case OffloadDevice::kNvme: return fmt::format("NVMe at {}", nvme_path);
  }
  return "?";
}

}  // namespace

std::string human_count(std::int64_t n) {
  struct Unit {
    std::int64_t size;
    const char* suffix;
  };
  // Short forms only where they are exact to two decimals (5e8 -> "500M", 1.5e9 -> "1.5G");
  // anything else in full with separators (530841 -> "530,841").
  for (const Unit u : {Unit{1'000'000'000'000, "T"}, Unit{1'000'000'000, "G"}, Unit{1'000'000, "M"}, Unit{1'000, "K"}}) {
    if (n >= u.size && n % (u.size / 100) == 0) {
      return fmt::format("{:g}{}", static_cast<double>(n) / static_cast<double>(u.size), u.suffix);
    }
  }
  std::string digits = std::to_string(n);
  std::string out;
  const std::size_t first = digits.size() % 3 == 0 ? 3 : digits.size() % 3;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i != 0 && (i - first) % 3 == 0 && i >= first && digits[i - 1] != '-') out += ',';
    out += digits[i];
  }
  return out;
}

std::string summarize(const DeepSpeedConfig& c) {
  std::vector<std::pair<std::string, std::string>> rows;
  const auto& z = c.zero;
  static const char* kStageText[] = {"no partitioning (data parallel)", "optimizer state partitioned",
                                     "optimizer state + gradients partitioned",
                                     "optimizer state + gradients + parameters partitioned"};
  rows.emplace_back("ZeRO stage", fmt::format("{} ({})", val(c, "zero_optimization.stage", z.stage), kStageText[z.stage]));

  // Where each kind of state lives.
  const std::string param_place =
      z.offload_param ? placement(z.offload_param->device, z.offload_param->nvme_path, z.offload_param->pin_memory)
                      : "GPU";
  std::string opt_place = z.offload_optimizer ? placement(z.offload_optimizer->device, z.offload_optimizer->nvme_path,
                                                          z.offload_optimizer->pin_memory)
                                              : "GPU";
  if (z.offload_optimizer && z.offload_optimizer->device != OffloadDevice::kNone && z.offload_optimizer->ratio < 1.0) {
    opt_place += fmt::format(", ratio {} offloaded", z.offload_optimizer->ratio);
  }
  rows.emplace_back("parameters", param_place);
  rows.emplace_back("optimizer state", opt_place);
  if (z.stage == 3) {
    rows.emplace_back("stage 3 budgets",
                      fmt::format("prefetch {} elements, max live {}, reuse distance {}, persistence <= {}",
                                  val(c, "zero_optimization.stage3_prefetch_bucket_size", human_count(z.prefetch_bucket_size)),
                                  human_count(z.max_live_parameters), human_count(z.max_reuse_distance),
                                  val(c, "zero_optimization.stage3_param_persistence_threshold",
                                      human_count(z.param_persistence_threshold))));
  }
  if (z.stage >= 2) {
    rows.emplace_back("gradient buckets",
                      fmt::format("reduce {} elements, overlap_comm {}",
                                  val(c, "zero_optimization.reduce_bucket_size", human_count(z.reduce_bucket_size)),
                                  z.overlap_comm));
  }

  // Batch arithmetic.
  const auto& b = c.batch;
  if (b.resolved) {
    rows.emplace_back("batch", fmt::format("train_batch_size {} = micro {} x grad accum {} x world {}", b.train, b.micro,
                                           b.gas, b.world_size));
  } else {
    auto show = [&](const char* key, const std::optional<std::int64_t>& v) {
      return is_auto(c, key) ? std::string("auto") : (v ? fmt::format("{}", *v) : std::string("derived"));
    };
    rows.emplace_back("batch", fmt::format("train_batch_size {} = micro {} x grad accum {} x world {} (settled at "
                                           "launch from the training arguments)",
                                           show("train_batch_size", b.train_batch_size),
                                           show("train_micro_batch_size_per_gpu", b.micro_batch_per_gpu),
                                           show("gradient_accumulation_steps", b.gradient_accumulation_steps),
                                           b.world_size));
  }

  // Precision.
  std::string precision;
  const bool fp16_auto = is_auto(c, "fp16.enabled");
  const bool bf16_auto = is_auto(c, "bf16.enabled") || is_auto(c, "bfloat16.enabled");
  if (c.fp16.enabled) {
    precision = c.fp16.dynamic()
                    ? fmt::format("fp16 mixed, dynamic loss scale 2^{} (window {}, hysteresis {}, min {})",
                                  c.fp16.initial_scale_power, c.fp16.loss_scale_window, c.fp16.hysteresis,
                                  c.fp16.min_loss_scale)
                    : fmt::format("fp16 mixed, static loss scale {}", c.fp16.loss_scale);
  } else if (c.bf16.enabled) {
    precision = "bf16 mixed (fp32 master weights)";
  } else if (fp16_auto || bf16_auto) {
    precision = fmt::format("auto ({}{}{} from --bf16/--fp16; fp32 without them)", bf16_auto ? "bf16" : "",
                            (bf16_auto && fp16_auto) ? " or " : "", fp16_auto ? "fp16" : "");
  } else {
    precision = "fp32";
  }
  rows.emplace_back("precision", precision);

  // Optimizer.
  const auto& o = c.optimizer;
  if (!o.from_config) {
    rows.emplace_back("optimizer", "none in the config: AdamW from the training arguments");
  } else {
    std::string text = to_string(o.type);
    if (o.type == OptimizerType::kAdam) text += o.adam_w_mode ? " (adam_w_mode: decoupled decay)" : " (L2 decay)";
    text += fmt::format(" lr {}", val(c, "optimizer.params.lr", o.lr));
    if (o.type != OptimizerType::kAdagrad) {
      text += fmt::format(" betas {}", is_auto(c, "optimizer.params.betas") ? std::string("auto")
                                                                             : fmt::format("({}, {})", o.beta1, o.beta2));
    }
    if (o.type != OptimizerType::kLion) text += fmt::format(" eps {}", val(c, "optimizer.params.eps", o.eps));
    text += fmt::format(" weight_decay {}", val(c, "optimizer.params.weight_decay", o.weight_decay));
    rows.emplace_back("optimizer", text);
  }

  // Scheduler.
  if (!c.scheduler) {
    rows.emplace_back("scheduler", "none (constant lr)");
  } else {
    const auto& s = *c.scheduler;
    std::string text = to_string(s.type);
    switch (s.type) {
      case SchedulerType::kLRRangeTest:
        text += fmt::format(": min lr {}, step size {}, rate {}{}", s.lr_range_test.min_lr, s.lr_range_test.step_size,
                            s.lr_range_test.step_rate, s.lr_range_test.staircase ? ", staircase" : "");
        break;
      case SchedulerType::kOneCycle:
        text += fmt::format(": lr {} -> {} over {}+{} steps, then decay rate {} every {} steps",
                            s.one_cycle.cycle_min_lr, s.one_cycle.cycle_max_lr, s.one_cycle.cycle_first_step_size,
                            s.one_cycle.cycle_second_step_size, s.one_cycle.decay_lr_rate, s.one_cycle.decay_step_size);
        break;
      case SchedulerType::kWarmupLR:
      case SchedulerType::kWarmupDecayLR:
        text += fmt::format(": {} warmup {} -> {} over {} steps",
                            to_string(s.warmup.warmup_type), val(c, "scheduler.params.warmup_min_lr", s.warmup.warmup_min_lr),
                            val(c, "scheduler.params.warmup_max_lr", s.warmup.warmup_max_lr),
                            val(c, "scheduler.params.warmup_num_steps", s.warmup.warmup_num_steps));
        if (s.type == SchedulerType::kWarmupDecayLR) {
          text += fmt::format(", linear decay to 0 at step {}", val(c, "scheduler.params.total_num_steps",
                                                                    s.warmup.total_num_steps));
        }
        break;
      case SchedulerType::kWarmupCosineLR:
        text += fmt::format(": {} warmup over {} steps from ratio {}, cosine to ratio {} at step {}",
                            to_string(s.warmup_cosine.warmup_type),
                            val(c, "scheduler.params.warmup_num_steps", s.warmup_cosine.warmup_num_steps),
                            s.warmup_cosine.warmup_min_ratio, s.warmup_cosine.cos_min_ratio,
                            val(c, "scheduler.params.total_num_steps", s.warmup_cosine.total_num_steps));
        break;
    }
    rows.emplace_back("scheduler", text);
  }
  rows.emplace_back("gradient clipping", is_auto(c, "gradient_clipping")
                                             ? std::string("auto")
                                             : (c.gradient_clipping > 0 ? fmt::format("global norm {}", c.gradient_clipping)
                                                                        : std::string("off")));
  if (z.param_device() == OffloadDevice::kNvme || z.optimizer_device() == OffloadDevice::kNvme) {
    rows.emplace_back("NVMe I/O", fmt::format("block {} bytes, queue depth {}, {} thread(s), single_submit {}",
                                              c.aio.block_size, c.aio.queue_depth, c.aio.intra_op_parallelism,
                                              c.aio.single_submit));
  }
  if (c.steps_per_print) rows.emplace_back("print", fmt::format("every {} steps", *c.steps_per_print));
  if (c.wall_clock_breakdown) rows.emplace_back("timers", "wall clock breakdown on");

  std::size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.first.size());
  std::string out;
  for (const auto& [label, value] : rows) out += fmt::format("  {:<{}}  {}\n", label, width, value);
  return out;
}

}  // namespace zinf::config
