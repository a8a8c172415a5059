// Configs people use (tests/data/real_world): each passes validation and means what it says.
#include <gtest/gtest.h>

#include <filesystem>

#include "test_util.hpp"
#include "zinf/configs/resolve.hpp"

namespace zinf::config {
namespace {

const std::string kDir = testing::data_dir() + "/real_world";

ParseResult check(const std::string& file, const TrainingArgs& args = {}, std::int64_t world = 1) {
  const auto doc = load_document(kDir + "/" + file);
  TrainingArgs a = args;
  a.world_size = world;
  const auto res = resolve_auto(doc.json, a);
  EXPECT_TRUE(res.mismatches.empty()) << res.mismatch_report();
  EXPECT_TRUE(res.unresolved.empty());
  return parse_config(res.resolved, ParseOptions{.world_size = world});
}

TEST(RealWorld, EveryFileInTheFolderPasses) {
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(kDir)) {
    const auto r = check(entry.path().filename().string());
    EXPECT_TRUE(r.ok()) << entry.path() << "\n" << r.diagnostics.format();
    ++count;
  }
  EXPECT_GE(count, 5);
}

TEST(RealWorld, HuggingFaceZero2) {
  TrainingArgs a;
  a.micro_batch = 4;
  a.grad_accum = 2;
  a.fp16 = true;
  a.lr = 2e-5;
  const auto r = check("hf_ds_config_zero2.json", a, 2);
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.stage, 2);
  EXPECT_EQ(r.config.zero.optimizer_device(), OffloadDevice::kCpu);
  EXPECT_EQ(r.config.zero.allgather_bucket_size, 200'000'000);
  EXPECT_EQ(r.config.batch.train, 16);
  EXPECT_TRUE(r.config.fp16.enabled);
  EXPECT_FALSE(r.config.bf16.enabled);
  EXPECT_EQ(r.config.optimizer.lr, 2e-5);
  EXPECT_EQ(r.config.scheduler->warmup.warmup_max_lr, 2e-5);
  EXPECT_EQ(r.config.steps_per_print, 2000);
}

TEST(RealWorld, HuggingFaceZero3WithItsDeprecatedKey) {
  TrainingArgs a;
  a.hidden_size = 4096;
  const auto r = check("hf_ds_config_zero3.json", a);
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.stage, 3);
  EXPECT_EQ(r.config.zero.sub_group_size, 100'000'000'000'000);  // 1e14
  EXPECT_EQ(r.config.zero.reduce_bucket_size, 4096 * 4096);
  EXPECT_EQ(r.config.zero.param_persistence_threshold, 40960);
  EXPECT_TRUE(r.config.zero.gather_16bit_weights_on_model_save);
  EXPECT_WARNING(r, "zero_optimization.stage3_gather_fp16_weights_on_model_save", "deprecated");
}

TEST(RealWorld, Zero2CpuOffloadFp16WarmupLR) {
  const auto r = check("zero2_cpu_offload_fp16_warmuplr.json");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.optimizer_device(), OffloadDevice::kCpu);  // from cpu_offload: true
  EXPECT_EQ(r.config.fp16.initial_scale_power, 12);
  EXPECT_EQ(r.config.optimizer.type, OptimizerType::kAdam);
  EXPECT_EQ(r.config.scheduler->type, SchedulerType::kWarmupLR);
  EXPECT_EQ(r.config.batch.gas, 16);
}

TEST(RealWorld, Zero3NvmeWithAio) {
  const auto r = check("zero3_nvme_aio.json");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.zero.param_device(), OffloadDevice::kNvme);
  EXPECT_EQ(r.config.zero.offload_param->nvme_path, "/local_nvme");
  EXPECT_TRUE(r.config.zero.offload_optimizer->pipeline_read);
  EXPECT_EQ(r.config.aio.queue_depth, 16);
  EXPECT_EQ(r.config.aio.intra_op_parallelism, 2);  // from thread_count
  EXPECT_EQ(r.config.scheduler->type, SchedulerType::kWarmupCosineLR);
  EXPECT_EQ(r.config.batch.train, 8);
}

TEST(RealWorld, YamlZero3OneCycle) {
  const auto r = check("zero3_cpuoffload_onecycle.yaml");
  ASSERT_TRUE(r.ok()) << r.diagnostics.format();
  EXPECT_EQ(r.config.optimizer.type, OptimizerType::kAdamW);
  EXPECT_EQ(r.config.optimizer.lr, 2e-4);
  EXPECT_EQ(r.config.zero.offload_optimizer->ratio, 0.5);
  EXPECT_EQ(r.config.zero.max_live_parameters, 300'000'000);
  EXPECT_EQ(r.config.batch.gas, 16);
}

}  // namespace
}  // namespace zinf::config
