#include "zinf/configs/parse.hpp"

#include <fmt/format.h>

#include <cctype>
#include <optional>

#include "reader.hpp"

namespace zinf::config {

using detail::AutoPolicy;
using detail::enabled_section;
using detail::json_true;
using detail::Reader;

const char* to_string(OffloadDevice device) noexcept {
  switch (device) {
    case OffloadDevice::kNone: return "none";
    case OffloadDevice::kCpu: return "cpu";
    case OffloadDevice::kNvme: return "nvme";
  }
  return "?";
}
const char* to_string(OptimizerType type) noexcept {
  switch (type) {
    case OptimizerType::kAdam: return "Adam";
    case OptimizerType::kAdamW: return "AdamW";
    case OptimizerType::kAdagrad: return "Adagrad";
    case OptimizerType::kLion: return "Lion";
  }
  return "?";
}
const char* to_string(SchedulerType type) noexcept {
  switch (type) {
    case SchedulerType::kLRRangeTest: return "LRRangeTest";
    case SchedulerType::kOneCycle: return "OneCycle";
    case SchedulerType::kWarmupLR: return "WarmupLR";
    case SchedulerType::kWarmupDecayLR: return "WarmupDecayLR";
    case SchedulerType::kWarmupCosineLR: return "WarmupCosineLR";
  }
  return "?";
}
const char* to_string(WarmupType type) noexcept { return type == WarmupType::kLog ? "log" : "linear"; }
const char* to_string(Dtype dtype) noexcept {
  switch (dtype) {
    case Dtype::kFp32: return "fp32";
    case Dtype::kFp16: return "fp16";
    case Dtype::kBf16: return "bf16";
  }
  return "?";
}

namespace {

const std::vector<std::pair<std::string, OffloadDevice>> kDevices{
    {"none", OffloadDevice::kNone}, {"cpu", OffloadDevice::kCpu}, {"nvme", OffloadDevice::kNvme}};
const std::vector<std::pair<std::string, WarmupType>> kWarmupTypes{{"log", WarmupType::kLog},
                                                                   {"linear", WarmupType::kLinear}};
const std::vector<std::pair<std::string, Dtype>> kDtypes{
    {"fp32", Dtype::kFp32}, {"float32", Dtype::kFp32}, {"fp16", Dtype::kFp16}, {"float16", Dtype::kFp16},
    {"half", Dtype::kFp16}, {"bf16", Dtype::kBf16},    {"bfloat16", Dtype::kBf16}};

// ---------------------------------------------------------------------------------------------
// batch

void read_batch(Reader& top, BatchConfig& batch) {
  top.integer("train_batch_size", batch.train_batch_size, 1);
  top.integer("train_micro_batch_size_per_gpu", batch.micro_batch_per_gpu, 1);
  top.integer("gradient_accumulation_steps", batch.gradient_accumulation_steps, 1);
}

// ---------------------------------------------------------------------------------------------
// precision

void read_fp16(Reader r, Fp16Config& c) {
  r.boolean("enabled", c.enabled);
  r.boolean("auto_cast", c.auto_cast);
  r.number("loss_scale", c.loss_scale, 0.0);
  r.integer("initial_scale_power", c.initial_scale_power, 0, 63);
  r.integer("loss_scale_window", c.loss_scale_window, 1);
  r.integer("hysteresis", c.hysteresis, 1, 1'000'000);
  r.boolean("consecutive_hysteresis", c.consecutive_hysteresis);
  r.number("min_loss_scale", c.min_loss_scale, 0.0, std::numeric_limits<double>::infinity(), true);
  r.unsupported("fp16_master_weights_and_grads", Severity::kError,
                "fp16 master weights change the numerics; zinf keeps fp32 master weights", json_true);
  r.unsupported("fused_mode", Severity::kNote, "legacy key, no effect");
  r.finish();
  if (c.enabled && !c.dynamic() && c.loss_scale < 1.0) {
    r.warning("loss_scale", fmt::format("a static loss scale of {} below 1 shrinks gradients toward underflow", c.loss_scale));
  }
}

void read_bf16(Reader r, Bf16Config& c) {
  r.boolean("enabled", c.enabled);
  r.boolean("immediate_grad_update", c.immediate_grad_update);
  r.boolean("check_grad_overflow", c.check_grad_overflow);
  r.unsupported("bf16_master_weights_and_grads", Severity::kError,
                "bf16 master weights change the numerics; zinf keeps fp32 master weights", json_true);
  r.unsupported("bf16_optimizer_states", Severity::kError,
                "bf16 optimizer states are not available yet; zinf keeps exp_avg/exp_avg_sq in fp32", json_true);
  r.finish();
}

// ---------------------------------------------------------------------------------------------
// optimizer

struct KnownOptimizer {
  const char* lower;
  const char* reason;  // null = implemented
};

// DeepSpeed's names (runtime/config.py), compared case-insensitively as DeepSpeed does.
constexpr KnownOptimizer kOptimizers[] = {
    {"adam", nullptr},
    {"adamw", nullptr},
    {"adagrad", nullptr},
    {"lion", nullptr},
    {"lamb", "Lamb is not implemented; use Adam/AdamW, Adagrad or Lion"},
    {"onebitadam", "1-bit Adam is not compatible with ZeRO (as in DeepSpeed) and not implemented"},
    {"zerooneadam", "0/1 Adam is not compatible with ZeRO (as in DeepSpeed) and not implemented"},
    {"onebitlamb", "1-bit Lamb is not compatible with ZeRO (as in DeepSpeed) and not implemented"},
    {"muadam", "MuAdam (mup) is not implemented; use Adam/AdamW"},
    {"muadamw", "MuAdamW (mup) is not implemented; use AdamW"},
    {"musgd", "MuSGD (mup) is not implemented"},
    {"muon", "Muon is not implemented; use AdamW"},
    {"sgd", "SGD is not implemented; use Adam/AdamW, Adagrad or Lion"},
};

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

void read_optimizer(Reader& top, DeepSpeedConfig& cfg) {
  Reader r = top.section("optimizer", AutoPolicy::kError);
  OptimizerConfig& o = cfg.optimizer;
  if (!r.exists()) {
    o.from_config = false;
    return;
  }
  o.from_config = true;
  r.unsupported("legacy_fusion", Severity::kNote, "legacy key, no effect");
  std::string type;
  if (!r.has("type")) {
    r.error("type", "missing: name the optimizer, e.g. \"type\": \"AdamW\"");
  } else if (r.string("type", type)) {
    o.type_name = type;
    const std::string key = lower(type);
    const KnownOptimizer* known = nullptr;
    for (const auto& k : kOptimizers) {
      if (key == k.lower) known = &k;
    }
    if (known == nullptr) {
      std::vector<std::string> names{"Adam", "AdamW", "Adagrad", "Lion"};
      r.error("type", fmt::format("unknown optimizer \"{}\"; zinf implements Adam, AdamW, Adagrad and Lion{}", type,
                                  detail::did_you_mean(type, names)));
    } else if (known->reason != nullptr) {
      r.error("type", fmt::format("\"{}\": {}", type, known->reason));
    } else if (key == "adam") {
      o.type = OptimizerType::kAdam;
    } else if (key == "adamw") {
      o.type = OptimizerType::kAdamW;
    } else if (key == "adagrad") {
      o.type = OptimizerType::kAdagrad;
    } else {
      o.type = OptimizerType::kLion;
    }
  }
  // Per-type defaults (DeepSpeed's FusedAdam/CPUAdam, CPUAdagrad, Lion).
  if (o.type == OptimizerType::kAdagrad) {
    o.lr = 1e-2;
    o.eps = 1e-10;
  } else if (o.type == OptimizerType::kLion) {
    o.lr = 1e-4;
    o.beta2 = 0.99;
  }
  Reader p = r.section("params", AutoPolicy::kError);
  r.finish();
  if (p.has("max_grad_norm")) {
    p.error("max_grad_norm",
            "clipping is not an optimizer parameter: remove it and set the top-level \"gradient_clipping\" instead");
  }
  p.number("lr", o.lr, 0.0);
  p.number("weight_decay", o.weight_decay, 0.0);
  switch (o.type) {
    case OptimizerType::kAdam:
    case OptimizerType::kAdamW:
      p.number_pair("betas", o.beta1, o.beta2, 0.0, 1.0);
      p.number("eps", o.eps, 0.0);
      p.boolean("adam_w_mode", o.adam_w_mode);
      p.boolean("bias_correction", o.bias_correction);
      p.boolean("torch_adam", o.torch_adam);
      if (o.type == OptimizerType::kAdamW && p.has("adam_w_mode") && !o.adam_w_mode) {
        p.warning("adam_w_mode", "AdamW always decays weights decoupled (as in DeepSpeed); use \"type\": \"Adam\" "
                                 "with adam_w_mode false for L2 regularisation");
      }
      if (o.type == OptimizerType::kAdamW) o.adam_w_mode = true;
      p.unsupported("amsgrad", Severity::kError, "AMSGrad changes the update; zinf implements plain Adam/AdamW",
                    json_true);
      p.unsupported("maximize", Severity::kError, "maximize=true is not implemented", json_true);
      p.accept({"fused", "foreach", "capturable", "differentiable", "set_grad_none"});
      break;
    case OptimizerType::kAdagrad:
      p.number("eps", o.eps, 0.0);
      p.number("lr_decay", o.lr_decay, 0.0);
      p.number("initial_accumulator_value", o.initial_accumulator, 0.0);
      p.accept({"foreach", "maximize", "differentiable", "fused"});
      break;
    case OptimizerType::kLion:
      p.number_pair("betas", o.beta1, o.beta2, 0.0, 1.0);
      break;
  }
  p.finish(Severity::kError,
           fmt::format("for {} (an unknown optimizer parameter would change the update)", to_string(o.type)));
}

// ---------------------------------------------------------------------------------------------
// scheduler

void read_scheduler(Reader& top, DeepSpeedConfig& cfg) {
  Reader r = top.section("scheduler", AutoPolicy::kError);
  if (!r.exists()) return;
  SchedulerConfig s;
  const std::vector<std::pair<std::string, SchedulerType>> types{
      {"LRRangeTest", SchedulerType::kLRRangeTest},
      {"OneCycle", SchedulerType::kOneCycle},
      {"WarmupLR", SchedulerType::kWarmupLR},
      {"WarmupDecayLR", SchedulerType::kWarmupDecayLR},
      {"WarmupCosineLR", SchedulerType::kWarmupCosineLR}};
  bool type_ok = false;
  if (!r.has("type")) {
    r.error("type", "missing: name the scheduler, e.g. \"type\": \"WarmupLR\"");
  } else {
    type_ok = r.choice("type", s.type, types);
  }
  Reader p = r.section("params", AutoPolicy::kError);
  r.finish();
  if (!type_ok) {
    cfg.scheduler = s;
    return;
  }
  p.accept({"last_batch_iteration"});
  if (p.has("last_batch_iteration")) {
    p.note("last_batch_iteration", "ignored: zinf restores the scheduler position from its checkpoint");
  }
  switch (s.type) {
    case SchedulerType::kLRRangeTest: {
      auto& q = s.lr_range_test;
      p.number("lr_range_test_min_lr", q.min_lr, 0.0);
      p.number("lr_range_test_step_size", q.step_size, 0.0, std::numeric_limits<double>::infinity(), true);
      p.number("lr_range_test_step_rate", q.step_rate, 0.0);
      p.boolean("lr_range_test_staircase", q.staircase);
      break;
    }
    case SchedulerType::kOneCycle: {
      auto& q = s.one_cycle;
      for (const char* required : {"cycle_min_lr", "cycle_max_lr"}) {
        if (!p.has(required)) p.error(required, "missing: OneCycle needs cycle_min_lr and cycle_max_lr");
      }
      p.number("cycle_min_lr", q.cycle_min_lr, 0.0);
      p.number("cycle_max_lr", q.cycle_max_lr, 0.0);
      p.number("decay_lr_rate", q.decay_lr_rate, 0.0);
      p.number("cycle_first_step_size", q.cycle_first_step_size, 0.0, std::numeric_limits<double>::infinity(), true);
      q.cycle_second_step_size = q.cycle_first_step_size;
      if (const Json* v = p.raw("cycle_second_step_size"); v != nullptr && !v->is_null()) {
        p.number("cycle_second_step_size", q.cycle_second_step_size, 0.0, std::numeric_limits<double>::infinity(),
                 true);
      }
      p.integer("cycle_first_stair_count", q.cycle_first_stair_count, 0);
      p.integer("cycle_second_stair_count", q.cycle_second_stair_count, 0);
      p.number("decay_step_size", q.decay_step_size, 0.0);
      p.boolean("cycle_momentum", q.cycle_momentum);
      p.number("cycle_min_mom", q.cycle_min_mom, 0.0, 1.0);
      p.number("cycle_max_mom", q.cycle_max_mom, 0.0, 1.0);
      p.number("decay_mom_rate", q.decay_mom_rate, 0.0);
      if (q.cycle_min_lr > q.cycle_max_lr) {
        p.error("cycle_min_lr", fmt::format("{} is above cycle_max_lr {}", q.cycle_min_lr, q.cycle_max_lr));
      }
      break;
    }
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR: {
      auto& q = s.warmup;
      q.warmup_max_lr = cfg.optimizer.lr;  // DeepSpeed >= 0.16: the optimizer's lr
      p.number("warmup_min_lr", q.warmup_min_lr, 0.0);
      p.number("warmup_max_lr", q.warmup_max_lr, 0.0);
      p.integer("warmup_num_steps", q.warmup_num_steps, 0);
      p.choice("warmup_type", q.warmup_type, kWarmupTypes);
      if (s.type == SchedulerType::kWarmupDecayLR) {
        if (!p.has("total_num_steps")) {
          p.error("total_num_steps", "missing: WarmupDecayLR needs total_num_steps (or \"auto\" with --total-steps)");
        }
        p.integer("total_num_steps", q.total_num_steps, 1);
        if (q.total_num_steps > 0 && q.total_num_steps < q.warmup_num_steps) {
          p.warning("total_num_steps",
                    fmt::format("{} is less than warmup_num_steps {}", q.total_num_steps, q.warmup_num_steps));
        }
      }
      if (q.warmup_min_lr > q.warmup_max_lr) {
        p.warning("warmup_min_lr", fmt::format("{} is above warmup_max_lr {}: the lr falls during warmup",
                                               q.warmup_min_lr, q.warmup_max_lr));
      }
      break;
    }
    case SchedulerType::kWarmupCosineLR: {
      auto& q = s.warmup_cosine;
      if (!p.has("total_num_steps")) {
        p.error("total_num_steps", "missing: WarmupCosineLR needs total_num_steps (or \"auto\" with --total-steps)");
      }
      p.integer("total_num_steps", q.total_num_steps, 1);
      p.number("warmup_min_ratio", q.warmup_min_ratio, 0.0, 1.0);
      p.integer("warmup_num_steps", q.warmup_num_steps, 0);
      p.number("cos_min_ratio", q.cos_min_ratio, 0.0, 1.0);
      p.choice("warmup_type", q.warmup_type, kWarmupTypes);
      if (q.total_num_steps > 0 && q.total_num_steps < q.warmup_num_steps) {
        p.warning("total_num_steps",
                  fmt::format("{} is less than warmup_num_steps {}", q.total_num_steps, q.warmup_num_steps));
      }
      break;
    }
  }
  p.finish(Severity::kError, fmt::format("for {}", to_string(s.type)));
  cfg.scheduler = s;
}

// ---------------------------------------------------------------------------------------------
// zero_optimization

void read_offload_param(Reader r, ZeroConfig& z) {
  if (!r.exists()) return;
  OffloadParamConfig c;
  r.choice("device", c.device, kDevices);
  r.string("nvme_path", c.nvme_path, /*allow_null=*/true);
  r.boolean("pin_memory", c.pin_memory);
  r.integer("buffer_count", c.buffer_count, 1);
  r.integer("buffer_size", c.buffer_size, 1);
  r.integer("max_in_cpu", c.max_in_cpu, 0);
  r.finish();
  if (c.device == OffloadDevice::kNvme && c.nvme_path.empty()) {
    r.error("nvme_path", "missing: device \"nvme\" needs the directory of the swap files (a local NVMe mount)");
  }
  z.offload_param = c;
}

void read_offload_optimizer(Reader r, ZeroConfig& z) {
  if (!r.exists()) return;
  OffloadOptimizerConfig c;
  r.choice("device", c.device, kDevices);
  r.string("nvme_path", c.nvme_path, /*allow_null=*/true);
  r.boolean("pin_memory", c.pin_memory);
  r.integer("buffer_count", c.buffer_count, 1);
  r.boolean("pipeline_read", c.pipeline_read);
  r.boolean("pipeline_write", c.pipeline_write);
  r.boolean("fast_init", c.fast_init);
  r.number("ratio", c.ratio, 0.0, 1.0);
  r.unsupported("super_offload", Severity::kWarning, "SuperOffload targets Grace-Hopper superchips", json_true);
  r.accept({"convert_grad_on_cpu", "cpuadam_cores_perc"});
  r.finish();
  if (c.device == OffloadDevice::kNvme && c.nvme_path.empty()) {
    r.error("nvme_path", "missing: device \"nvme\" needs the directory of the swap files (a local NVMe mount)");
  }
  z.offload_optimizer = c;
}

void read_zero(Reader& top, DeepSpeedConfig& cfg) {
  ZeroConfig& z = cfg.zero;
  const Json* raw = top.raw("zero_optimization");
  if (raw != nullptr && raw->is_boolean()) {
    // DeepSpeed's legacy form: true = stage 1.
    z.stage = raw->get<bool>() ? 1 : 0;
    top.warning("zero_optimization", fmt::format("the boolean form is deprecated; write {{\"stage\": {}}}", z.stage));
    return;
  }
  // Like DeepSpeed's pydantic model: unknown keys are errors, an unresolved "auto" is the default.
  Reader r = top.section("zero_optimization", AutoPolicy::kDefault);
  r.integer("stage", z.stage, 0, 3);
  z.overlap_comm = z.stage == 3;
  r.boolean("contiguous_gradients", z.contiguous_gradients);
  r.boolean("reduce_scatter", z.reduce_scatter);
  r.integer("reduce_bucket_size", z.reduce_bucket_size, 0);
  r.integer("allgather_bucket_size", z.allgather_bucket_size, 0);
  r.boolean("allgather_partitions", z.allgather_partitions);
  if (const Json* v = r.raw("overlap_comm"); v != nullptr && !v->is_null()) r.boolean("overlap_comm", z.overlap_comm);
  r.integer("sub_group_size", z.sub_group_size, 0);
  // Stage-3 keys: DeepSpeed accepts the field name and the "stage3_" name.
  r.alias("stage3_prefetch_bucket_size", "prefetch_bucket_size", false);
  r.alias("stage3_param_persistence_threshold", "param_persistence_threshold", false);
  r.alias("stage3_model_persistence_threshold", "model_persistence_threshold", false);
  r.alias("stage3_max_live_parameters", "max_live_parameters", false);
  r.alias("stage3_max_reuse_distance", "max_reuse_distance", false);
  r.alias("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save", false);
  r.alias("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save", true);
  r.integer("stage3_prefetch_bucket_size", z.prefetch_bucket_size, 0);
  r.integer("stage3_param_persistence_threshold", z.param_persistence_threshold, 0);
  r.integer("stage3_model_persistence_threshold", z.model_persistence_threshold, 0);
  r.integer("stage3_max_live_parameters", z.max_live_parameters, 0);
  r.integer("stage3_max_reuse_distance", z.max_reuse_distance, 0);
  r.boolean("stage3_gather_16bit_weights_on_model_save", z.gather_16bit_weights_on_model_save);
  r.boolean("round_robin_gradients", z.round_robin_gradients);
  r.boolean("ignore_unused_parameters", z.ignore_unused_parameters);
  r.boolean("elastic_checkpoint", z.elastic_checkpoint);
  r.boolean("load_from_fp32_weights", z.load_from_fp32_weights);

  read_offload_param(r.section("offload_param"), z);
  read_offload_optimizer(r.section("offload_optimizer"), z);

  // Deprecated booleans (DeepSpeed maps them the same way).
  bool flag = false;
  if (r.has("cpu_offload") && r.boolean("cpu_offload", flag)) {
    if (r.has("offload_optimizer")) {
      r.error("cpu_offload", "deprecated name given together with its replacement \"offload_optimizer\"; keep only "
                             "offload_optimizer");
    } else {
      r.warning("cpu_offload", "deprecated name; use \"offload_optimizer\": {\"device\": \"cpu\"}");
      if (flag) {
        z.offload_optimizer.emplace();
        z.offload_optimizer->device = OffloadDevice::kCpu;
      }
    }
  }
  if (r.has("cpu_offload_param") && r.boolean("cpu_offload_param", flag)) {
    if (r.has("offload_param")) {
      r.error("cpu_offload_param", "deprecated name given together with its replacement \"offload_param\"; keep "
                                   "only offload_param");
    } else {
      r.warning("cpu_offload_param", "deprecated name; use \"offload_param\": {\"device\": \"cpu\"}");
      if (flag) {
        z.offload_param.emplace();
        z.offload_param->device = OffloadDevice::kCpu;
      }
    }
  }
  if (r.has("cpu_offload_use_pin_memory") && r.boolean("cpu_offload_use_pin_memory", flag)) {
    r.warning("cpu_offload_use_pin_memory", "deprecated name; use \"pin_memory\" inside offload_param / "
                                            "offload_optimizer");
    if (z.offload_param) z.offload_param->pin_memory = flag;
    if (z.offload_optimizer) z.offload_optimizer->pin_memory = flag;
  }

  // DeepSpeed keys zinf does not implement. Quantisation changes the numbers: error. The rest is
  // about performance or topology: warn and go on.
  r.unsupported("zero_quantized_weights", Severity::kError, "ZeRO++ weight quantisation changes the numerics",
                json_true);
  r.unsupported("zero_quantized_nontrainable_weights", Severity::kError,
                "ZeRO++ weight quantisation changes the numerics", json_true);
  r.unsupported("zero_quantized_gradients", Severity::kError, "ZeRO++ gradient quantisation changes the numerics",
                json_true);
  r.unsupported("zeropp_loco_param", Severity::kError, "ZeRO++ LoCo changes the numerics",
                [](const Json& v) { return !v.is_null(); });
  r.unsupported("zero_hpz_partition_size", Severity::kWarning, "hierarchical partitioning (hpZ)",
                [](const Json& v) { return v.is_number() && v.get<double>() > 1; });
  r.unsupported("mics_shard_size", Severity::kWarning, "MiCS sharding",
                [](const Json& v) { return v.is_number() && v.get<double>() > 0; });
  r.unsupported("mics_hierarchical_params_gather", Severity::kWarning, "MiCS", json_true);
  r.unsupported("zenflow", Severity::kError, "ZenFlow's stale updates change the numerics",
                [](const Json& v) { return !v.is_null(); });
  r.unsupported("legacy_stage1", Severity::kWarning, "the legacy stage-1 implementation", json_true);
  r.unsupported("stage3_use_all_reduce_for_fetch_params", Severity::kWarning, "all-reduce parameter fetch", json_true);
  r.unsupported("use_all_reduce_for_fetch_params", Severity::kWarning, "all-reduce parameter fetch", json_true);
  // Performance knobs with no counterpart in zinf's statically scheduled engine.
  r.accept({"use_multi_rank_bucket_allreduce", "memory_efficient_linear", "pipeline_loading_checkpoint",
            "override_module_apply", "log_trace_cache_warnings", "enable_sanity_checks",
            "save_muon_momentum_buffer_in_memory", "leaf_module", "stage3_module_granularity_threshold",
            "module_granularity_threshold", "stage3_allgather_sequential", "allgather_sequential",
            "stage3_partition_stream_chunk_size", "partition_stream_chunk_size"});
  r.finish(Severity::kError);

  // Rules across keys.
  if (z.param_device() != OffloadDevice::kNone && z.stage != 3) {
    r.error("offload_param.device", fmt::format("\"{}\" needs stage 3: parameters are partitioned (and so "
                                                "offloadable) only in stage 3; set \"stage\": 3",
                                                to_string(z.param_device())));
  }
  if (z.optimizer_device() != OffloadDevice::kNone && z.stage == 0) {
    r.error("offload_optimizer.device", fmt::format("\"{}\" needs stage 1, 2 or 3 (optimizer state is partitioned "
                                                    "from stage 1 on); set \"stage\"",
                                                    to_string(z.optimizer_device())));
  }
  if (z.offload_optimizer && z.offload_optimizer->ratio < 1.0 && z.stage != 3) {
    r.error("offload_optimizer.ratio", "Partial offloading only supported for ZeRO Stage 3 (ratio < 1 needs "
                                       "\"stage\": 3)");
  }
  if (z.offload_optimizer && z.offload_optimizer->device != OffloadDevice::kNvme &&
      (z.offload_optimizer->pipeline_read || z.offload_optimizer->pipeline_write)) {
    r.note("offload_optimizer.pipeline_read", "pipelining applies to NVMe offload only; no effect here");
  }
  if (z.elastic_checkpoint && z.stage == 3) {
    r.warning("elastic_checkpoint", "ZeRO-3 elastic checkpointing is deprecated in DeepSpeed; zinf checkpoints "
                                    "reload on any world size anyway");
  }
}

// ---------------------------------------------------------------------------------------------
// aio, monitors, logging sections

void read_aio(Reader r, AioConfig& a) {
  r.alias("intra_op_parallelism", "thread_count", true);
  // The ranges are the io engine's (zinf::io::validate), so a config that passes here also runs.
  r.integer("block_size", a.block_size, 4096, std::int64_t{256} << 20);
  if (a.block_size % 4096 != 0) {
    r.error("block_size", fmt::format("{} is not a multiple of 4096 (O_DIRECT needs 4 KiB-aligned requests)",
                                      a.block_size));
  }
  r.integer("queue_depth", a.queue_depth, 1, 4096);
  r.integer("intra_op_parallelism", a.intra_op_parallelism, 1, 64);
  r.boolean("single_submit", a.single_submit);
  r.boolean("overlap_events", a.overlap_events);
  r.boolean("use_gds", a.use_gds);
  if (a.use_gds) r.warning("use_gds", "GPUDirect Storage is not supported; NVMe goes through pinned host memory");
  r.unsupported("io_backend", Severity::kNote, "zinf always uses io_uring");
  r.finish(Severity::kError);
}

void read_monitor(Reader r, MonitorConfig& m, bool supported) {
  r.boolean("enabled", m.enabled);
  r.string("output_path", m.output_path, true);
  r.string("job_name", m.job_name, true);
  r.string("project", m.project, true);
  r.string("group", m.group, true);
  r.string("team", m.team, true);
  r.accept({"samples_log_interval", "workspace", "api_key", "experiment_name", "experiment_key", "online", "mode"});
  r.finish(Severity::kError);
  if (m.enabled && !supported) {
    r.warning("enabled", "this monitor is not supported (ignored); every run writes training_metrics.csv and "
                         "training_curves.png");
  }
}

void read_activation_checkpointing(Reader r, ActivationCheckpointingConfig& a) {
  r.boolean("partition_activations", a.partition_activations);
  r.boolean("contiguous_memory_optimization", a.contiguous_memory_optimization);
  r.boolean("cpu_checkpointing", a.cpu_checkpointing);
  r.integer("number_checkpoints", a.number_checkpoints, 1);
  r.boolean("synchronize_checkpoint_boundary", a.synchronize_checkpoint_boundary);
  r.boolean("profile", a.profile);
  r.finish(Severity::kError);
  if (a.cpu_checkpointing) {
    r.warning("cpu_checkpointing", "not implemented (ignored): checkpointed layer inputs stay on the GPU");
  }
}

void read_flops_profiler(Reader r, FlopsProfilerConfig& f) {
  r.boolean("enabled", f.enabled);
  r.integer("profile_step", f.profile_step, 0);
  r.integer("module_depth", f.module_depth, -1);
  r.integer("top_modules", f.top_modules, 0);
  r.boolean("detailed", f.detailed);
  r.string("output_file", f.output_file, true);
  r.accept({"recompute_fwd_factor"});
  r.finish(Severity::kError);
  if (f.enabled) r.note("enabled", "zinf reports TFLOPS per step in training_metrics.csv; no separate profile");
}

void read_comms_logger(Reader r, CommsLoggerConfig& c) {
  r.boolean("enabled", c.enabled);
  r.boolean("verbose", c.verbose);
  r.boolean("prof_all", c.prof_all);
  r.boolean("debug", c.debug);
  r.string_list("prof_ops", c.prof_ops);
  r.finish(Severity::kError);
}

void read_checkpoint(Reader r, CheckpointConfig& c) {
  std::string mode;
  if (r.string("tag_validation", mode)) {
    const std::string up = [&] {
      std::string u = mode;
      for (auto& ch : u) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      return u;
    }();
    if (up == "WARN") c.tag_validation = "Warn";
    else if (up == "IGNORE") c.tag_validation = "Ignore";
    else if (up == "FAIL") c.tag_validation = "Fail";
    else r.error("tag_validation", fmt::format("\"{}\" is not one of \"Warn\", \"Ignore\" or \"Fail\"", mode));
  }
  r.boolean("load_universal", c.load_universal);
  r.boolean("use_node_local_storage", c.use_node_local_storage);
  Reader pw = r.section("parallel_write");
  pw.boolean("pipeline_stage", c.parallel_write_pipeline_stage);
  pw.finish(Severity::kError);
  r.accept({"checkpoint_serialization", "writer"});
  r.finish(Severity::kError);
}

// ---------------------------------------------------------------------------------------------
// top level

void read_top_level(Reader& top, DeepSpeedConfig& cfg) {
  read_batch(top, cfg.batch);
  top.number("gradient_clipping", cfg.gradient_clipping, 0.0);
  top.integer("steps_per_print", cfg.steps_per_print, 1);
  top.boolean("wall_clock_breakdown", cfg.wall_clock_breakdown);
  top.boolean("memory_breakdown", cfg.memory_breakdown);
  top.boolean("prescale_gradients", cfg.prescale_gradients);
  top.number("gradient_predivide_factor", cfg.gradient_predivide_factor, 0.0, std::numeric_limits<double>::infinity(),
             true);
  top.boolean("zero_allow_untested_optimizer", cfg.zero_allow_untested_optimizer);
  top.boolean("zero_force_ds_cpu_optimizer", cfg.zero_force_ds_cpu_optimizer);
  top.boolean("sparse_gradients", cfg.sparse_gradients);
  top.boolean("dump_state", cfg.dump_state);
  if (cfg.sparse_gradients) top.note("sparse_gradients", "embedding gradients are dense in zinf (same result)");

  {
    Reader dt = top.section("data_types");
    Dtype d{};
    if (const Json* v = dt.raw("grad_accum_dtype"); v != nullptr && !v->is_null() && dt.choice("grad_accum_dtype", d, kDtypes)) {
      cfg.grad_accum_dtype = d;
      if (d == Dtype::kFp16) dt.error("grad_accum_dtype", "fp16 gradient accumulation is not supported; use fp32 or bf16");
    }
    dt.accept({"param_dtype", "buffer_dtype"});
    dt.finish(Severity::kError);
  }
  if (const Json* v = top.raw("communication_data_type"); v != nullptr && !v->is_null()) {
    Dtype d{};
    if (top.choice("communication_data_type", d, kDtypes)) cfg.communication_data_type = d;
  }

  // Precision. "bfloat16" is DeepSpeed's older name for "bf16".
  top.alias("bf16", "bfloat16", false);
  read_fp16(top.section("fp16"), cfg.fp16);
  read_bf16(top.section("bf16"), cfg.bf16);
  if (cfg.fp16.enabled && cfg.bf16.enabled) {
    top.error("bf16.enabled", "bfloat16 and fp16 modes cannot be simultaneously enabled: enable one of them");
  }
  top.unsupported("amp", Severity::kError, "NVIDIA Apex AMP; use \"bf16\" or \"fp16\"", enabled_section);
  top.unsupported("torch_autocast", Severity::kError, "torch autocast; use \"bf16\" or \"fp16\"", enabled_section);

  read_optimizer(top, cfg);
  read_scheduler(top, cfg);
  read_zero(top, cfg);
  read_aio(top.section("aio"), cfg.aio);
  read_activation_checkpointing(top.section("activation_checkpointing"), cfg.activation_checkpointing);
  read_flops_profiler(top.section("flops_profiler"), cfg.flops_profiler);
  read_comms_logger(top.section("comms_logger"), cfg.comms_logger);
  read_checkpoint(top.section("checkpoint"), cfg.checkpoint);
  read_monitor(top.section("tensorboard"), cfg.tensorboard, false);
  cfg.wandb.project = "deepspeed";
  read_monitor(top.section("wandb"), cfg.wandb, false);
  read_monitor(top.section("csv_monitor"), cfg.csv_monitor, true);
  read_monitor(top.section("comet"), cfg.comet, false);
  {
    MonitorConfig trackio;
    read_monitor(top.section("trackio"), trackio, false);
  }

  // DeepSpeed features zinf does not implement. Those that change what is trained are errors.
  top.unsupported("elasticity", Severity::kError, "elastic training changes the batch size", enabled_section);
  top.unsupported("compression_training", Severity::kError, "compression changes the model",
                  [](const Json& v) { return !v.is_null() && !(v.is_object() && v.empty()); });
  top.unsupported("curriculum_learning", Severity::kError, "curriculum learning changes the data", enabled_section);
  top.unsupported("data_efficiency", Severity::kError, "data efficiency changes the data", enabled_section);
  top.unsupported("progressive_layer_drop", Severity::kError, "layer drop changes the model", enabled_section);
  top.unsupported("sparse_attention", Severity::kError, "sparse attention changes the model",
                  [](const Json& v) { return !v.is_null(); });
  top.unsupported("quantize_training", Severity::kError, "MoQ changes the numerics", enabled_section);
  top.unsupported("weight_quantization", Severity::kError, "weight quantisation changes the numerics",
                  [](const Json& v) { return !v.is_null() && !(v.is_object() && v.empty()); });
  top.unsupported("hybrid_engine", Severity::kError, "the RLHF hybrid engine", enabled_section);
  top.unsupported("sequence_parallel_size", Severity::kError, "sequence parallelism",
                  [](const Json& v) { return v.is_number() && v.get<double>() > 1; });
  top.unsupported("gradient_allreduce_op", Severity::kError, "gradients are averaged (\"mean\")",
                  [](const Json& v) { return !(v.is_string() && v.get<std::string>() == "mean"); });
  top.unsupported("managed_gradient_accumulation", Severity::kError, "zinf owns the accumulation boundary",
                  [](const Json& v) { return v.is_boolean() && !v.get<bool>(); });
  top.unsupported("tensor_parallel", Severity::kWarning, "tensor parallelism",
                  [](const Json& v) { return !v.is_null(); });
  top.unsupported("pipeline", Severity::kWarning, "pipeline parallelism", [](const Json& v) { return !v.is_null(); });
  top.unsupported("eigenvalue", Severity::kWarning, "eigenvalue computation", enabled_section);
  top.unsupported("autotuning", Severity::kWarning, "DeepSpeed's autotuner; see `zinf tune`", enabled_section);
  top.unsupported("nebula", Severity::kWarning, "Nebula checkpointing", enabled_section);
  top.unsupported("compile", Severity::kWarning, "torch.compile / DeepCompile", [](const Json& v) { return !v.is_null(); });
  top.unsupported("disable_allgather", Severity::kWarning, "disable_allgather", json_true);
  top.unsupported("datastates_ckpt", Severity::kWarning, "DataStates checkpointing", [](const Json& v) { return !v.is_null(); });
  top.unsupported("expert_parallel", Severity::kWarning, "mixture-of-experts parallelism",
                  [](const Json& v) { return !v.is_null(); });
  top.accept({"dataloader_drop_last", "seq_parallel_communication_data_type", "seq_parallel_comm_data_type", "timers",
              "graph_harvesting", "use_data_before_expert_parallelism", "use_data_before_expert_parallel_",
              "vocabulary_size", "log_level", "allgather_size"});
  // DeepSpeed ignores unknown top-level keys; zinf warns, so a misspelt key does not pass unseen.
  top.finish(Severity::kWarning);
}

}  // namespace

void resolve_batch(BatchConfig& batch, std::int64_t world_size, Diagnostics& diagnostics) {
  batch.world_size = world_size;
  batch.resolved = false;
  const auto& tb = batch.train_batch_size;
  const auto& mb = batch.micro_batch_per_gpu;
  const auto& ga = batch.gradient_accumulation_steps;
  if (world_size < 1) {
    diagnostics.error("", fmt::format("world size {} must be >= 1", world_size));
    return;
  }
  // micro x accumulation x world, or nullopt when it overflows (values no run could have).
  const auto product = [](std::int64_t a, std::int64_t b, std::int64_t c) -> std::optional<std::int64_t> {
    std::int64_t ab = 0, abc = 0;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return std::nullopt;
    return abc;
  };
  const auto overflow = [&](std::int64_t m, std::int64_t g) {
    diagnostics.error("train_micro_batch_size_per_gpu",
                      fmt::format("micro_batch_per_gpu * gradient_acc_step * world_size = {} * {} * {} overflows a "
                                  "64-bit count: these cannot be batch sizes",
                                  m, g, world_size));
  };
  std::int64_t train = 0, micro = 0, gas = 0;
  // DeepSpeed's derivation (runtime/config.py, _set_batch_related_parameters), integer division
  // included, so an uneven split surfaces in the same assertion text.
  if (tb && mb && ga) {
    train = *tb, micro = *mb, gas = *ga;
  } else if (tb && mb) {
    train = *tb, micro = *mb;
    gas = train / micro / world_size;
  } else if (tb && ga) {
    train = *tb, gas = *ga;
    micro = train / world_size / gas;
  } else if (mb && ga) {
    micro = *mb, gas = *ga;
    const auto t = product(micro, gas, world_size);
    if (!t) return overflow(micro, gas);
    train = *t;
  } else if (tb) {
    train = *tb, gas = 1;
    micro = train / world_size;
  } else if (mb) {
    micro = *mb, gas = 1;
    const auto t = product(micro, gas, world_size);
    if (!t) return overflow(micro, gas);
    train = *t;
  } else {
    diagnostics.error("train_batch_size", "Either train_batch_size or train_micro_batch_size_per_gpu needs to be "
                                          "provided (or \"auto\" with --micro-batch)");
    return;
  }
  bool ok = true;
  if (train <= 0) {
    diagnostics.error("train_batch_size", fmt::format("Train batch size: {} has to be greater than 0", train));
    ok = false;
  }
  if (micro <= 0) {
    diagnostics.error("train_micro_batch_size_per_gpu",
                      fmt::format("Micro batch size per gpu: {} has to be greater than 0", micro));
    ok = false;
  }
  if (gas <= 0) {
    diagnostics.error("gradient_accumulation_steps",
                      fmt::format("Gradient accumulation steps: {} has to be greater than 0", gas));
    ok = false;
  }
  if (ok && !product(micro, gas, world_size)) {
    overflow(micro, gas);
    return;
  }
  if (ok && train != *product(micro, gas, world_size)) {
    diagnostics.error("train_batch_size",
                      fmt::format("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * "
                                  "world_size {} != {} * {} * {}",
                                  train, micro, gas, world_size));
    ok = false;
  }
  if (!ok) return;
  batch.train = train;
  batch.micro = micro;
  batch.gas = gas;
  batch.resolved = true;
}

ParseResult parse_config(const Json& json, const ParseOptions& options) {
  ParseResult result;
  detail::ParseContext ctx{result.diagnostics, options.allow_auto, &result.config.auto_keys};
  if (!json.is_object()) {
    result.diagnostics.error("", fmt::format("the config must be an object, found {}", detail::describe(json)));
    return result;
  }
  Reader top(&json, "", ctx, AutoPolicy::kError);
  read_top_level(top, result.config);

  // The batch rule, unless a batch key is still "auto" (then it is settled at launch).
  const bool batch_auto = std::any_of(result.config.auto_keys.begin(), result.config.auto_keys.end(), [](const auto& k) {
    return k == "train_batch_size" || k == "train_micro_batch_size_per_gpu" || k == "gradient_accumulation_steps";
  });
  if (!batch_auto) resolve_batch(result.config.batch, options.world_size, result.diagnostics);
  return result;
}

}  // namespace zinf::config
