#pragma once
// Private: resolved optimizer arguments and the per-ISA dispatch tables.

#include <cstddef>

#include "zinf/kernels/cpu_optim.hpp"

namespace zinf::kernels::cpu::detail {

// Float scalars the kernels use (public as AdamScalars: the GPU's Adam uses the same).
using AdamArgs = AdamScalars;

struct AdagradArgs {
  float clr;  // lr / (1 + (step - 1) * lr_decay)
  float eps;
  float l2;
  float grad_scale;
};

struct LionArgs {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2;
  float decay;  // 1 - lr * wd
  float grad_scale;
};

using AdamFn = void (*)(const AdamArgs&, const AdamTensors&, std::size_t, std::size_t);
using AdagradFn = void (*)(const AdagradArgs&, const AdagradTensors&, std::size_t, std::size_t);
using LionFn = void (*)(const LionArgs&, const LionTensors&, std::size_t, std::size_t);
using StatsFn = GradStats (*)(const void*, std::size_t, std::size_t);
using ConvertFn = void (*)(const void*, void*, std::size_t, std::size_t);
using TriadFn = void (*)(float*, const float*, const float*, float, std::size_t, std::size_t);

// [grad dtype][state dtype (f32, bf16)][out: none, f32, bf16, f16]
struct KernelTable {
  AdamFn adam[3][2][4];
  AdagradFn adagrad[3][2][4];
  LionFn lion[3][2][4];
  StatsFn stats[3];
  ConvertFn convert[3][3];
  TriadFn triad;
};

const KernelTable& scalar_table();
const KernelTable& avx2_table();
const KernelTable& avx512_table(bool native_bf16);

}  // namespace zinf::kernels::cpu::detail
