#pragma once
// Batched GEMM on the CPU through oneDNN's matmul primitive: the matrix products of the CPU
// backend (linear layers, attention scores and values, the LM head). fp32 x fp32 or bf16 x bf16
// inputs, always accumulated and written in fp32. Operands are strided views, so a transpose is a
// choice of strides, never a copy.
//
// oneDNN runs its own thread pool (OpenMP in Debian's build); call gemm() from one thread at a
// time, outside oneTBB tasks, so the two pools never nest.

#include <cstdint>
#include <string>

#include "zinf/kernels/cpu_optim.hpp"  // DType

namespace zinf::kernels::cpu {

// C[i] (m, n) = alpha * op(A[i]) (m, k) x op(B[i]) (k, n)  (+ C[i] when accumulate), i < batch.
// Row-major storage: A is (m, k) with row stride lda, or (k, m) when trans_a; B is (k, n) with row
// stride ldb, or (n, k) when trans_b (a PyTorch Linear weight is B with trans_b). The batch
// strides are in elements.
struct Gemm {
  std::int64_t batch = 1;
  std::int64_t m = 0, n = 0, k = 0;
  DType ab_dtype = DType::kF32;  // kF32 or kBF16, for A and B alike
  const void* a = nullptr;
  std::int64_t lda = 0, stride_a = 0;
  bool trans_a = false;
  const void* b = nullptr;
  std::int64_t ldb = 0, stride_b = 0;
  bool trans_b = false;
  float* c = nullptr;  // fp32
  std::int64_t ldc = 0, stride_c = 0;
  float alpha = 1.0f;
  bool accumulate = false;
};

// Throws zinf::Error for an unsupported dtype, a null operand with a non-empty shape, or a leading
// dimension smaller than its row. bf16 runs natively where oneDNN has a kernel for this CPU and is
// widened to fp32 (exactly) where it has none.
void gemm(const Gemm& g);

// Whether bf16 x bf16 products run natively on this CPU (else gemm() widens them to fp32).
bool gemm_native_bf16();

// "oneDNN 2.6.3 (OpenMP threads)"
std::string gemm_library();

}  // namespace zinf::kernels::cpu
