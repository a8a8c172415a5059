// The oneDNN GEMM wrapper against a plain triple loop in double: every transpose combination,
// batches with strides, padded leading dimensions, alpha, accumulation, bf16 and empty shapes.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "numeric_util.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_gemm.hpp"
#include "zinf/kernels/half.hpp"

namespace zinf::kernels::cpu {
namespace {

struct Case {
  std::int64_t batch, m, n, k;
  bool ta, tb, acc;
  float alpha;
  DType dtype;
  bool padded = true;  // rows and batches padded apart; false: dense, as the model calls it
};

void check(const Case& c) {
  std::mt19937 rng(static_cast<unsigned>(c.m * 131 + c.n * 17 + c.k + c.ta * 2 + c.tb));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  // Stored shapes with 3 elements of row padding, batches 5 elements apart beyond their extent.
  const std::int64_t ar = c.ta ? c.k : c.m, ac = c.ta ? c.m : c.k, br = c.tb ? c.n : c.k, bc = c.tb ? c.k : c.n;
  const std::int64_t rp = c.padded ? 3 : 0, bp = c.padded ? 5 : 0;
  const std::int64_t lda = ac + rp, ldb = bc + rp, ldc = c.n + rp;
  const std::int64_t sa = ar * lda + bp, sb = br * ldb + bp, sc = c.m * ldc + bp;
  std::vector<float> a(static_cast<std::size_t>(c.batch * sa)), b(static_cast<std::size_t>(c.batch * sb));
  std::vector<float> cm(static_cast<std::size_t>(c.batch * sc));
  for (float& x : a) x = dist(rng);
  for (float& x : b) x = dist(rng);
  for (float& x : cm) x = dist(rng);
  std::vector<std::uint16_t> a16(a.size()), b16(b.size());
  if (c.dtype == DType::kBF16) {
    // The reference uses the bf16-rounded values.
    for (std::size_t i = 0; i < a.size(); ++i) a16[i] = f32_to_bf16(a[i]), a[i] = bf16_to_f32(a16[i]);
    for (std::size_t i = 0; i < b.size(); ++i) b16[i] = f32_to_bf16(b[i]), b[i] = bf16_to_f32(b16[i]);
  }
  std::vector<float> want = cm;
  for (std::int64_t i = 0; i < c.batch; ++i) {
    for (std::int64_t r = 0; r < c.m; ++r) {
      for (std::int64_t col = 0; col < c.n; ++col) {
        double s = 0;
        for (std::int64_t x = 0; x < c.k; ++x) {
          const double av = c.ta ? a[i * sa + x * lda + r] : a[i * sa + r * lda + x];
          const double bv = c.tb ? b[i * sb + col * ldb + x] : b[i * sb + x * ldb + col];
          s += av * bv;
        }
        float& out = want[i * sc + r * ldc + col];
        out = static_cast<float>(c.alpha * s + (c.acc ? out : 0.0));
      }
    }
  }
  Gemm g;
  g.batch = c.batch, g.m = c.m, g.n = c.n, g.k = c.k, g.ab_dtype = c.dtype;
  g.a = c.dtype == DType::kBF16 ? static_cast<const void*>(a16.data()) : a.data();
  g.b = c.dtype == DType::kBF16 ? static_cast<const void*>(b16.data()) : b.data();
  g.lda = lda, g.ldb = ldb, g.ldc = ldc, g.stride_a = sa, g.stride_b = sb, g.stride_c = sc;
  g.trans_a = c.ta, g.trans_b = c.tb, g.alpha = c.alpha, g.accumulate = c.acc;
  g.c = cm.data();
  const std::vector<float> before = cm;
  gemm(g);
  // The same call again gives the same bits (no race in a threaded reduction).
  std::vector<float> again = before;
  g.c = again.data();
  gemm(g);
  EXPECT_EQ(again, cm) << c.m << "x" << c.n << "x" << c.k << " is not reproducible";
  // Padding between rows and batches is untouched, so compare everything.
  EXPECT_TRUE(zinf::testing::all_close(cm, want, 1e-5 * (c.k + 1), 1e-5,
                                       fmt::format("{}x{}x{} batch {} ta {} tb {} acc {} {}", c.m, c.n, c.k, c.batch,
                                                   c.ta, c.tb, c.acc, dtype_name(c.dtype))));
}

TEST(CpuGemm, MatchesTheTripleLoop) {
  for (const DType dt : {DType::kF32, DType::kBF16}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        check({1, 7, 5, 3, ta, tb, false, 1.0f, dt});
        check({3, 17, 33, 16, ta, tb, true, 0.5f, dt});
        check({2, 64, 65, 129, ta, tb, false, 1.0f, dt});
      }
    }
  }
}

TEST(CpuGemm, DenseModelShapes) {
  // The shapes a small model's linears produce (tokens x features, both ways round, with the weight
  // gradient accumulated): dense operands pick other oneDNN kernels than the padded ones above. On a
  // CPU with AMX, oneDNN 2.6 gets N = 50 wrong (and differently on each run) unless gemm() steers
  // it off AMX; the tails around it are here too.
  for (const DType dt : {DType::kBF16, DType::kF32}) {
    for (const std::int64_t m : {16, 32, 33, 48, 50, 64, 96}) {
      for (const std::int64_t n : {16, 18, 32, 33, 34, 40, 48, 50, 64, 80, 96, 100, 130}) {
        for (const std::int64_t k : {16, 32, 33, 50, 64}) {
          check({1, m, n, k, false, true, false, 1.0f, dt, false});  // y = x W^T
          check({1, m, n, k, false, false, false, 1.0f, dt, false});  // dx = dy W
          check({1, m, n, k, true, false, true, 1.0f, dt, false});  // dW += dy^T x
        }
      }
    }
  }
}

TEST(CpuGemm, EmptyShapes) {
  std::vector<float> c(6, 7.0f);
  Gemm g;
  g.m = 2, g.n = 3, g.k = 0, g.lda = 1, g.ldb = 3, g.ldc = 3, g.c = c.data();
  g.accumulate = true;
  gemm(g);
  EXPECT_EQ(c, std::vector<float>(6, 7.0f)) << "an empty sum adds nothing";
  g.accumulate = false;
  gemm(g);
  EXPECT_EQ(c, std::vector<float>(6, 0.0f)) << "an empty sum is zero";
  g.m = 0;
  gemm(g);  // nothing to do, no pointer touched
}

TEST(CpuGemm, BadArgumentsAreErrors) {
  float x = 0;
  Gemm g;
  g.m = g.n = g.k = 2, g.lda = 1, g.ldb = 2, g.ldc = 2, g.a = &x, g.b = &x, g.c = &x;
  EXPECT_THROW(gemm(g), Error);  // lda < k
  g.lda = 2;
  g.ab_dtype = DType::kF16;
  EXPECT_THROW(gemm(g), Error);
  g.ab_dtype = DType::kF32;
  g.b = nullptr;
  EXPECT_THROW(gemm(g), Error);
}

}  // namespace
}  // namespace zinf::kernels::cpu
