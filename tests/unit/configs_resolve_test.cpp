// "auto" resolution from training arguments (the Hugging Face Trainer's table) and mismatches.
#include <gtest/gtest.h>

#include "test_util.hpp"
#include "zinf/configs/presets.hpp"
#include "zinf/configs/resolve.hpp"

namespace zinf::config {
namespace {

using testing::J;

const char* kAllAuto = R"({
  "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                "warmup_num_steps": "auto", "total_num_steps": "auto"}},
  "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                        "stage3_param_persistence_threshold": "auto"}
})";

TEST(Resolve, EveryKeyFromItsArgument) {
  TrainingArgs a;
  a.micro_batch = 4;
  a.grad_accum = 8;
  a.world_size = 2;
  a.lr = 3e-4;
  a.beta1 = 0.9;
  a.beta2 = 0.95;
  a.eps = 1e-6;
  a.weight_decay = 0.1;
  a.max_grad_norm = 0.5;
  a.warmup_steps = 100;
  a.total_steps = 1000;
  a.bf16 = true;
  a.hidden_size = 1024;
  const auto r = resolve_auto(J(kAllAuto), a);
  EXPECT_TRUE(r.mismatches.empty());
  EXPECT_TRUE(r.unresolved.empty());
  const Json& j = r.resolved;
  EXPECT_EQ(j["train_micro_batch_size_per_gpu"], 4);
  EXPECT_EQ(j["gradient_accumulation_steps"], 8);
  EXPECT_EQ(j["train_batch_size"], 64);  // 2 * 4 * 8
  EXPECT_EQ(j["gradient_clipping"], 0.5);
  EXPECT_EQ(j["fp16"]["enabled"], false);
  EXPECT_EQ(j["bf16"]["enabled"], true);
  EXPECT_EQ(j["optimizer"]["params"]["lr"], 3e-4);
  EXPECT_EQ(j["optimizer"]["params"]["betas"], J(R"({"b": [0.9, 0.95]})")["b"]);
  EXPECT_EQ(j["optimizer"]["params"]["eps"], 1e-6);
  EXPECT_EQ(j["optimizer"]["params"]["weight_decay"], 0.1);
  EXPECT_EQ(j["scheduler"]["params"]["warmup_min_lr"], 0);
  EXPECT_EQ(j["scheduler"]["params"]["warmup_max_lr"], 3e-4);
  EXPECT_EQ(j["scheduler"]["params"]["warmup_num_steps"], 100);
  EXPECT_EQ(j["scheduler"]["params"]["total_num_steps"], 1000);
  EXPECT_EQ(j["zero_optimization"]["reduce_bucket_size"], 1024 * 1024);
  EXPECT_EQ(j["zero_optimization"]["stage3_prefetch_bucket_size"], 943718);  // int(0.9 * 1024^2)
  EXPECT_EQ(j["zero_optimization"]["stage3_param_persistence_threshold"], 10240);
  // The resolved config is valid.
  const auto parsed = parse_config(j, ParseOptions{.world_size = 2});
  EXPECT_TRUE(parsed.ok()) << parsed.diagnostics.format();
  EXPECT_EQ(parsed.config.batch.train, 64);
}

TEST(Resolve, MissingArgumentsTakeTheTrainerDefaults) {
  TrainingArgs a;
  a.total_steps = 50;
  const auto r = resolve_auto(J(kAllAuto), a);
  ASSERT_TRUE(r.unresolved.empty());
  const Json& j = r.resolved;
  EXPECT_EQ(j["train_micro_batch_size_per_gpu"], 8);
  EXPECT_EQ(j["gradient_accumulation_steps"], 1);
  EXPECT_EQ(j["train_batch_size"], 8);
  EXPECT_EQ(j["gradient_clipping"], 1.0);
  EXPECT_EQ(j["optimizer"]["params"]["lr"], 5e-5);
  EXPECT_EQ(j["optimizer"]["params"]["eps"], 1e-8);
  EXPECT_EQ(j["optimizer"]["params"]["weight_decay"], 0.0);
  EXPECT_EQ(j["scheduler"]["params"]["warmup_num_steps"], 0);
  EXPECT_EQ(j["fp16"]["enabled"], false);
  EXPECT_EQ(j["bf16"]["enabled"], false);
  // Without a hidden size the ZeRO sizes are DeepSpeed's defaults.
  EXPECT_EQ(j["zero_optimization"]["reduce_bucket_size"], 500000000);
  EXPECT_EQ(j["zero_optimization"]["stage3_prefetch_bucket_size"], 50000000);
  EXPECT_EQ(j["zero_optimization"]["stage3_param_persistence_threshold"], 100000);
  EXPECT_FALSE(r.defaulted.empty());
}

TEST(Resolve, TotalStepsHasNoDefault) {
  const auto r = resolve_auto(J(kAllAuto), TrainingArgs{});
  ASSERT_EQ(r.unresolved.size(), 1u);
  EXPECT_EQ(r.unresolved[0], "scheduler.params.total_num_steps: pass --total-steps");
}

TEST(Resolve, WithoutDefaultsOnlyGivenArgumentsFill) {
  TrainingArgs a;
  a.lr = 1e-3;
  const auto r = resolve_auto(J(kAllAuto), a, /*use_defaults=*/false);
  EXPECT_EQ(r.resolved["optimizer"]["params"]["lr"], 1e-3);
  EXPECT_EQ(r.resolved["optimizer"]["params"]["eps"], "auto");
  EXPECT_EQ(r.resolved["train_batch_size"], "auto");
}

TEST(Resolve, MismatchesAreReportedTogetherInTheTrainersFormat) {
  TrainingArgs a;
  a.micro_batch = 4;
  a.grad_accum = 2;
  a.lr = 3e-4;
  a.beta2 = 0.95;
  a.max_grad_norm = 0.5;
  a.warmup_steps = 10;
  a.fp16 = true;
  const auto r = resolve_auto(J(R"({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
      "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "fp16": {"enabled": false},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}},
      "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4, "warmup_num_steps": 20}}})"),
                              a);
  ASSERT_TRUE(r.has_mismatches());
  const std::vector<std::string> expected{
      "- ds train_micro_batch_size_per_gpu=2 vs arg --micro-batch=4",
      "- ds train_batch_size=16 vs arg --world-size*--micro-batch*--grad-accum=8",
      "- ds gradient_clipping=1 vs arg --max-grad-norm=0.5",
      "- ds optimizer.params.lr=0.001 vs arg --lr=0.0003",
      "- ds optimizer.params.betas=[0.9,0.999] vs arg --beta1/--beta2=[0.9,0.95]",
      "- ds scheduler.params.warmup_num_steps=20 vs arg --warmup-steps=10",
      "- ds fp16.enabled=false vs arg --fp16=true",
  };
  EXPECT_EQ(r.mismatches, expected);
  EXPECT_EQ(r.mismatch_paths, (std::vector<std::string>{"train_micro_batch_size_per_gpu", "train_batch_size",
                                                         "gradient_clipping", "optimizer.params.lr",
                                                         "optimizer.params.betas", "scheduler.params.warmup_num_steps",
                                                         "fp16.enabled"}));
  const std::string report = r.mismatch_report();
  EXPECT_NE(report.find("mismatch the training arguments"), std::string::npos);
  EXPECT_NE(report.find("set these DeepSpeed config values to \"auto\""), std::string::npos);
}

TEST(Resolve, MatchingExplicitValuesAreFine) {
  TrainingArgs a;
  a.micro_batch = 2;
  a.lr = 1e-3;
  a.bf16 = true;
  const auto r = resolve_auto(J(R"({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": true},
      "optimizer": {"type": "AdamW", "params": {"lr": 0.001}}})"),
                              a);
  EXPECT_TRUE(r.mismatches.empty());
  EXPECT_TRUE(r.mismatch_report().empty());
}

TEST(Resolve, NotGivenFlagsNeverMismatch) {
  // bf16 enabled in the config without --bf16: the config decides.
  const auto r = resolve_auto(J(R"({"train_batch_size": 8, "bf16": {"enabled": true}})"), TrainingArgs{});
  EXPECT_TRUE(r.mismatches.empty());
}

TEST(Resolve, TrainBatchComesFromTheConfigsOwnCounts) {
  TrainingArgs a;
  a.world_size = 4;
  const auto r = resolve_auto(J(R"({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
      "gradient_accumulation_steps": 3})"),
                              a);
  EXPECT_EQ(r.resolved["train_batch_size"], 24);
}

TEST(Resolve, EveryPresetResolvesToAValidConfig) {
  TrainingArgs a;
  a.micro_batch = 2;
  a.bf16 = true;
  a.hidden_size = 512;
  for (const auto& p : presets()) {
    const auto r = resolve_auto(parse_json(p.json_text, std::string(p.name)), a);
    EXPECT_TRUE(r.unresolved.empty()) << p.name;
    EXPECT_TRUE(r.mismatches.empty()) << p.name;
    const auto parsed = parse_config(r.resolved);
    EXPECT_TRUE(parsed.ok()) << p.name << "\n" << parsed.diagnostics.format();
    EXPECT_TRUE(parsed.config.bf16.enabled) << p.name;
    EXPECT_EQ(parsed.config.batch.train, 2) << p.name;
  }
}

}  // namespace
}  // namespace zinf::config
