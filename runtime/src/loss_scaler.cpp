#include "zinf/runtime/loss_scaler.hpp"

#include <algorithm>
#include <cmath>

#include "zinf/common/error.hpp"

namespace zinf::runtime {

LossScaler::LossScaler(const config::Fp16Config& fp16)
    : dynamic_(fp16.dynamic()),
      min_scale_(fp16.min_loss_scale),
      window_(std::max<std::int64_t>(1, fp16.loss_scale_window)),
      delayed_shift_(std::max(1, fp16.hysteresis)),
      consecutive_(fp16.consecutive_hysteresis) {
  state_.scale = dynamic_ ? std::ldexp(1.0, fp16.initial_scale_power) : fp16.loss_scale;
  state_.hysteresis = delayed_shift_;
}

void LossScaler::set_state(const State& s) {
  if (!(s.scale > 0) || !std::isfinite(s.scale) || s.hysteresis < 1 || s.iteration < 0 || s.last_overflow < -1) {
    throw Error("the loss scaler state in the checkpoint is damaged (scale {}, hysteresis {}, iteration {})", s.scale,
                s.hysteresis, s.iteration);
  }
  state_ = s;
}

void LossScaler::update(bool overflow) {
  State& s = state_;
  if (!dynamic_) {
    ++s.iteration;
    return;
  }
  if (overflow) {
    if (delayed_shift_ == 1 || s.hysteresis == 1) {
      if (s.scale == min_scale_) {
        throw Error("fp16 gradients overflow at the minimum loss scale ({}): the run cannot continue. Lower the "
                    "learning rate, use bf16, or lower \"min_loss_scale\"",
                    min_scale_);
      }
      s.scale = std::max(s.scale / 2.0, min_scale_);
    } else {
      --s.hysteresis;
    }
    s.last_overflow = s.iteration;
  } else {
    if (consecutive_) s.hysteresis = delayed_shift_;
    if ((s.iteration - s.last_overflow) % window_ == 0) {
      if (!consecutive_) s.hysteresis = delayed_shift_;
      s.scale *= 2.0;
    }
  }
  ++s.iteration;
}

}  // namespace zinf::runtime
