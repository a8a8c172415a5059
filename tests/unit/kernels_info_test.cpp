// CPU feature detection and the GPU query (skipped with a reason where no GPU is present).
#include <gtest/gtest.h>

#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/device_info.hpp"

namespace zinf::kernels {
namespace {

TEST(CpuFeatures, TiersAreConsistent) {
  const auto& f = cpu_features();
  const std::string isa = best_cpu_isa();
  if (isa == "avx512") {
    EXPECT_TRUE(f.avx512f && f.avx512bw && f.avx512vl);
  } else if (isa == "avx2") {
    EXPECT_TRUE(f.avx2 && f.fma);
    EXPECT_FALSE(f.avx512f && f.avx512bw && f.avx512vl);
  } else {
    EXPECT_EQ(isa, "scalar");
  }
  if (f.avx512bf16) {
    EXPECT_TRUE(f.avx512f);
  }
  EXPECT_FALSE(describe(f).empty());
}

TEST(Gpu, QueryNeverThrowsAndExplainsAbsence) {
  const GpuQuery q = query_gpus();
  if (q.gpus.empty()) {
    EXPECT_FALSE(q.problem.empty());
    GTEST_SKIP() << "no GPU: " << q.problem;
  }
  for (const auto& g : q.gpus) {
    EXPECT_FALSE(g.name.empty());
    EXPECT_GE(g.compute_major, 7);
    EXPECT_GT(g.total_memory, 1ull << 30);
    EXPECT_GT(g.multiprocessors, 0);
  }
  EXPECT_TRUE(q.built_with_cuda);
}

}  // namespace
}  // namespace zinf::kernels
