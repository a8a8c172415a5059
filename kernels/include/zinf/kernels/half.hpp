#pragma once
// Scalar bf16 / fp16 <-> fp32 conversions, bit-exact with the SIMD kernels: round to nearest
// even, NaN stays NaN (quiet), infinities and subnormals as IEEE 754 says.

#include <bit>
#include <cstdint>

namespace zinf::kernels {

#include "zinf/kernels/half_impl.inc"

}  // namespace zinf::kernels
