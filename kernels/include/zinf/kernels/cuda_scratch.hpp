#pragma once
// The scratch the CUDA kernels and the CUDA backend take for one training step, as host-only
// arithmetic (no CUDA needed to include it): the kernels size their buffers with these functions,
// the CUDA backend's scratch_bound() is step_scratch_bytes(), and the GPU memory plan (the
// trainer's --gpu-memory-limit check and `zinf plan`, on machines with or without CUDA) calls the
// same function, so the bound and the buffers cannot drift apart.

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace zinf::kernels::cuda_scratch {

inline constexpr std::int64_t kPartialRows = 64;           // rows per partial column sum (rmsnorm, bias)
inline constexpr std::int64_t kSumSquaresPartials = 1024;  // doubles of a sum of squares' block partials
inline constexpr std::int64_t kAttentionRows = 64;         // the flash kernels' row tile; sequences padded to it
inline constexpr std::size_t kWorkspaceBytes = 32u << 20;  // the cuBLASLt workspace
inline constexpr std::size_t kHeadChunkBytes = 256u << 20;  // logits per vocabulary chunk (CudaBackendOptions)

// rmsnorm and column sums of n rows of h: one partial row per kPartialRows rows (floats).
inline std::int64_t rmsnorm_partial_floats(std::int64_t n, std::int64_t h) { return (n + kPartialRows - 1) / kPartialRows * h; }

// The flash (tensor-core) attention kernels take head dims 64 and 128 with whole query groups.
inline bool flash_attention_supported(std::int64_t head_dim, std::int64_t heads, std::int64_t kv_heads) {
  return (head_dim == 64 || head_dim == 128) && kv_heads > 0 && heads % kv_heads == 0;
}
inline std::int64_t padded_seq(std::int64_t seq) { return (seq + kAttentionRows - 1) / kAttentionRows * kAttentionRows; }
// Packed bf16 elements of q, k and v, and of dO, over sequences padded to the row tile.
inline std::int64_t flash_packed_qkv(std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t kv_heads,
                                     std::int64_t head_dim) {
  return (heads + 2 * kv_heads) * batch * padded_seq(seq) * head_dim;
}
inline std::int64_t flash_packed_do(std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim) {
  return heads * batch * padded_seq(seq) * head_dim;
}
// Floats of the packed operands (bf16 pairs), 16-byte aligned.
inline std::int64_t flash_attention_scratch_floats(std::int64_t batch, std::int64_t seq, std::int64_t heads,
                                                   std::int64_t kv_heads, std::int64_t head_dim) {
  return (flash_packed_qkv(batch, seq, heads, kv_heads, head_dim) + flash_packed_do(batch, seq, heads, head_dim)) / 2 + 64;
}
// Attention's D rows (batch x heads x seq, rounded to 4 floats), then the flash kernels' packed
// operands when they run (bf16 products).
inline std::int64_t attention_d_floats(std::int64_t batch, std::int64_t seq, std::int64_t heads) {
  return (batch * heads * seq + 3) / 4 * 4;
}
inline std::int64_t attention_scratch_floats(std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t kv_heads,
                                             std::int64_t head_dim, bool bf16) {
  const bool flash = bf16 && flash_attention_supported(head_dim, heads, kv_heads);
  return attention_d_floats(batch, seq, heads) +
         (flash ? flash_attention_scratch_floats(batch, seq, heads, kv_heads, head_dim) : 0);
}

// The LM head's vocabulary chunk for n rows: the logits of a chunk fit head_chunk_bytes, in
// multiples of 64 columns, at least 64 (or the whole vocabulary if smaller).
inline std::int64_t vocab_chunk(std::int64_t n, std::int64_t vocab, std::size_t head_chunk_bytes = kHeadChunkBytes) {
  const auto by_budget = static_cast<std::int64_t>(head_chunk_bytes / sizeof(float)) / std::max<std::int64_t>(n, 1);
  const std::int64_t v = std::max<std::int64_t>(vocab, 1);
  return std::clamp<std::int64_t>(by_budget / 64 * 64, std::min<std::int64_t>(64, v), v);
}

// The shape of one training step's products and attention.
struct StepShape {
  std::int64_t rows = 0, batch = 0, seq = 0;  // rows = batch x seq
  std::int64_t hidden = 0, q_dim = 0, qkv_dim = 0, intermediate = 0, vocab = 0;
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  bool bf16 = false;  // bf16 weights (mixed-precision products)
};

// Everything the CUDA backend allocates beside the callers' buffers for a step of this shape: the
// cuBLASLt workspace; two bf16 operand slots (bf16 products); the column-sum partials; attention's
// scratch; the loss's row statistics and the logits of one vocabulary chunk; a sum of squares'
// partials.
inline std::size_t step_scratch_bytes(const StepShape& s, std::size_t workspace_bytes = kWorkspaceBytes,
                                      std::size_t head_chunk_bytes = kHeadChunkBytes) {
  const std::int64_t n = s.rows, vc = vocab_chunk(n, s.vocab, head_chunk_bytes);
  const std::int64_t widest_in = std::max({s.hidden, s.q_dim, s.intermediate});
  const std::int64_t widest_out = std::max({s.hidden, s.qkv_dim, 2 * s.intermediate});
  std::size_t b = workspace_bytes;
  if (s.bf16) {
    b += static_cast<std::size_t>(n * std::max(widest_in, widest_out)) * 2;  // operand slot 0
    b += static_cast<std::size_t>(n * std::max(widest_in, vc)) * 2;          // operand slot 1
  }
  b += static_cast<std::size_t>(rmsnorm_partial_floats(n, widest_out)) * 4;
  b += static_cast<std::size_t>(attention_scratch_floats(s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, s.bf16)) * 4;
  b += static_cast<std::size_t>(3 * n) * 4 + static_cast<std::size_t>(n * vc) * 4;
  b += static_cast<std::size_t>(kSumSquaresPartials) * 8;
  return b;
}

}  // namespace zinf::kernels::cuda_scratch
