#pragma once
// The float scalars one Adam/AdamW step uses, formed in double from the config (as PyTorch forms
// them from Python floats) and rounded once by kernels::cpu::adam_scalars(). The CPU kernels and the
// GPU's (kernels/cuda/optim.cu) take exactly these values, so the two agree bit for bit. No
// dependencies: CUDA sources include it too.

namespace zinf::kernels {

struct AdamScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  float step_size;     // lr / (1 - beta1^step)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
  float decay;         // AdamW: 1 - lr * wd; else 1
  float l2;            // Adam (L2): wd; else 0
  float grad_scale;    // the gradient is multiplied by this first (1/loss_scale x clip coefficient)
};

}  // namespace zinf::kernels
