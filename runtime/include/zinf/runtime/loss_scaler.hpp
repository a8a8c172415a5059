#pragma once
// fp16 loss scaling as DeepSpeed does it (deepspeed/runtime/fp16/loss_scaler.py): the loss is
// multiplied by the scale before backward; a step whose gradients overflow (inf or NaN) is
// skipped. Dynamic: on an overflow the scale halves once `hysteresis` overflows have been
// absorbed (never below `min_loss_scale`; an overflow at the minimum ends the run), and after
// `loss_scale_window` steps without overflow it doubles. `consecutive_hysteresis` restores the
// hysteresis after every clean step instead of only when the scale grows. Static (`loss_scale` >
// 0): the scale never changes; overflowing steps are still skipped.

#include <cstdint>

#include "zinf/configs/deepspeed_config.hpp"

namespace zinf::runtime {

class LossScaler {
 public:
  struct State {
    double scale = 1.0;
    std::int64_t iteration = 0;           // DeepSpeed's cur_iter
    std::int64_t last_overflow = -1;      // last_overflow_iter
    int hysteresis = 1;                   // cur_hysteresis
    bool operator==(const State&) const = default;
  };

  // From the config's fp16 block (the caller uses it only when fp16 is enabled).
  explicit LossScaler(const config::Fp16Config& fp16);

  double scale() const noexcept { return state_.scale; }
  bool dynamic() const noexcept { return dynamic_; }
  // Records one step's outcome and adapts the scale. Throws zinf::Error on an overflow at the
  // minimum scale (the run cannot go on: DeepSpeed's "Current loss scale already at minimum").
  void update(bool overflow);

  const State& state() const noexcept { return state_; }
  // Throws zinf::Error for a state no scaler can be in (a damaged checkpoint).
  void set_state(const State& s);

 private:
  bool dynamic_;
  double min_scale_;
  std::int64_t window_;
  int delayed_shift_;
  bool consecutive_;
  State state_;
};

}  // namespace zinf::runtime
