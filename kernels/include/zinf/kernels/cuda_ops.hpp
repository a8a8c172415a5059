#pragma once
// The model's GPU kernels (kernels/cuda/model_ops.cu): every op of the Backend interface except
// the matrix products (cuBLASLt, in the CUDA backend). Activations and their gradients are fp32;
// weights fp32 or bf16 (`bf16` flags). Each launcher queues its kernel(s) on `stream` and returns;
// errors of the launch itself throw zinf::Error.
//
// Semantics follow the CPU kernels (cpu_model_ops.hpp) op for op, so the CPU backend is the
// reference the tests compare against.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "zinf/kernels/adam_scalars.hpp"
#include "zinf/kernels/cuda_scratch.hpp"

namespace zinf::kernels::cuda {

// out (n, h) = table (v, h)[tokens]
void embedding_forward(float* out, const void* table, bool bf16, const std::int32_t* tokens, std::int64_t n,
                       std::int64_t h, cudaStream_t stream);
// dtable (v, h) += dout scattered by token; repeated tokens sum in row order (no atomics: the same
// result run to run).
void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n, std::int64_t h,
                        cudaStream_t stream);

// y = x * rstd * w, rstd (n) saved.
void rmsnorm_forward(float* y, float* rstd, const float* x, const void* w, bool bf16, std::int64_t n, std::int64_t h,
                     float eps, cudaStream_t stream);
// dx (n, h) added; dw (h) += sum over rows of dy * x * rstd. `partial` is scratch of
// rmsnorm_partial_floats(n, h) floats (per-block column sums, reduced in a fixed order). dw null:
// a frozen weight (no gradient).
std::int64_t rmsnorm_partial_floats(std::int64_t n, std::int64_t h);
void rmsnorm_backward(float* dx, float* dw, float* partial, const float* dy, const float* x, const void* w, bool bf16,
                      const float* rstd, std::int64_t n, std::int64_t h, cudaStream_t stream);

// Rotary embedding in place (inverse: the backward rotation) on `heads` heads of head_dim hd from
// column col0 of rows of stride ld; row i is position i % seq.
void rope(float* x, std::int64_t ld, std::int64_t n, std::int64_t seq, std::int64_t heads, std::int64_t hd,
          const float* cos, const float* sin, bool inverse, cudaStream_t stream);

// out (n, i) = silu(gate) * up from gu (n, 2i); backward writes dgu (n, 2i).
void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i, cudaStream_t stream);
void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i,
                     cudaStream_t stream);

// y += x
void add(float* y, const float* x, std::int64_t count, cudaStream_t stream);
// y (count) = x * keep / (1 - p) (+ y when accumulate), keep = dropout_keep(seed, i, p) (dropout.hpp).
void dropout(float* y, const float* x, std::int64_t count, float p, std::uint64_t seed, bool accumulate,
             cudaStream_t stream);
// y (n, cols) += bias (cols) per row.
void bias_add(float* y, const void* bias, bool bf16, std::int64_t n, std::int64_t cols, cudaStream_t stream);
// dbias (cols) += column sums of dy (n, cols); `partial` as rmsnorm_partial_floats(n, cols).
void column_sums_add(float* dbias, float* partial, const float* dy, std::int64_t n, std::int64_t cols,
                     cudaStream_t stream);
// out (one double) = sum of x[i]^2, in a fixed order: per-block partials (`partial` holds
// sum_squares_partial_doubles() doubles), then one block sums them.
constexpr std::int64_t sum_squares_partial_doubles() { return cuda_scratch::kSumSquaresPartials; }
void sum_squares(double* out, double* partial, const void* x, bool bf16, std::int64_t count, cudaStream_t stream);
// Round to bf16 (nearest even; NaN stays NaN).
void to_bf16(std::uint16_t* dst, const float* src, std::int64_t count, cudaStream_t stream);

// Causal grouped-query attention, tiled (the seq x seq scores never exist in memory). qkv (n,
// (heads + 2 kv) hd) as the fused projection writes it; out (n, heads hd); lse (batch, heads, seq).
// bf16: products on the tensor cores with bf16 operands (q, k, v, dO and the probabilities
// rounded), fp32 accumulation and softmax (flash attention, head dims 64 and 128); otherwise, or
// for other head dims, fp32 throughout on the CUDA cores.
struct AttentionDims {
  std::int64_t batch, seq, heads, kv_heads, hd;
  float scale;
  bool bf16 = false;
};
bool flash_attention_supported(const AttentionDims& d);
// Scratch for packing q, k, v and dO as bf16 (16-byte aligned).
std::int64_t flash_attention_scratch_floats(const AttentionDims& d);
void flash_attention_forward(float* out, float* lse, float* scratch, const float* qkv, const AttentionDims& d,
                             cudaStream_t stream);
// dd: rowdot(dO, O) per (batch, head, seq), as attention_backward computes it first.
void flash_attention_backward(float* dqkv, float* scratch, const float* dd, const float* dout, const float* qkv,
                              const float* lse, const AttentionDims& d, cudaStream_t stream);
// `scratch` (16-byte aligned) holds attention_scratch_floats(d) floats; forward and backward.
std::int64_t attention_scratch_floats(const AttentionDims& d);
void attention_forward(float* out, float* lse, float* scratch, const float* qkv, const AttentionDims& d,
                       cudaStream_t stream);
// dqkv (n, qkv_dim) written.
void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* out,
                        const float* lse, const AttentionDims& d, cudaStream_t stream);

// Cross-entropy over vocabulary chunks of logits (n, vc) for columns [v0, v0 + vc): running max m,
// sum s and the target's logit (n) updated in place (initialise with ce_init).
void ce_init(float* m, float* s, float* target_logit, std::int64_t n, cudaStream_t stream);
void ce_chunk_forward(float* m, float* s, float* target_logit, const float* logits, const std::int32_t* targets,
                      std::int64_t n, std::int64_t v0, std::int64_t vc, cudaStream_t stream);
// lse = m + log s; loss = lse - target logit (0 for ignored rows, target < 0).
void ce_finish(float* lse, float* loss, const float* m, const float* s, const float* target_logit,
               const std::int32_t* targets, std::int64_t n, cudaStream_t stream);
// logits (n, vc) become d(scale * loss) / d logits: scale * (softmax - onehot), 0 for ignored rows.
void ce_chunk_backward(float* logits, const float* lse, const std::int32_t* targets, float scale, std::int64_t n,
                       std::int64_t v0, std::int64_t vc, cudaStream_t stream);

// One Adam/AdamW step over n elements in device memory (kernels/cuda/optim.cu), the same operations
// in the same order as the CPU kernels (cpu_optim.hpp: explicit fused multiply-adds, correctly
// rounded division and square root, nothing contracted), so the fp32 state agrees with them bit for
// bit. master, exp_avg, exp_avg_sq: fp32, updated in place. grad: fp32, or bf16 (grad_bf16).
// param_out: null, or the updated parameter as bf16 (round to nearest even, as the CPU's exact
// path: subnormals kept) or fp32 (out_bf16 false).
void adam_step(const AdamScalars& a, float* master, float* exp_avg, float* exp_avg_sq, const void* grad, bool grad_bf16,
               void* param_out, bool out_bf16, std::int64_t n, cudaStream_t stream);

}  // namespace zinf::kernels::cuda
