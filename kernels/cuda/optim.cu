// The GPU's Adam/AdamW step (cuda_ops.hpp): the CPU kernels' arithmetic (optim_generic.inc),
// operation for operation. nvcc contracts a * b + c into a fused multiply-add by default, so every
// operation is spelled with its rounding intrinsic (__fmul_rn, __fmaf_rn, __fdiv_rn, __fsqrt_rn):
// nothing is fused that the CPU code does not fuse.
#include <cuda_runtime.h>

#include <cstdint>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cuda_ops.hpp"

namespace zinf::kernels::cuda {
namespace {

using i64 = std::int64_t;

__device__ __forceinline__ float bf16_to_f32(std::uint16_t h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }

// Round to nearest even, NaN quietened: kernels::f32_to_bf16 (half_impl.inc), bit for bit.
__device__ __forceinline__ std::uint16_t f32_to_bf16(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <bool kGradBf16, int kOut>  // kOut: 0 none, 1 bf16, 2 fp32
__global__ void adam_k(AdamScalars a, float* __restrict__ master, float* __restrict__ exp_avg,
                       float* __restrict__ exp_avg_sq, const void* __restrict__ grad, void* __restrict__ out, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const float graw = kGradBf16 ? bf16_to_f32(static_cast<const std::uint16_t*>(grad)[i]) : static_cast<const float*>(grad)[i];
    float g = __fmul_rn(graw, a.grad_scale);
    float p = master[i];
    if (a.l2 != 0.0f) g = __fmaf_rn(a.l2, p, g);
    if (a.decay != 1.0f) p = __fmul_rn(p, a.decay);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    m = __fmaf_rn(a.beta1, m, __fmul_rn(a.one_minus_beta1, g));
    v = __fmaf_rn(a.beta2, v, __fmul_rn(a.one_minus_beta2, __fmul_rn(g, g)));
    const float denom = __fmaf_rn(__fsqrt_rn(v), a.inv_bc2_sqrt, a.eps);
    p = __fmaf_rn(-a.step_size, __fdiv_rn(m, denom), p);  // p - step_size * (m / denom), one rounding
    master[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (kOut == 1) static_cast<std::uint16_t*>(out)[i] = f32_to_bf16(p);
    if constexpr (kOut == 2) static_cast<float*>(out)[i] = p;
  }
}

template <bool kGradBf16>
void launch(const AdamScalars& a, float* master, float* m, float* v, const void* grad, void* out, bool out_bf16, i64 n,
            cudaStream_t stream) {
  constexpr int kThreads = 256;
  const i64 want = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < 1 ? 1 : (want > (1 << 16) ? (1 << 16) : want));
  if (out == nullptr) {
    adam_k<kGradBf16, 0><<<blocks, kThreads, 0, stream>>>(a, master, m, v, grad, out, n);
  } else if (out_bf16) {
    adam_k<kGradBf16, 1><<<blocks, kThreads, 0, stream>>>(a, master, m, v, grad, out, n);
  } else {
    adam_k<kGradBf16, 2><<<blocks, kThreads, 0, stream>>>(a, master, m, v, grad, out, n);
  }
}

}  // namespace

void adam_step(const AdamScalars& a, float* master, float* exp_avg, float* exp_avg_sq, const void* grad, bool grad_bf16,
               void* param_out, bool out_bf16, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (grad_bf16) {
    launch<true>(a, master, exp_avg, exp_avg_sq, grad, param_out, out_bf16, n, stream);
  } else {
    launch<false>(a, master, exp_avg, exp_avg_sq, grad, param_out, out_bf16, n, stream);
  }
  cuda_check_launch("adam_step");
}

}  // namespace zinf::kernels::cuda
