// Optimizer kernels, AVX-512 build (16 lanes, masked tails, so every element goes through the
// same vector code). bf16 stores use AVX512-BF16's vcvtneps2bf16 where the CPU has it and an
// integer round-to-nearest-even otherwise; both give the scalar build's bits. Only this file gets
// the AVX-512 flags; the dispatcher calls it only when cpuid reports avx512f/bw/vl (and bf16 for
// the native table).
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "optim_tables.hpp"

namespace zinf::kernels::cpu::detail {
namespace {
#include "zinf/kernels/half_impl.inc"
#include "optim_scalar_traits.inc"

template <bool kNativeBf16>
struct V512 {
  static constexpr std::size_t W = 16;
  using F = __m512;
  using Mask = __mmask16;
  static constexpr bool kMasked = true;
  static Mask full_mask() { return static_cast<Mask>(0xffff); }
  static Mask tail_mask(unsigned k) { return static_cast<Mask>((1u << k) - 1u); }

  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static F load_bf16(const std::uint16_t* p, Mask m) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const std::uint16_t* p, Mask m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(float* p, F x, Mask m) { _mm512_mask_storeu_ps(p, m, x); }
  static void store_bf16(std::uint16_t* p, F x, Mask m) {
    __m256i h;
    if constexpr (kNativeBf16) {
      h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    } else {
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(p, m, h);
  }
  static void store_f16(std::uint16_t* p, F x, Mask m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F sign(F x) {
    const F zero = _mm512_setzero_ps();
    const __mmask16 gt = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ);
    const __mmask16 lt = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
    return _mm512_mask_blend_ps(gt, _mm512_mask_blend_ps(lt, zero, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
  }

  struct StatAcc {
    __m512d lo = _mm512_setzero_pd();
    __m512d hi = _mm512_setzero_pd();
    std::size_t nonfinite = 0;
  };
  static void stat_add(StatAcc& acc, F x, Mask m) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(bits, 1)));
    acc.lo = _mm512_fmadd_pd(lo, lo, acc.lo);
    acc.hi = _mm512_fmadd_pd(hi, hi, acc.hi);
    const __m512i exp = _mm512_set1_epi32(0x7f800000);
    const __mmask16 bad = _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(bits, exp), exp);
    acc.nonfinite += static_cast<std::size_t>(__builtin_popcount((bad)));
  }
  static GradStats stat_finish(const StatAcc& acc) {
    return {_mm512_reduce_add_pd(_mm512_add_pd(acc.lo, acc.hi)), acc.nonfinite};
  }
};

#include "optim_generic.inc"
}  // namespace

const KernelTable& avx512_table(bool native_bf16) {
  static const KernelTable native = TableBuilder<V512<true>, ScalarV>::build();
  static const KernelTable emulated = TableBuilder<V512<false>, ScalarV>::build();
  return native_bf16 ? native : emulated;
}

}  // namespace zinf::kernels::cpu::detail
