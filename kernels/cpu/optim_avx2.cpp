// Optimizer kernels, AVX2 + FMA + F16C build (8 lanes; tails run the scalar traits, which perform
// the same operations, so results match the scalar build bit for bit). Only this file gets
// -mavx2 -mfma -mf16c; the dispatcher calls it only when cpuid reports all three.
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

struct V256 {
  static constexpr std::size_t W = 8;
  using F = __m256;
  struct Mask {};
  static constexpr bool kMasked = false;
  static Mask full_mask() { return {}; }
  static Mask tail_mask(unsigned) { return {}; }

  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p, Mask) { return _mm256_loadu_ps(p); }
  static F load_bf16(const std::uint16_t* p, Mask) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const std::uint16_t* p, Mask) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, F x, Mask) { _mm256_storeu_ps(p, x); }
  static void store_bf16(std::uint16_t* p, F x, Mask) {
    // Round to nearest even on the bit pattern; NaN keeps its top bits and becomes quiet.
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    // 8 x u32 (each <= 0xffff) -> 8 x u16: pack within lanes, then gather quads 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store_f16(std::uint16_t* p, F x, Mask) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F sign(F x) {
    const F zero = _mm256_setzero_ps();
    const F pos = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
    const F neg = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.0f));
    return _mm256_or_ps(pos, neg);
  }

  struct StatAcc {
    __m256d lo = _mm256_setzero_pd();
    __m256d hi = _mm256_setzero_pd();
    std::size_t nonfinite = 0;
  };
  static void stat_add(StatAcc& acc, F x, Mask) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    acc.lo = _mm256_fmadd_pd(lo, lo, acc.lo);
    acc.hi = _mm256_fmadd_pd(hi, hi, acc.hi);
    const __m256i exp = _mm256_set1_epi32(0x7f800000);
    const __m256i bad = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exp), exp);
    acc.nonfinite += static_cast<std::size_t>(__builtin_popcount((_mm256_movemask_ps(_mm256_castsi256_ps(bad)))));
  }
  static GradStats stat_finish(const StatAcc& acc) {
    alignas(32) double v[4];
    _mm256_store_pd(v, _mm256_add_pd(acc.lo, acc.hi));
    return {(v[0] + v[1]) + (v[2] + v[3]), acc.nonfinite};
  }
};

#include "optim_generic.inc"
}  // namespace

const KernelTable& avx2_table() {
  static const KernelTable table = TableBuilder<V256, ScalarV>::build();
  return table;
}

}  // namespace zinf::kernels::cpu::detail
