#include "zinf/runtime/lr_schedule.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "zinf/common/error.hpp"

namespace zinf::runtime {

using config::SchedulerType;
using config::WarmupType;

namespace {
bool is_close_to_zero(double x) { return std::fabs(x) <= 1e-9; }  // Python's math.isclose(x, 0)
}  // namespace

LrSchedule::LrSchedule(const std::optional<config::SchedulerConfig>& scheduler, double base_lr)
    : scheduler_(scheduler), base_lr_(base_lr) {}

double LrSchedule::warmup_gamma(std::int64_t it, std::int64_t warmup_steps, WarmupType type) const {
  const std::int64_t n = std::max<std::int64_t>(2, warmup_steps);  // DeepSpeed: max(2, warmup_num_steps)
  if (type == WarmupType::kLog) return std::log(static_cast<double>(it + 1)) / std::log(static_cast<double>(n));
  return static_cast<double>(it) / static_cast<double>(n);
}

double LrSchedule::one_cycle_scale(std::int64_t iteration) const {
  const auto& p = scheduler_->one_cycle;
  const double first = p.cycle_first_step_size;
  const double second = p.cycle_second_step_size;
  const double total = first + second;
  const double step_ratio = first / total;
  const double batch = static_cast<double>(iteration + 1);
  const double cycle = std::floor(1.0 + batch / total);
  const double x = 1.0 + batch / total - cycle;
  double scale = 0.0;
  std::int64_t stairs = 0;
  if (x <= step_ratio) {
    scale = x / step_ratio;
    stairs = p.cycle_first_stair_count.value_or(0);
  } else {
    scale = (x - 1.0) / (step_ratio - 1.0);
    stairs = p.cycle_second_stair_count.value_or(p.cycle_first_stair_count.value_or(0));
  }
  // Stairs hold the value flat over equal parts of each half cycle, quantised from the integer
  // position in the cycle (as DeepSpeed does, so a boundary never drops a stair).
  if (stairs > 0) {
    const double in_cycle = std::fmod(batch, total);
    const double position = in_cycle <= first ? in_cycle * static_cast<double>(stairs) / first
                                              : (total - in_cycle) * static_cast<double>(stairs) / second;
    scale = std::floor(position) / static_cast<double>(stairs);
  }
  return scale;
}

double LrSchedule::initial_lr() const {
  if (!scheduler_) return base_lr_;
  switch (scheduler_->type) {
    case SchedulerType::kLRRangeTest: return scheduler_->lr_range_test.min_lr;
    case SchedulerType::kOneCycle: return scheduler_->one_cycle.cycle_min_lr;
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR: return scheduler_->warmup.warmup_min_lr;
    case SchedulerType::kWarmupCosineLR: return 0.0;
  }
  return base_lr_;
}

double LrSchedule::lr_at(std::int64_t it) const {
  ZINF_ASSERT(it >= 0, "scheduler iteration {} < 0", it);
  if (!scheduler_) return base_lr_;
  const auto& s = *scheduler_;
  switch (s.type) {
    case SchedulerType::kLRRangeTest: {
      const auto& p = s.lr_range_test;
      double interval = static_cast<double>(it + 1) / p.step_size;
      if (p.staircase) interval = std::floor(interval);
      return p.min_lr * (1.0 + p.step_rate * interval);
    }
    case SchedulerType::kOneCycle: {
      const auto& p = s.one_cycle;
      const double total = p.cycle_first_step_size + p.cycle_second_step_size;
      if (static_cast<double>(it) < total) {
        return p.cycle_min_lr + (p.cycle_max_lr - p.cycle_min_lr) * one_cycle_scale(it);
      }
      if (is_close_to_zero(p.decay_step_size) || is_close_to_zero(p.decay_lr_rate)) return p.cycle_min_lr;
      const double decay_it = static_cast<double>(it) - total + 1.0;
      return p.cycle_min_lr / (1.0 + p.decay_lr_rate * (decay_it / p.decay_step_size));
    }
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR: {
      const auto& p = s.warmup;
      const std::int64_t n = std::max<std::int64_t>(2, p.warmup_num_steps);
      double gamma = 1.0;
      if (it < n) {
        gamma = warmup_gamma(it, p.warmup_num_steps, p.warmup_type);
      } else if (s.type == SchedulerType::kWarmupDecayLR) {
        gamma = std::max(0.0, static_cast<double>(p.total_num_steps - it) /
                                  std::max(1.0, static_cast<double>(p.total_num_steps - n)));
      }
      return p.warmup_min_lr + (p.warmup_max_lr - p.warmup_min_lr) * gamma;
    }
    case SchedulerType::kWarmupCosineLR: {
      const auto& p = s.warmup_cosine;
      const std::int64_t n = std::max<std::int64_t>(2, p.warmup_num_steps);
      double ratio = 0.0;
      if (it < n) {
        ratio = p.warmup_min_ratio + warmup_gamma(it, p.warmup_num_steps, p.warmup_type) * (1.0 - p.warmup_min_ratio);
      } else {
        const double real_step = static_cast<double>(it - n + 1);
        const double real_total = std::max<double>(1.0, static_cast<double>(p.total_num_steps - n));
        const double progress = std::min(1.0, real_step / real_total);
        ratio = std::max(0.0, p.cos_min_ratio + (1.0 - p.cos_min_ratio) *
                                                    (1.0 + std::cos(std::numbers::pi * progress)) / 2.0);
      }
      return base_lr_ * ratio;
    }
  }
  return base_lr_;
}

std::optional<double> LrSchedule::beta1_at(std::int64_t it) const {
  if (!scheduler_ || scheduler_->type != SchedulerType::kOneCycle || !scheduler_->one_cycle.cycle_momentum) {
    return std::nullopt;
  }
  const auto& p = scheduler_->one_cycle;
  const double total = p.cycle_first_step_size + p.cycle_second_step_size;
  if (static_cast<double>(it) < total) {
    return p.cycle_max_mom - (p.cycle_max_mom - p.cycle_min_mom) * one_cycle_scale(it);
  }
  if (is_close_to_zero(p.decay_step_size) || is_close_to_zero(p.decay_mom_rate)) return p.cycle_max_mom;
  const double decay_it = static_cast<double>(it) - total + 1.0;
  return p.cycle_max_mom * (1.0 + p.decay_mom_rate * (decay_it / p.decay_step_size));
}

std::optional<double> LrSchedule::initial_beta1() const {
  if (!scheduler_ || scheduler_->type != SchedulerType::kOneCycle || !scheduler_->one_cycle.cycle_momentum) {
    return std::nullopt;
  }
  return scheduler_->one_cycle.cycle_min_mom;
}

}  // namespace zinf::runtime
