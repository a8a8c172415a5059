#pragma once
// The CPU backend's element-wise and row-wise kernels for a Llama-family decoder, forward and
// backward: embedding, RMSNorm, rotary embedding, causal softmax, SwiGLU, bias, residual and the
// pieces of a cross-entropy computed in chunks over the vocabulary. Plain C++ the compiler
// vectorises, parallel over rows with oneTBB. Matrix products are not here (cpu_gemm.hpp).
//
// Activations and gradients are fp32. Weights may be fp32 or bf16 (`wdtype`). Every kernel splits
// its rows into fixed blocks and reduces across blocks in a fixed order, so results never depend
// on the number of threads. Gradients of weights are accumulated (+=), so micro-batches and tied
// weights add up; gradients of activations say in their comment whether they are written or added.
// References: PyTorch's LlamaRMSNorm, apply_rotary_pos_emb, nn.functional.silu and cross_entropy
// as transformers' LlamaForCausalLM uses them.

#include <cstdint>

#include "zinf/kernels/cpu_optim.hpp"  // DType

namespace zinf::kernels::cpu {

// out (n, h) = table[tokens[i]] (v, h) wdtype. Token ids are checked by the caller.
void embedding_forward(float* out, const void* table, DType wdtype, const std::int32_t* tokens, std::int64_t n,
                       std::int64_t h);
// dtable (v, h) fp32 += dout (n, h) scattered by token.
void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n, std::int64_t h);

// y (n, h) = x * rstd * w, rstd (n) = 1 / sqrt(mean(x^2) + eps).
void rmsnorm_forward(float* y, float* rstd, const float* x, const void* w, DType wdtype, std::int64_t n,
                     std::int64_t h, float eps);
// dx (n, h) += d/dx; dw (h) fp32 += d/dw (null: a frozen weight, no gradient).
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const void* w, DType wdtype,
                      const float* rstd, std::int64_t n, std::int64_t h);

// Rotary embedding in place (rotate-half convention) on `heads` heads of size hd, starting at x,
// in rows of stride ld; row i is position i % t. cos, sin: (t, hd/2). inverse = rotate back (the
// backward pass).
void rope_apply(float* x, std::int64_t ld, std::int64_t n, std::int64_t t, std::int64_t heads, std::int64_t hd,
                const float* cos, const float* sin, bool inverse);

// Moves attention heads between token-major rows and head-major blocks. Work item p in [p0, p1)
// is (sequence p / groups, group p % groups); group g is `per` consecutive heads [g*per, (g+1)*per)
// of size hd, head j at columns col0 + j*hd of rows of stride ld (t rows per sequence). The block
// side is (p1 - p0, per, t, hd), contiguous.
void heads_gather(float* dst, const float* src, std::int64_t ld, std::int64_t col0, std::int64_t t,
                  std::int64_t groups, std::int64_t per, std::int64_t hd, std::int64_t p0, std::int64_t p1);
void heads_scatter(float* dst, std::int64_t ld, std::int64_t col0, const float* src, std::int64_t t,
                   std::int64_t groups, std::int64_t per, std::int64_t hd, std::int64_t p0, std::int64_t p1);

// Causal softmax of score rows in place: s (rows, t), row r is query position r % t and sees keys
// 0..r % t. Writes the probabilities (0 above the diagonal) and lse (rows) = log sum exp.
void causal_softmax(float* s, float* lse, std::int64_t rows, std::int64_t t);
// Recomputes the probabilities from scores and the saved lse: s = exp(s - lse), 0 above the diagonal.
void causal_softmax_recompute(float* s, const float* lse, std::int64_t rows, std::int64_t t);
// d (rows) = sum_j dout[r, j] * out[r, j] over rows of length hd.
void rowwise_dot(float* d, const float* dout, const float* out, std::int64_t rows, std::int64_t hd);
// dp (rows, t) becomes dS = p * (dp - d[r]).
void softmax_backward(float* dp, const float* p, const float* d, std::int64_t rows, std::int64_t t);

// gu (n, 2*i) holds gate | up per row; out (n, i) = silu(gate) * up.
void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i);
// dgu (n, 2*i) = d/dgate | d/dup (written).
void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i);

// y (n, cols; row stride ld) += bias (cols) wdtype.
void bias_add(float* y, std::int64_t ld, const void* bias, DType wdtype, std::int64_t n, std::int64_t cols);
// dbias (cols) fp32 += column sums of dy (n, cols; row stride ld).
void bias_backward(float* dbias, const float* dy, std::int64_t ld, std::int64_t n, std::int64_t cols);

// y (n) += x (n).
void add_inplace(float* y, const float* x, std::int64_t n);

// y (n) = x * keep / (1 - p) (+ y when accumulate), keep = dropout_keep(seed, i, p) (dropout.hpp).
void dropout(float* y, const float* x, std::int64_t n, float p, std::uint64_t seed, bool accumulate);

// Cross-entropy over the vocabulary in chunks. logits (n, vc) are columns [v0, v0 + vc) of the
// full row. Forward keeps a running max m and sum s per row (start m = -inf, s = 0) and picks the
// target's logit when it falls in the chunk; lse = m + log(s) at the end.
void ce_chunk_forward(float* m, float* s, float* target_logit, const float* logits, const std::int32_t* targets,
                      std::int64_t n, std::int64_t v0, std::int64_t vc);
// logits (n, vc) become dlogits = (softmax - onehot(target)) * scale[r] (scale 0 for ignored rows).
void ce_chunk_backward(float* logits, const float* lse, const std::int32_t* targets, const float* scale,
                       std::int64_t n, std::int64_t v0, std::int64_t vc);

}  // namespace zinf::kernels::cpu
