#pragma once
// What the host CPU can run, read once with cpuid (and the OS's XSAVE state), so the per-ISA
// kernels are chosen at run time and one binary runs on any x86-64 machine.

#include <string>

namespace zinf::kernels {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool f16c = false;
};

const CpuFeatures& cpu_features();

// The best ISA tier this CPU supports: "avx512", "avx2" or "scalar".
std::string best_cpu_isa();

// "avx512 (avx512f avx512bw avx512vl avx512bf16), avx2, fma, f16c"
std::string describe(const CpuFeatures& features);

}  // namespace zinf::kernels
