// The built-in presets: names, JSON/YAML twins, and what each one places where.
#include <gtest/gtest.h>

#include "test_util.hpp"
#include "zinf/configs/presets.hpp"
#include "zinf/configs/summary.hpp"

namespace zinf::config {
namespace {

ParseResult parse_preset(const Preset& p) {
  ParseOptions o;
  o.allow_auto = true;
  return parse_config(parse_json(p.json_text, std::string(p.name)), o);
}

TEST(Presets, TheCommonDeepSpeedSetAndZinfsMachinePresetsAreThere) {
  const std::vector<std::string> expected{"deepspeed_zero0",         "deepspeed_zero1",
                                          "deepspeed_zero2",         "deepspeed_zero2_offload",
                                          "deepspeed_zero3",         "deepspeed_zero3_cpuoffload",
                                          "deepspeed_zero3_nvme",    "zinf_gpu141g_cpuoffload",
                                          "zinf_gpu141g_nvme",       "zinf_gpu24g_cpuoffload",
                                          "zinf_gpu24g_nvme",        "zinf_gpu80g_cpuoffload",
                                          "zinf_gpu80g_nvme"};
  EXPECT_EQ(preset_names(), expected);
  for (const auto& p : presets()) EXPECT_FALSE(p.description.empty()) << p.name;
}

TEST(Summary, HumanCounts) {
  EXPECT_EQ(human_count(500'000'000), "500M");
  EXPECT_EQ(human_count(1'500'000'000), "1.5G");
  EXPECT_EQ(human_count(100'000), "100K");
  EXPECT_EQ(human_count(530'841), "530,841");
  EXPECT_EQ(human_count(7'680), "7.68K");
  EXPECT_EQ(human_count(7'681), "7,681");
  EXPECT_EQ(human_count(999), "999");
  EXPECT_EQ(human_count(1'234'567), "1,234,567");
}

TEST(Presets, JsonAndYamlTwinsAreIdentical) {
  for (const auto& p : presets()) {
    EXPECT_EQ(parse_json(p.json_text, "json"), parse_yaml(p.yaml_text, "yaml")) << p.name;
  }
}

TEST(Presets, EachParsesCleanlyWithAutoLeftForTheArguments) {
  for (const auto& p : presets()) {
    const auto r = parse_preset(p);
    EXPECT_TRUE(r.ok()) << p.name << "\n" << r.diagnostics.format();
    EXPECT_EQ(r.diagnostics.count(Severity::kWarning), 0u) << p.name << "\n" << r.diagnostics.format();
    for (const char* key : {"train_micro_batch_size_per_gpu", "optimizer.params.lr", "bf16.enabled"}) {
      EXPECT_NE(std::find(r.config.auto_keys.begin(), r.config.auto_keys.end(), key), r.config.auto_keys.end())
          << p.name << " " << key;
    }
  }
}

TEST(Presets, StageAndPlacement) {
  struct Expect {
    const char* name;
    int stage;
    OffloadDevice param;
    OffloadDevice optimizer;
  };
  for (const Expect& e : {Expect{"deepspeed_zero0", 0, OffloadDevice::kNone, OffloadDevice::kNone},
                          Expect{"deepspeed_zero1", 1, OffloadDevice::kNone, OffloadDevice::kNone},
                          Expect{"deepspeed_zero2", 2, OffloadDevice::kNone, OffloadDevice::kNone},
                          Expect{"deepspeed_zero2_offload", 2, OffloadDevice::kNone, OffloadDevice::kCpu},
                          Expect{"deepspeed_zero3", 3, OffloadDevice::kNone, OffloadDevice::kNone},
                          Expect{"deepspeed_zero3_cpuoffload", 3, OffloadDevice::kCpu, OffloadDevice::kCpu},
                          Expect{"deepspeed_zero3_nvme", 3, OffloadDevice::kNvme, OffloadDevice::kNvme}}) {
    const auto r = parse_preset(*find_preset(e.name));
    EXPECT_EQ(r.config.zero.stage, e.stage) << e.name;
    EXPECT_EQ(r.config.zero.param_device(), e.param) << e.name;
    EXPECT_EQ(r.config.zero.optimizer_device(), e.optimizer) << e.name;
    if (e.param == OffloadDevice::kCpu) {
      EXPECT_TRUE(r.config.zero.offload_param->pin_memory) << e.name;
    }
  }
  EXPECT_FALSE(find_preset("deepspeed_zero4").has_value());
}

}  // namespace
}  // namespace zinf::config
