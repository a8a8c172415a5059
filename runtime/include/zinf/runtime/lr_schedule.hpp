#pragma once
// Learning-rate (and OneCycle momentum) schedules with DeepSpeed's exact formulas
// (deepspeed/runtime/lr_schedules.py). `iteration` is DeepSpeed's `last_batch_iteration`: the
// number of scheduler steps taken minus one. DeepSpeed steps the scheduler after each optimizer
// step, so optimizer step s (0-based) runs with lr_at(s - 1), and step 0 with initial_lr().

#include <cstdint>
#include <optional>

#include "zinf/configs/deepspeed_config.hpp"

namespace zinf::runtime {

class LrSchedule {
 public:
  // `scheduler` absent = constant `base_lr`. `base_lr` is the optimizer's lr (WarmupCosineLR scales
  // it; WarmupLR uses it when warmup_max_lr is not given, already folded in by the config parser).
  LrSchedule(const std::optional<config::SchedulerConfig>& scheduler, double base_lr);

  // lr with last_batch_iteration = iteration (>= 0).
  double lr_at(std::int64_t iteration) const;
  // lr set when the scheduler is created (last_batch_iteration = -1).
  double initial_lr() const;
  // OneCycle with cycle_momentum: beta1 at `iteration` (beta2 is DeepSpeed's fixed 0.99 then);
  // nullopt for every other schedule.
  std::optional<double> beta1_at(std::int64_t iteration) const;
  std::optional<double> initial_beta1() const;

 private:
  double one_cycle_scale(std::int64_t iteration) const;
  double warmup_gamma(std::int64_t iteration, std::int64_t warmup_steps, config::WarmupType type) const;

  std::optional<config::SchedulerConfig> scheduler_;
  double base_lr_;
};

}  // namespace zinf::runtime
