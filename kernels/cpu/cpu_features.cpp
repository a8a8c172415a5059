#include "zinf/kernels/cpu_features.hpp"

#include <fmt/format.h>

#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace zinf::kernels {

namespace {

#if defined(__x86_64__) || defined(__i386__)
unsigned long long xgetbv0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx & bit_OSXSAVE) != 0;
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;      // XMM + YMM saved by the OS
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  f.fma = ymm_state && (ecx & bit_FMA) != 0;
  f.f16c = ymm_state && (ecx & bit_F16C) != 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx2 = ymm_state && (ebx & bit_AVX2) != 0;
    f.avx512f = zmm_state && (ebx & bit_AVX512F) != 0;
    f.avx512bw = zmm_state && (ebx & bit_AVX512BW) != 0;
    f.avx512vl = zmm_state && (ebx & bit_AVX512VL) != 0;
  }
  if (f.avx512f && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) {
    f.avx512bf16 = (eax & (1u << 5)) != 0;  // CPUID.(EAX=7,ECX=1):EAX[5]
  }
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string best_cpu_isa() {
  const auto& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl) return "avx512";
  if (f.avx2 && f.fma && f.f16c) return "avx2";
  return "scalar";
}

std::string describe(const CpuFeatures& f) {
  std::vector<std::string> names;
  if (f.avx512f) names.emplace_back("avx512f");
  if (f.avx512bw) names.emplace_back("avx512bw");
  if (f.avx512vl) names.emplace_back("avx512vl");
  if (f.avx512bf16) names.emplace_back("avx512bf16");
  if (f.avx2) names.emplace_back("avx2");
  if (f.fma) names.emplace_back("fma");
  if (f.f16c) names.emplace_back("f16c");
  return names.empty() ? std::string("none beyond x86-64 baseline") : fmt::format("{}", fmt::join(names, " "));
}

}  // namespace zinf::kernels
