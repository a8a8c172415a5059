// The typed DeepSpeed schema: defaults, rules, and the text of every error.
#include <gtest/gtest.h>

#include <limits>

#include "test_util.hpp"

namespace zinf::config {
namespace {

using testing::J;
using testing::parse;

TEST(Defaults, MatchDeepSpeed) {
  const auto r = parse(R"({"train_micro_batch_size_per_gpu": 2})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  const DeepSpeedConfig& c = r.config;
  EXPECT_EQ(c.gradient_clipping, 1.0);  // DeepSpeed >= 0.19.3
  EXPECT_FALSE(c.steps_per_print.has_value());
  EXPECT_FALSE(c.wall_clock_breakdown);
  EXPECT_FALSE(c.prescale_gradients);
  EXPECT_EQ(c.gradient_predivide_factor, 1.0);
  EXPECT_FALSE(c.zero_allow_untested_optimizer);
  EXPECT_TRUE(c.zero_force_ds_cpu_optimizer);
  // fp16 / bf16
  EXPECT_FALSE(c.fp16.enabled);
  EXPECT_FALSE(c.fp16.auto_cast);
  EXPECT_EQ(c.fp16.loss_scale, 0.0);
  EXPECT_TRUE(c.fp16.dynamic());
  EXPECT_EQ(c.fp16.initial_scale_power, 16);
  EXPECT_EQ(c.fp16.loss_scale_window, 1000);
  EXPECT_EQ(c.fp16.hysteresis, 2);
  EXPECT_FALSE(c.fp16.consecutive_hysteresis);
  EXPECT_EQ(c.fp16.min_loss_scale, 1.0);
  EXPECT_FALSE(c.bf16.enabled);
  EXPECT_TRUE(c.bf16.check_grad_overflow);
  EXPECT_EQ(c.compute_dtype(), Dtype::kFp32);
  // no optimizer section: AdamW from the training arguments
  EXPECT_FALSE(c.optimizer.from_config);
  EXPECT_FALSE(c.scheduler.has_value());
  // zero_optimization
  const ZeroConfig& z = c.zero;
  EXPECT_EQ(z.stage, 0);
  EXPECT_TRUE(z.contiguous_gradients);
  EXPECT_TRUE(z.reduce_scatter);
  EXPECT_EQ(z.reduce_bucket_size, 500'000'000);
  EXPECT_EQ(z.allgather_bucket_size, 500'000'000);
  EXPECT_FALSE(z.overlap_comm);
  EXPECT_EQ(z.sub_group_size, 1'000'000'000);
  EXPECT_EQ(z.prefetch_bucket_size, 50'000'000);
  EXPECT_EQ(z.param_persistence_threshold, 100'000);
  EXPECT_EQ(z.model_persistence_threshold, std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(z.max_live_parameters, 1'000'000'000);
  EXPECT_EQ(z.max_reuse_distance, 1'000'000'000);
  EXPECT_FALSE(z.gather_16bit_weights_on_model_save);
  EXPECT_FALSE(z.round_robin_gradients);
  EXPECT_FALSE(z.offload_param.has_value());
  EXPECT_FALSE(z.offload_optimizer.has_value());
  // aio
  EXPECT_EQ(c.aio.block_size, 1048576);
  EXPECT_EQ(c.aio.queue_depth, 8);
  EXPECT_EQ(c.aio.intra_op_parallelism, 1);
  EXPECT_FALSE(c.aio.single_submit);
  EXPECT_TRUE(c.aio.overlap_events);
  EXPECT_FALSE(c.aio.use_gds);
  // monitors
  EXPECT_FALSE(c.tensorboard.enabled);
  EXPECT_EQ(c.tensorboard.job_name, "DeepSpeedJobName");
  EXPECT_EQ(c.wandb.project, "deepspeed");
  EXPECT_EQ(c.checkpoint.tag_validation, "Warn");
}

TEST(Defaults, OverlapCommIsTrueForStage3Only) {
  EXPECT_TRUE(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3}})").config.zero.overlap_comm);
  EXPECT_FALSE(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 2}})").config.zero.overlap_comm);
  EXPECT_FALSE(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "overlap_comm": false}})")
                   .config.zero.overlap_comm);
}

TEST(Defaults, OffloadSections) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3,
      "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  const auto& p = *r.config.zero.offload_param;
  EXPECT_EQ(p.device, OffloadDevice::kCpu);
  EXPECT_TRUE(p.pin_memory);  // DeepSpeed >= 0.19.5
  EXPECT_EQ(p.buffer_count, 5);
  EXPECT_EQ(p.buffer_size, 100'000'000);
  EXPECT_EQ(p.max_in_cpu, 1'000'000'000);
  const auto& o = *r.config.zero.offload_optimizer;
  EXPECT_EQ(o.device, OffloadDevice::kCpu);
  EXPECT_TRUE(o.pin_memory);
  EXPECT_EQ(o.buffer_count, 4);
  EXPECT_FALSE(o.pipeline_read);
  EXPECT_FALSE(o.pipeline_write);
  EXPECT_FALSE(o.fast_init);
  EXPECT_EQ(o.ratio, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Batch rule

struct BatchCase {
  const char* json;
  std::int64_t world;
  std::int64_t train, micro, gas;
};

class BatchRule : public ::testing::TestWithParam<BatchCase> {};

TEST_P(BatchRule, DerivesTheMissingKeys) {
  const auto& c = GetParam();
  const auto r = parse(c.json, c.world);
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_TRUE(r.config.batch.resolved);
  EXPECT_EQ(r.config.batch.train, c.train);
  EXPECT_EQ(r.config.batch.micro, c.micro);
  EXPECT_EQ(r.config.batch.gas, c.gas);
}

INSTANTIATE_TEST_SUITE_P(
    AllCombinations, BatchRule,
    ::testing::Values(
        BatchCase{R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4})",
                  2, 32, 4, 4},
        BatchCase{R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4})", 2, 32, 4, 4},
        BatchCase{R"({"train_batch_size": 32, "gradient_accumulation_steps": 4})", 2, 32, 4, 4},
        BatchCase{R"({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4})", 2, 32, 4, 4},
        BatchCase{R"({"train_batch_size": 32})", 4, 32, 8, 1},
        BatchCase{R"({"train_micro_batch_size_per_gpu": 4})", 3, 12, 4, 1},
        BatchCase{R"({"train_batch_size": 5e1, "train_micro_batch_size_per_gpu": 5})", 1, 50, 5, 10}));

TEST(BatchRuleErrors, InconsistentValuesUseDeepSpeedsText) {
  const auto r = parse(
      R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4})", 1);
  EXPECT_ERROR(r, "train_batch_size",
               "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 32 != 4 * 4 * 1");
}

TEST(BatchRuleErrors, UnevenSplitNamesAllFourNumbers) {
  const auto r = parse(R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 3})", 1);
  EXPECT_ERROR(r, "train_batch_size", "32 != 3 * 10 * 1");
  const auto r2 = parse(R"({"train_batch_size": 30, "gradient_accumulation_steps": 4})", 2);
  EXPECT_ERROR(r2, "train_batch_size", "30 != 3 * 4 * 2");
}

TEST(BatchRuleErrors, DerivedZeroIsReported) {
  const auto r = parse(R"({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 4})", 1);
  EXPECT_ERROR(r, "gradient_accumulation_steps", "Gradient accumulation steps: 0 has to be greater than 0");
  const auto r2 = parse(R"({"train_batch_size": 2})", 4);
  EXPECT_ERROR(r2, "train_micro_batch_size_per_gpu", "Micro batch size per gpu: 0 has to be greater than 0");
}

TEST(BatchRuleErrors, NeitherKeyIsAnError) {
  EXPECT_ERROR(parse("{}"), "train_batch_size", "Either train_batch_size or train_micro_batch_size_per_gpu");
  EXPECT_ERROR(parse(R"({"gradient_accumulation_steps": 2})"), "train_batch_size", "Either train_batch_size");
}

TEST(BatchRuleErrors, CountsMustBePositiveIntegers) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 0})"), "train_batch_size", "0 is out of range: must be >= 1");
  EXPECT_ERROR(parse(R"({"train_batch_size": -8})"), "train_batch_size", "must be >= 1");
  EXPECT_ERROR(parse(R"({"train_batch_size": 8.5})"), "train_batch_size", "expected an integer, found number 8.5");
  EXPECT_ERROR(parse(R"({"train_batch_size": "8"})"), "train_batch_size", "write numbers without quotes");
  EXPECT_ERROR(parse(R"({"train_batch_size": true})"), "train_batch_size", "expected an integer, found boolean");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1e30})"), "train_batch_size", "too large");
  EXPECT_ERROR(parse(R"({"train_batch_size": 18446744073709551615})"), "train_batch_size", "too large");
  EXPECT_ERROR(parse(R"({"train_batch_size": [8]})"), "train_batch_size", "expected an integer, found a list");
}

// ---------------------------------------------------------------------------------------------
// Precision

TEST(Precision, Fp16AndBf16TogetherIsAnError) {
  const auto r = parse(R"({"train_batch_size": 1, "fp16": {"enabled": true}, "bf16": {"enabled": true}})");
  EXPECT_ERROR(r, "bf16.enabled", "bfloat16 and fp16 modes cannot be simultaneously enabled");
}

TEST(Precision, Fp16LossScalerSettings) {
  const auto r = parse(R"({"train_batch_size": 1, "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 12,
      "loss_scale_window": 500, "hysteresis": 4, "consecutive_hysteresis": true, "min_loss_scale": 0.5, "auto_cast": true}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.compute_dtype(), Dtype::kFp16);
  EXPECT_EQ(r.config.fp16.initial_scale_power, 12);
  EXPECT_EQ(r.config.fp16.loss_scale_window, 500);
  EXPECT_EQ(r.config.fp16.hysteresis, 4);
  EXPECT_TRUE(r.config.fp16.consecutive_hysteresis);
  EXPECT_EQ(r.config.fp16.min_loss_scale, 0.5);
  EXPECT_TRUE(r.config.fp16.auto_cast);
  const auto s = parse(R"({"train_batch_size": 1, "fp16": {"enabled": true, "loss_scale": 128}})");
  EXPECT_FALSE(s.config.fp16.dynamic());
  EXPECT_EQ(s.config.fp16.loss_scale, 128.0);
}

TEST(Precision, Fp16RangeErrors) {
  const auto r = parse(R"({"train_batch_size": 1, "fp16": {"loss_scale": -1, "initial_scale_power": 70,
      "loss_scale_window": 0, "hysteresis": 0, "min_loss_scale": 0, "enabled": "yes"}})");
  EXPECT_ERROR(r, "fp16.loss_scale", "must be >= 0");
  EXPECT_ERROR(r, "fp16.initial_scale_power", "between 0 and 63");
  EXPECT_ERROR(r, "fp16.loss_scale_window", "must be >= 1");
  EXPECT_ERROR(r, "fp16.hysteresis", "between 1 and");
  EXPECT_ERROR(r, "fp16.min_loss_scale", "must be > 0");
  EXPECT_ERROR(r, "fp16.enabled", "expected true or false, found string \"yes\"");
}

TEST(Precision, Bfloat16IsTheOlderNameOfBf16) {
  const auto r = parse(R"({"train_batch_size": 1, "bfloat16": {"enabled": true}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_TRUE(r.config.bf16.enabled);
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "bfloat16": {"enabled": true}, "bf16": {"enabled": true}})"),
               "bfloat16", "give only \"bf16\"");
}

TEST(Precision, NumbersAsBooleansFollowPydantic) {
  const auto r = parse(R"({"train_batch_size": 1, "bf16": {"enabled": 1}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_TRUE(r.config.bf16.enabled);
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "bf16": {"enabled": 2}})"), "bf16.enabled", "expected true or false");
}

TEST(Precision, UnsupportedMasterWeightModes) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "fp16": {"enabled": true, "fp16_master_weights_and_grads": true}})"),
               "fp16.fp16_master_weights_and_grads", "not supported by zinf");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "bf16": {"enabled": true, "bf16_optimizer_states": true}})"),
               "bf16.bf16_optimizer_states", "not supported by zinf");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "amp": {"enabled": true, "opt_level": "O1"}})"), "amp", "Apex");
  EXPECT_TRUE(parse(R"({"train_batch_size": 1, "amp": {"enabled": false}})").ok());
}

// ---------------------------------------------------------------------------------------------
// Optimizer

TEST(Optimizer, AdamDefaultsToAdamWMode) {
  const auto r = parse(R"({"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  const auto& o = r.config.optimizer;
  EXPECT_TRUE(o.from_config);
  EXPECT_EQ(o.type, OptimizerType::kAdam);
  EXPECT_TRUE(o.adam_w_mode);
  EXPECT_TRUE(o.decoupled_weight_decay());
  EXPECT_EQ(o.lr, 1e-4);
  EXPECT_EQ(o.beta1, 0.9);
  EXPECT_EQ(o.beta2, 0.999);
  EXPECT_EQ(o.eps, 1e-8);
  EXPECT_EQ(o.weight_decay, 0.0);
  EXPECT_TRUE(o.bias_correction);
}

TEST(Optimizer, AdamWithL2) {
  const auto r = parse(R"({"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"adam_w_mode": false,
      "weight_decay": 0.01, "betas": [0.8, 0.95], "eps": 1e-6, "bias_correction": false}}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_FALSE(r.config.optimizer.decoupled_weight_decay());
  EXPECT_EQ(r.config.optimizer.beta1, 0.8);
  EXPECT_EQ(r.config.optimizer.beta2, 0.95);
  EXPECT_FALSE(r.config.optimizer.bias_correction);
}

TEST(Optimizer, TypeIsCaseInsensitive) {
  for (const char* name : {"adamw", "ADAMW", "AdamW", "aDaMw"}) {
    const auto r = parse((std::string(R"({"train_batch_size": 1, "optimizer": {"type": ")") + name + "\"}}").c_str());
    ASSERT_TRUE(r.ok()) << name << r.diagnostics.format();
    EXPECT_EQ(r.config.optimizer.type, OptimizerType::kAdamW);
  }
}

TEST(Optimizer, AdamWIgnoresAdamWModeFalseWithAWarning) {
  const auto r = parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"adam_w_mode": false}}})");
  EXPECT_WARNING(r, "optimizer.params.adam_w_mode", "AdamW always decays weights decoupled");
  EXPECT_TRUE(r.config.optimizer.adam_w_mode);
}

TEST(Optimizer, AdagradAndLionDefaults) {
  const auto a = parse(R"({"train_batch_size": 1, "optimizer": {"type": "Adagrad"}})");
  ASSERT_TRUE(a.ok()) << a.diagnostics.format();
  EXPECT_EQ(a.config.optimizer.type, OptimizerType::kAdagrad);
  EXPECT_EQ(a.config.optimizer.lr, 1e-2);
  EXPECT_EQ(a.config.optimizer.eps, 1e-10);
  const auto l = parse(R"({"train_batch_size": 1, "optimizer": {"type": "Lion", "params": {"weight_decay": 0.1}}})");
  ASSERT_TRUE(l.ok()) << l.diagnostics.format();
  EXPECT_EQ(l.config.optimizer.type, OptimizerType::kLion);
  EXPECT_EQ(l.config.optimizer.lr, 1e-4);
  EXPECT_EQ(l.config.optimizer.beta2, 0.99);
  EXPECT_TRUE(l.config.optimizer.decoupled_weight_decay());
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "Lion", "params": {"eps": 1e-8}}})"),
               "optimizer.params.eps", "unknown key");
}

TEST(Optimizer, RecognisedButRejectedTypesSayWhy) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "OneBitAdam"}})"), "optimizer.type",
               "1-bit Adam is not compatible with ZeRO");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "ZeroOneAdam"}})"), "optimizer.type",
               "not compatible with ZeRO");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "OneBitLamb"}})"), "optimizer.type",
               "not compatible with ZeRO");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "Lamb"}})"), "optimizer.type",
               "Lamb is not implemented");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "SGD"}})"), "optimizer.type", "not implemented");
}

TEST(Optimizer, UnknownTypeGetsDidYouMean) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamX"}})"), "optimizer.type",
               "did you mean \"Adam");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"params": {}}})"), "optimizer.type", "missing");
}

TEST(Optimizer, MaxGradNormIsAnError) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}})"),
               "optimizer.params.max_grad_norm", "set the top-level \"gradient_clipping\"");
}

TEST(Optimizer, ParameterErrors) {
  const auto r = parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": -0.1,
      "betas": [0.9, 1.0], "eps": "1e-8", "weight_decay": -1, "amsgrad": true, "lrr": 1}}})");
  EXPECT_ERROR(r, "optimizer.params.lr", "must be >= 0");
  EXPECT_ERROR(r, "optimizer.params.betas", "each value must be in [0, 1)");
  EXPECT_ERROR(r, "optimizer.params.eps", "write numbers without quotes");
  EXPECT_ERROR(r, "optimizer.params.weight_decay", "must be >= 0");
  EXPECT_ERROR(r, "optimizer.params.amsgrad", "not supported by zinf");
  EXPECT_ERROR(r, "optimizer.params.lrr", "did you mean \"lr\"");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}})"),
               "optimizer.params.betas", "a list of two numbers");
}

// ---------------------------------------------------------------------------------------------
// Scheduler

TEST(Scheduler, AllFiveTypesParseTheirParameters) {
  auto lr = parse(R"({"train_batch_size": 1, "scheduler": {"type": "LRRangeTest", "params": {
      "lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 100, "lr_range_test_step_rate": 2, "lr_range_test_staircase": true}}})");
  ASSERT_TRUE(lr.ok()) << lr.diagnostics.format();
  EXPECT_EQ(lr.config.scheduler->lr_range_test.min_lr, 1e-4);
  EXPECT_TRUE(lr.config.scheduler->lr_range_test.staircase);

  auto oc = parse(R"({"train_batch_size": 1, "scheduler": {"type": "OneCycle", "params": {
      "cycle_min_lr": 1e-5, "cycle_max_lr": 1e-3, "cycle_first_step_size": 100}}})");
  ASSERT_TRUE(oc.ok()) << oc.diagnostics.format();
  const auto& p = oc.config.scheduler->one_cycle;
  EXPECT_EQ(p.cycle_second_step_size, 100);  // defaults to the first
  EXPECT_EQ(p.decay_lr_rate, 0.0);
  EXPECT_TRUE(p.cycle_momentum);
  EXPECT_EQ(p.cycle_min_mom, 0.8);
  EXPECT_EQ(p.cycle_max_mom, 0.9);

  auto w = parse(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
      "scheduler": {"type": "WarmupLR"}})");
  ASSERT_TRUE(w.ok()) << w.diagnostics.format();
  EXPECT_EQ(w.config.scheduler->warmup.warmup_min_lr, 0.0);
  EXPECT_EQ(w.config.scheduler->warmup.warmup_max_lr, 3e-4);  // the optimizer's lr
  EXPECT_EQ(w.config.scheduler->warmup.warmup_num_steps, 1000);
  EXPECT_EQ(w.config.scheduler->warmup.warmup_type, WarmupType::kLog);

  auto d = parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 5000,
      "warmup_type": "linear"}}})");
  ASSERT_TRUE(d.ok()) << d.diagnostics.format();
  EXPECT_EQ(d.config.scheduler->warmup.total_num_steps, 5000);
  EXPECT_EQ(d.config.scheduler->warmup.warmup_type, WarmupType::kLinear);

  auto c = parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5000}}})");
  ASSERT_TRUE(c.ok()) << c.diagnostics.format();
  EXPECT_EQ(c.config.scheduler->warmup_cosine.warmup_min_ratio, 0.0);
  EXPECT_EQ(c.config.scheduler->warmup_cosine.cos_min_ratio, 1e-4);
  EXPECT_EQ(c.config.scheduler->warmup_cosine.warmup_num_steps, 1000);
}

TEST(Scheduler, Errors) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "Cosine"}})"), "scheduler.type",
               "is not one of");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "warmuplr"}})"), "scheduler.type",
               "did you mean \"WarmupLR\"");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupDecayLR"}})"),
               "scheduler.params.total_num_steps", "missing");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupCosineLR"}})"),
               "scheduler.params.total_num_steps", "missing");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "OneCycle", "params": {}}})"),
               "scheduler.params.cycle_max_lr", "missing");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}})"),
               "scheduler.params.warmup_type", "\"cosine\" is not one of \"log\" or \"linear\"");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}})"),
               "scheduler.params.warmup_num_step", "did you mean \"warmup_num_steps\"");
}

// ---------------------------------------------------------------------------------------------
// zero_optimization

TEST(Zero, Stage3KeysAcceptBothSpellings) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 1000,
      "stage3_max_live_parameters": 2000, "max_reuse_distance": 3000, "stage3_param_persistence_threshold": 10}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 1000);
  EXPECT_EQ(r.config.zero.max_live_parameters, 2000);
  EXPECT_EQ(r.config.zero.max_reuse_distance, 3000);
  EXPECT_EQ(r.config.zero.param_persistence_threshold, 10);
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 1,
      "stage3_prefetch_bucket_size": 2}})"),
               "zero_optimization.prefetch_bucket_size", "give only \"stage3_prefetch_bucket_size\"");
}

TEST(Zero, DeprecatedNamesMapWithAWarning) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "cpu_offload": true,
      "cpu_offload_param": true, "cpu_offload_use_pin_memory": false, "stage3_gather_fp16_weights_on_model_save": true}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_WARNING(r, "zero_optimization.cpu_offload", "deprecated");
  EXPECT_WARNING(r, "zero_optimization.cpu_offload_param", "deprecated");
  EXPECT_WARNING(r, "zero_optimization.cpu_offload_use_pin_memory", "deprecated");
  EXPECT_WARNING(r, "zero_optimization.stage3_gather_fp16_weights_on_model_save",
                 "use \"stage3_gather_16bit_weights_on_model_save\"");
  EXPECT_EQ(r.config.zero.optimizer_device(), OffloadDevice::kCpu);
  EXPECT_EQ(r.config.zero.param_device(), OffloadDevice::kCpu);
  EXPECT_FALSE(r.config.zero.offload_param->pin_memory);
  EXPECT_FALSE(r.config.zero.offload_optimizer->pin_memory);
  EXPECT_TRUE(r.config.zero.gather_16bit_weights_on_model_save);
}

TEST(Zero, DeprecatedAndNewTogetherIsAnError) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 2, "cpu_offload": true,
      "offload_optimizer": {"device": "cpu"}}})"),
               "zero_optimization.cpu_offload", "keep only offload_optimizer");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3,
      "stage3_gather_fp16_weights_on_model_save": true, "stage3_gather_16bit_weights_on_model_save": true}})"),
               "zero_optimization.stage3_gather_fp16_weights_on_model_save", "give only");
}

TEST(Zero, UnknownKeyIsAnErrorWithDidYouMean) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 1,
      "offload_param": {"device": "cpu", "pin_memroy": true}}})");
  EXPECT_ERROR(r, "zero_optimization.stage3_prefetch_bucket_sise", "did you mean \"stage3_prefetch_bucket_size\"");
  EXPECT_ERROR(r, "zero_optimization.offload_param.pin_memroy", "did you mean \"pin_memory\"");
}

TEST(Zero, RangeAndTypeErrors) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 4, "reduce_bucket_size": -1,
      "offload_optimizer": {"device": "gpu", "ratio": 1.5, "buffer_count": 0}, "sub_group_size": "1e9"}})");
  EXPECT_ERROR(r, "zero_optimization.stage", "4 is out of range: must be between 0 and 3");
  EXPECT_ERROR(r, "zero_optimization.reduce_bucket_size", "must be >= 0");
  EXPECT_ERROR(r, "zero_optimization.offload_optimizer.device", "\"gpu\" is not one of \"none\", \"cpu\" or \"nvme\"");
  EXPECT_ERROR(r, "zero_optimization.offload_optimizer.ratio", "between 0 and 1");
  EXPECT_ERROR(r, "zero_optimization.offload_optimizer.buffer_count", "must be >= 1");
  EXPECT_ERROR(r, "zero_optimization.sub_group_size", "write numbers without quotes");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": [3]})"), "zero_optimization", "expected an object");
}

TEST(Zero, OffloadRules) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})"),
               "zero_optimization.offload_param.device", "needs stage 3");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})"),
               "zero_optimization.offload_optimizer.device", "needs stage 1, 2 or 3");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 2,
      "offload_optimizer": {"device": "cpu", "ratio": 0.3}}})"),
               "zero_optimization.offload_optimizer.ratio", "Partial offloading only supported for ZeRO Stage 3");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})"),
               "zero_optimization.offload_param.nvme_path", "missing");
  const auto ok = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3,
      "offload_optimizer": {"device": "cpu", "ratio": 0.3}, "offload_param": {"device": "none"}}})");
  EXPECT_TRUE(ok.ok()) << ok.diagnostics.format();
}

TEST(Zero, UnsupportedDeepSpeedFeatures) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "zero_quantized_weights": true}})"),
               "zero_optimization.zero_quantized_weights", "changes the numerics");
  const auto w = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8,
      "memory_efficient_linear": false, "zero_quantized_weights": false}})");
  EXPECT_TRUE(w.ok()) << w.diagnostics.format();
  EXPECT_WARNING(w, "zero_optimization.zero_hpz_partition_size", "hierarchical partitioning");
}

TEST(Zero, LegacyBooleanForm) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": true})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.stage, 1);
  EXPECT_WARNING(r, "zero_optimization", "deprecated");
}

// ---------------------------------------------------------------------------------------------
// aio, monitors and the rest

TEST(Aio, ValuesAndThreadCountAlias) {
  const auto r = parse(R"({"train_batch_size": 1, "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 4,
      "single_submit": true, "overlap_events": false}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.aio.block_size, 262144);
  EXPECT_EQ(r.config.aio.queue_depth, 32);
  EXPECT_EQ(r.config.aio.intra_op_parallelism, 4);
  EXPECT_TRUE(r.config.aio.single_submit);
  EXPECT_FALSE(r.config.aio.overlap_events);
  EXPECT_WARNING(r, "aio.thread_count", "deprecated name; use \"intra_op_parallelism\"");
}

TEST(Aio, Errors) {
  const auto r = parse(R"({"train_batch_size": 1, "aio": {"block_size": 1000000, "queue_depth": 0, "queu_depth": 3}})");
  EXPECT_ERROR(r, "aio.block_size", "not a multiple of 4096");
  EXPECT_ERROR(r, "aio.queue_depth", "between 1 and");
  EXPECT_ERROR(r, "aio.queu_depth", "did you mean \"queue_depth\"");
  // The io engine's limits apply at config time, not first at run time.
  const auto big = parse(R"({"train_batch_size": 1, "aio": {"block_size": 536870912, "queue_depth": 5000,
      "intra_op_parallelism": 65}})");
  EXPECT_ERROR(big, "aio.block_size", "between 4096 and 268435456");
  EXPECT_ERROR(big, "aio.queue_depth", "between 1 and 4096");
  EXPECT_ERROR(big, "aio.intra_op_parallelism", "between 1 and 64");
}

TEST(Monitors, ParsedAndUnsupportedOnesWarn) {
  const auto r = parse(R"({"train_batch_size": 1, "tensorboard": {"enabled": true, "output_path": "tb/"},
      "csv_monitor": {"enabled": true, "output_path": "csv/", "job_name": "run1"}, "wandb": {"enabled": false, "project": "p"},
      "comms_logger": {"enabled": true, "prof_ops": ["all_reduce"]}, "flops_profiler": {"enabled": false, "profile_step": 3},
      "activation_checkpointing": {"partition_activations": true, "number_checkpoints": 4},
      "checkpoint": {"tag_validation": "fail", "parallel_write": {"pipeline_stage": true}}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_WARNING(r, "tensorboard.enabled", "not supported");
  EXPECT_TRUE(r.config.csv_monitor.enabled);
  EXPECT_EQ(r.config.csv_monitor.job_name, "run1");
  EXPECT_EQ(r.config.wandb.project, "p");
  EXPECT_EQ(r.config.comms_logger.prof_ops, std::vector<std::string>{"all_reduce"});
  EXPECT_EQ(r.config.flops_profiler.profile_step, 3);
  EXPECT_EQ(r.config.activation_checkpointing.number_checkpoints, 4);
  EXPECT_EQ(r.config.checkpoint.tag_validation, "Fail");
  EXPECT_TRUE(r.config.checkpoint.parallel_write_pipeline_stage);
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "checkpoint": {"tag_validation": "maybe"}})"),
               "checkpoint.tag_validation", "is not one of");
}

TEST(TopLevel, UnknownKeyWarnsWithDidYouMean) {
  const auto r = parse(R"({"train_batch_size": 1, "gradient_cliping": 1.0})");
  EXPECT_TRUE(r.ok());
  EXPECT_WARNING(r, "gradient_cliping", "did you mean \"gradient_clipping\"");
}

TEST(TopLevel, FeaturesThatChangeTheResultAreErrors) {
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "elasticity": {"enabled": true}})"), "elasticity", "not supported");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "sparse_attention": {"mode": "fixed"}})"), "sparse_attention",
               "not supported");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "progressive_layer_drop": {"enabled": true}})"),
               "progressive_layer_drop", "not supported");
  EXPECT_ERROR(parse(R"({"train_batch_size": 1, "sequence_parallel_size": 2})"), "sequence_parallel_size",
               "not supported");
  EXPECT_TRUE(parse(R"({"train_batch_size": 1, "elasticity": {"enabled": false}})").ok());
  EXPECT_WARNING(parse(R"({"train_batch_size": 1, "pipeline": {"stages": 2}})"), "pipeline", "not supported");
}

TEST(TopLevel, ValueErrors) {
  const auto r = parse(R"({"train_batch_size": 1, "gradient_clipping": -1, "steps_per_print": 0,
      "gradient_predivide_factor": 0, "communication_data_type": "int8", "data_types": {"grad_accum_dtype": "fp16"}})");
  EXPECT_ERROR(r, "gradient_clipping", "must be >= 0");
  EXPECT_ERROR(r, "steps_per_print", "must be >= 1");
  EXPECT_ERROR(r, "gradient_predivide_factor", "must be > 0");
  EXPECT_ERROR(r, "communication_data_type", "\"int8\" is not one of");
  EXPECT_ERROR(r, "data_types.grad_accum_dtype", "fp16 gradient accumulation is not supported");
}

TEST(TopLevel, NonFiniteNumbersFromYamlAreErrors) {
  ParseOptions o;
  const auto r = parse_config(parse_yaml("train_batch_size: 1\ngradient_clipping: .nan\nfp16:\n  loss_scale: .inf\n", "y"), o);
  EXPECT_ERROR(r, "gradient_clipping", "must be a finite number, found NaN");
  EXPECT_ERROR(r, "fp16.loss_scale", "must be a finite number, found infinity");
}

TEST(TopLevel, EveryErrorIsReportedAtOnce) {
  const auto r = parse(R"({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
      "gradient_clipping": "1.0", "fp16": {"enabled": true, "loss_scale_windw": 100}, "bf16": {"enabled": true},
      "optimizer": {"type": "AdamW", "params": {"lr": -1}},
      "zero_optimization": {"stage": 4, "offload_param": {"device": "gpu"}}})");
  EXPECT_GE(r.diagnostics.count(Severity::kError), 7u) << r.diagnostics.format();
  EXPECT_ERROR(r, "gradient_clipping", "write numbers without quotes");
  EXPECT_ERROR(r, "fp16.loss_scale_windw", "did you mean \"loss_scale_window\"");
  EXPECT_ERROR(r, "bf16.enabled", "simultaneously");
  EXPECT_ERROR(r, "optimizer.params.lr", "must be >= 0");
  EXPECT_ERROR(r, "zero_optimization.stage", "out of range");
  EXPECT_ERROR(r, "zero_optimization.offload_param.device", "\"gpu\"");
  EXPECT_ERROR(r, "train_batch_size", "32 != 4 * 4 * 1");
}

// ---------------------------------------------------------------------------------------------
// "auto"

TEST(Auto, UnresolvedOutsideZeroIsAnError) {
  const auto r = parse(R"({"train_batch_size": 1, "gradient_clipping": "auto", "optimizer": {"type": "AdamW",
      "params": {"lr": "auto"}}})");
  EXPECT_ERROR(r, "gradient_clipping", "\"auto\" was not resolved");
  EXPECT_ERROR(r, "optimizer.params.lr", "\"auto\" was not resolved");
}

TEST(Auto, UnresolvedInsideZeroFallsBackToTheDefault) {
  const auto r = parse(R"({"train_batch_size": 1, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
      "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}})");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.reduce_bucket_size, 500'000'000);
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 50'000'000);
  EXPECT_EQ(r.config.zero.param_persistence_threshold, 100'000);
  EXPECT_NOTE(r, "zero_optimization.reduce_bucket_size", "the default applies");
}

TEST(Auto, AllowedAutoIsRecordedAndSkipsTheBatchRule) {
  ParseOptions o;
  o.allow_auto = true;
  const auto r = parse_config(J(R"({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
      "bf16": {"enabled": "auto"}})"),
                              o);
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.auto_keys,
            (std::vector<std::string>{"train_batch_size", "train_micro_batch_size_per_gpu", "bf16.enabled"}));
  EXPECT_FALSE(r.config.batch.resolved);
}

TEST(ToJson, RoundTripsThroughTheParser) {
  const auto r = parse(R"({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": true},
      "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
      "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}},
      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
      "offload_param": {"device": "cpu"}}})",
                       2);
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  const Json full = to_json(r.config);
  const auto again = parse_config(full, ParseOptions{.world_size = 2, .allow_auto = false});
  ASSERT_TRUE(again.ok()) << again.diagnostics.format();
  EXPECT_EQ(to_json(again.config), full);
  EXPECT_EQ(full["train_batch_size"], 16);
  EXPECT_EQ(full["gradient_accumulation_steps"], 4);
}

}  // namespace
}  // namespace zinf::config
