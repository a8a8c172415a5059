// The five DeepSpeed schedules at chosen iterations, against values computed by hand from
// deepspeed/runtime/lr_schedules.py (shown next to each).
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "zinf/runtime/lr_schedule.hpp"

namespace zinf::runtime {
namespace {

using config::SchedulerConfig;
using config::SchedulerType;
using config::WarmupType;

constexpr double kTol = 1e-15;

LrSchedule make(SchedulerConfig s, double base_lr = 1e-3) { return LrSchedule(s, base_lr); }

TEST(LrSchedule, NoSchedulerIsConstant) {
  LrSchedule s(std::nullopt, 3e-4);
  EXPECT_EQ(s.initial_lr(), 3e-4);
  EXPECT_EQ(s.lr_at(0), 3e-4);
  EXPECT_EQ(s.lr_at(123456), 3e-4);
  EXPECT_FALSE(s.beta1_at(5).has_value());
}

TEST(LrSchedule, LRRangeTest) {
  SchedulerConfig c;
  c.type = SchedulerType::kLRRangeTest;
  c.lr_range_test = {.min_lr = 1e-3, .step_size = 10, .step_rate = 2.0, .staircase = false};
  auto s = make(c);
  EXPECT_EQ(s.initial_lr(), 1e-3);
  EXPECT_NEAR(s.lr_at(4), 2e-3, kTol);     // interval 5/10 = 0.5: 1e-3 * (1 + 2 * 0.5)
  EXPECT_NEAR(s.lr_at(0), 1.2e-3, kTol);   // interval 0.1
  EXPECT_NEAR(s.lr_at(19), 5e-3, kTol);    // interval 2
  c.lr_range_test.staircase = true;
  auto st = make(c);
  EXPECT_NEAR(st.lr_at(4), 1e-3, kTol);    // floor(0.5) = 0
  EXPECT_NEAR(st.lr_at(9), 3e-3, kTol);    // floor(1) = 1
  EXPECT_NEAR(st.lr_at(18), 3e-3, kTol);   // floor(1.9) = 1
}

TEST(LrSchedule, WarmupLRLogAndLinear) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupLR;
  c.warmup = {.warmup_min_lr = 0.0, .warmup_max_lr = 1e-3, .warmup_num_steps = 10, .warmup_type = WarmupType::kLog};
  auto s = make(c);
  EXPECT_EQ(s.initial_lr(), 0.0);
  EXPECT_NEAR(s.lr_at(0), 0.0, kTol);                          // log(1) / log(10)
  EXPECT_NEAR(s.lr_at(4), 1e-3 * 0.69897000433601886, 1e-15);  // log(5) / log(10)
  EXPECT_NEAR(s.lr_at(9), 1e-3, kTol);                         // log(10) / log(10)
  EXPECT_NEAR(s.lr_at(10), 1e-3, kTol);
  EXPECT_NEAR(s.lr_at(100000), 1e-3, kTol);
  c.warmup.warmup_type = WarmupType::kLinear;
  c.warmup.warmup_min_lr = 1e-4;
  auto l = make(c);
  EXPECT_EQ(l.initial_lr(), 1e-4);
  EXPECT_NEAR(l.lr_at(4), 1e-4 + 9e-4 * 0.4, kTol);  // 4 / 10
  EXPECT_NEAR(l.lr_at(10), 1e-3, kTol);
}

TEST(LrSchedule, WarmupLRUsesAtLeastTwoSteps) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupLR;
  c.warmup = {.warmup_min_lr = 0.0, .warmup_max_lr = 1.0, .warmup_num_steps = 0, .warmup_type = WarmupType::kLinear};
  auto s = make(c);
  EXPECT_NEAR(s.lr_at(0), 0.0, kTol);
  EXPECT_NEAR(s.lr_at(1), 0.5, kTol);  // 1 / max(2, 0)
  EXPECT_NEAR(s.lr_at(2), 1.0, kTol);
}

TEST(LrSchedule, WarmupDecayLR) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupDecayLR;
  c.warmup = {.warmup_min_lr = 0.0, .warmup_max_lr = 1e-3, .warmup_num_steps = 10,
              .warmup_type = WarmupType::kLinear, .total_num_steps = 110};
  auto s = make(c);
  EXPECT_NEAR(s.lr_at(5), 5e-4, kTol);   // warmup 5/10
  EXPECT_NEAR(s.lr_at(10), 1e-3, kTol);  // (110 - 10) / (110 - 10)
  EXPECT_NEAR(s.lr_at(60), 5e-4, kTol);  // (110 - 60) / 100
  EXPECT_NEAR(s.lr_at(109), 1e-5, 1e-18);
  EXPECT_NEAR(s.lr_at(110), 0.0, kTol);
  EXPECT_NEAR(s.lr_at(500), 0.0, kTol);  // max(0, ...)
}

TEST(LrSchedule, WarmupCosineLR) {
  SchedulerConfig c;
  c.type = SchedulerType::kWarmupCosineLR;
  c.warmup_cosine = {.total_num_steps = 110, .warmup_min_ratio = 0.1, .warmup_num_steps = 10, .cos_min_ratio = 0.1,
                     .warmup_type = WarmupType::kLinear};
  auto s = make(c, 1e-3);
  EXPECT_EQ(s.initial_lr(), 0.0);
  EXPECT_NEAR(s.lr_at(0), 1e-4, kTol);           // ratio 0.1 + 0 * 0.9
  EXPECT_NEAR(s.lr_at(5), 5.5e-4, kTol);         // 0.1 + 0.5 * 0.9
  const double at10 = 0.1 + 0.9 * (1.0 + std::cos(std::numbers::pi * 0.01)) / 2.0;  // progress 1/100
  EXPECT_NEAR(s.lr_at(10), 1e-3 * at10, kTol);
  EXPECT_NEAR(s.lr_at(59), 5.5e-4, 1e-15);       // progress 0.5: 0.1 + 0.9 * 0.5
  EXPECT_NEAR(s.lr_at(109), 1e-4, kTol);         // progress 1: cos_min_ratio
  EXPECT_NEAR(s.lr_at(1000), 1e-4, kTol);        // clamped at the end
}

TEST(LrSchedule, OneCycleLrAndMomentum) {
  SchedulerConfig c;
  c.type = SchedulerType::kOneCycle;
  auto& p = c.one_cycle;
  p.cycle_min_lr = 1e-4;
  p.cycle_max_lr = 1e-3;
  p.cycle_first_step_size = 10;
  p.cycle_second_step_size = 10;
  p.decay_lr_rate = 0.5;
  p.decay_step_size = 10;
  p.cycle_momentum = true;
  p.cycle_min_mom = 0.8;
  p.cycle_max_mom = 0.9;
  auto s = make(c);
  EXPECT_EQ(s.initial_lr(), 1e-4);
  EXPECT_EQ(*s.initial_beta1(), 0.8);
  EXPECT_NEAR(s.lr_at(4), 5.5e-4, kTol);   // x = 0.25, scale 0.5
  EXPECT_NEAR(s.lr_at(9), 1e-3, kTol);     // x = 0.5, scale 1
  EXPECT_NEAR(s.lr_at(14), 5.5e-4, kTol);  // x = 0.75, scale (0.75 - 1) / (0.5 - 1)
  EXPECT_NEAR(s.lr_at(19), 1e-4, kTol);    // end of the cycle
  EXPECT_NEAR(s.lr_at(20), 1e-4 / 1.05, kTol);  // decay: 1e-4 / (1 + 0.5 * 1/10)
  EXPECT_NEAR(s.lr_at(29), 1e-4 / 1.5, kTol);   // 1e-4 / (1 + 0.5 * 10/10)
  EXPECT_NEAR(*s.beta1_at(4), 0.85, kTol);      // 0.9 - 0.1 * 0.5
  EXPECT_NEAR(*s.beta1_at(9), 0.8, kTol);
  EXPECT_NEAR(*s.beta1_at(25), 0.9, kTol);      // decay_mom_rate 0: max momentum
}

TEST(LrSchedule, OneCycleWithoutDecayStaysAtMin) {
  SchedulerConfig c;
  c.type = SchedulerType::kOneCycle;
  c.one_cycle.cycle_min_lr = 1e-4;
  c.one_cycle.cycle_max_lr = 1e-3;
  c.one_cycle.cycle_first_step_size = 5;
  c.one_cycle.cycle_second_step_size = 15;  // asymmetric: step ratio 0.25
  c.one_cycle.cycle_momentum = false;
  auto s = make(c);
  EXPECT_NEAR(s.lr_at(4), 1e-3, kTol);              // x = 5/20 = 0.25 = step ratio
  EXPECT_NEAR(s.lr_at(9), 1e-4 + 9e-4 * (0.5 - 1) / (0.25 - 1), kTol);
  EXPECT_NEAR(s.lr_at(50), 1e-4, kTol);             // decay_step_size 0: cycle_min_lr
  EXPECT_FALSE(s.beta1_at(3).has_value());
}

TEST(LrSchedule, OneCycleStairs) {
  SchedulerConfig c;
  c.type = SchedulerType::kOneCycle;
  c.one_cycle.cycle_min_lr = 1e-4;
  c.one_cycle.cycle_max_lr = 1e-3;
  c.one_cycle.cycle_first_step_size = 10;
  c.one_cycle.cycle_second_step_size = 10;
  c.one_cycle.cycle_first_stair_count = 2;
  auto s = make(c);
  EXPECT_NEAR(s.lr_at(2), 1e-4, kTol);     // position 3 * 2 / 10 = 0.6 -> stair 0
  EXPECT_NEAR(s.lr_at(4), 5.5e-4, kTol);   // position 1 -> stair 1 of 2
  EXPECT_NEAR(s.lr_at(9), 1e-3, kTol);     // position 2 -> the peak
  EXPECT_NEAR(s.lr_at(14), 5.5e-4, kTol);  // second half: (20 - 15) * 2 / 10 = 1
  EXPECT_NEAR(s.lr_at(12), 5.5e-4, kTol);  // (20 - 13) * 2 / 10 = 1.4 -> 1
}

}  // namespace
}  // namespace zinf::runtime
