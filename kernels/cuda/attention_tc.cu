// Causal GQA flash attention on the tensor cores (bf16 mma, fp32 accumulation and softmax), in
// the style of FlashAttention-2: the seq x seq scores never exist in memory.
//
// Blocks of 4 warps take 64 rows (queries, or keys in the dK/dV kernel); each warp owns 16 of
// them. Tiles of 64 rows of the other side stream through shared memory, rounded to bf16 as they
// are loaded (q, k, v and dO are fp32 in the interface). Backward is two kernels without atomics:
// dQ per query tile, dK and dV per key tile (looping over the group's heads), so results do not
// depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cfloat>
#include <cstdint>

#include "zinf/common/error.hpp"
#include "zinf/kernels/cuda_ops.hpp"

namespace zinf::kernels::cuda {
namespace {

using namespace nvcuda;
using i64 = std::int64_t;
using bf16 = __nv_bfloat16;

constexpr int kRows = 64;  // rows per block (4 warps x 16)
constexpr int kCols = 64;  // rows of the streamed tile
constexpr int kThreads = 128;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct TcGeo {
  i64 batch, seq, heads, kv, ld, q_dim, group;
  float scale;
};

// Rows [r0, r0 + 64) of a head's q, k or v (columns col0 .. col0 + HD of qkv rows of stride ld),
// or of dO (stride q_dim), into shared bf16 [64][HD]; rows past seq are zero.
template <int HD>
__device__ void load_tile(bf16* dst, const float* src, i64 ld, i64 col0, i64 b, i64 r0, i64 seq) {
  for (int idx = threadIdx.x; idx < kRows * HD / 4; idx += kThreads) {
    const int r = idx / (HD / 4), c = (idx % (HD / 4)) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r0 + r < seq) v = *reinterpret_cast<const float4*>(src + (b * seq + r0 + r) * ld + col0 + c);
    bf16* d = dst + r * HD + c;
    d[0] = __float2bfloat16_rn(v.x);
    d[1] = __float2bfloat16_rn(v.y);
    d[2] = __float2bfloat16_rn(v.z);
    d[3] = __float2bfloat16_rn(v.w);
  }
}

// C (16 x 64, fp32, ld 64) = A (16 x HD rows of `a`, ld HD) times B^T where B is 64 x HD (ld HD).
template <int HD>
__device__ void rows_times_tile_t(float* c, const bf16* a, const bf16* b) {
#pragma unroll
  for (int n = 0; n < kCols / 16; ++n) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int k = 0; k < HD / 16; ++k) {
      FragA fa;
      FragBCol fb;
      wmma::load_matrix_sync(fa, a + k * 16, HD);
      wmma::load_matrix_sync(fb, b + n * 16 * HD + k * 16, HD);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n * 16, acc, kCols, wmma::mem_row_major);
  }
}

// Keys and values k0 .. k0 + 64 of kv head kvh, between barriers (the previous tile is no longer
// read; the new one is complete).
template <int HD>
__device__ void load_kv(bf16* ks, bf16* vs, const float* qkv, const TcGeo& g, i64 b, i64 kvh, i64 k0) {
  __syncthreads();
  load_tile<HD>(ks, qkv, g.ld, g.q_dim + kvh * HD, b, k0, g.seq);
  load_tile<HD>(vs, qkv, g.ld, g.q_dim + (g.kv + kvh) * HD, b, k0, g.seq);
  __syncthreads();
}

// ---- forward ------------------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_forward_k(float* out, float* lse, const float* qkv, TcGeo g) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + kRows * HD;
  bf16* vs = ks + kCols * HD;
  float* ss = reinterpret_cast<float*>(vs + kCols * HD);  // [64][64]
  bf16* ps = reinterpret_cast<bf16*>(ss + kRows * kCols);  // [64][64]
  float* os = reinterpret_cast<float*>(ps + kRows * kCols);  // [64][HD]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = static_cast<i64>(blockIdx.x) * kRows;
  load_tile<HD>(qs, qkv, g.ld, head * HD, b, t0, g.seq);
  for (int idx = threadIdx.x; idx < kRows * HD; idx += kThreads) os[idx] = 0.0f;
  // Lane pairs own a row: row r = lane / 2 of the warp's 16, columns half * 32 .. + 32.
  const int r = lane >> 1, half = lane & 1;
  const i64 t = t0 + warp * 16 + r;
  float m = -INFINITY, l = 0.0f;
  const i64 last = (t0 + kRows - 1 < g.seq ? t0 + kRows - 1 : g.seq - 1);
  float* srow = ss + (warp * 16 + r) * kCols;
  bf16* prow = ps + (warp * 16 + r) * kCols;
  float* orow = os + (warp * 16 + r) * HD;
  for (i64 k0 = 0; k0 <= last; k0 += kCols) {
    load_kv<HD>(ks, vs, qkv, g, b, kvh, k0);
    rows_times_tile_t<HD>(ss + warp * 16 * kCols, qs + warp * 16 * HD, ks);
    __syncwarp();
    float mx = -INFINITY;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const i64 key = k0 + c;
      const float s = (key <= t && t < g.seq) ? srow[c] * g.scale : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const float p = __expf(srow[c] - m_use);
      const bf16 pb = __float2bfloat16_rn(p);
      prow[c] = pb;
      sum += __bfloat162float(pb);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float corr = m == -INFINITY ? 0.0f : __expf(m - m_use);
    l = l * corr + sum;
    m = m_new;
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) orow[c] *= corr;
    __syncwarp();
    // O_w (16 x HD) += P_w (16 x 64) V (64 x HD)
#pragma unroll
    for (int d = 0; d < HD / 16; ++d) {
      FragAcc acc;
      wmma::load_matrix_sync(acc, os + warp * 16 * HD + d * 16, HD, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kCols / 16; ++k) {
        FragA fa;
        FragBRow fb;
        wmma::load_matrix_sync(fa, ps + warp * 16 * kCols + k * 16, kCols);
        wmma::load_matrix_sync(fb, vs + k * 16 * HD + d * 16, HD);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(os + warp * 16 * HD + d * 16, acc, HD, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (t >= g.seq) return;
  const float inv = 1.0f / l;
  float* o = out + (b * g.seq + t) * g.q_dim + head * HD;
  for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) o[c] = orow[c] * inv;
  if (half == 0) lse[(b * g.heads + head) * g.seq + t] = m + logf(l);
}

// ---- backward: dQ -------------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_dq_k(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                                    const float* dd, TcGeo g) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* dos = qs + kRows * HD;
  bf16* ks = dos + kRows * HD;
  bf16* vs = ks + kCols * HD;
  float* ss = reinterpret_cast<float*>(vs + kCols * HD);  // S, then reused
  float* dps = ss + kRows * kCols;
  bf16* dss = reinterpret_cast<bf16*>(dps + kRows * kCols);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = static_cast<i64>(blockIdx.x) * kRows;
  load_tile<HD>(qs, qkv, g.ld, head * HD, b, t0, g.seq);
  load_tile<HD>(dos, dout, g.q_dim, head * HD, b, t0, g.seq);
  const int r = lane >> 1, half = lane & 1;
  const i64 t = t0 + warp * 16 + r;
  const float lrow = t < g.seq ? lse[(b * g.heads + head) * g.seq + t] : 0.0f;
  const float drow = t < g.seq ? dd[(b * g.heads + head) * g.seq + t] : 0.0f;
  FragAcc acc[HD / 16];
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) wmma::fill_fragment(acc[d], 0.0f);
  const i64 last = (t0 + kRows - 1 < g.seq ? t0 + kRows - 1 : g.seq - 1);
  float* srow = ss + (warp * 16 + r) * kCols;
  float* dprow = dps + (warp * 16 + r) * kCols;
  bf16* dsrow = dss + (warp * 16 + r) * kCols;
  for (i64 k0 = 0; k0 <= last; k0 += kCols) {
    load_kv<HD>(ks, vs, qkv, g, b, kvh, k0);
    rows_times_tile_t<HD>(ss + warp * 16 * kCols, qs + warp * 16 * HD, ks);
    rows_times_tile_t<HD>(dps + warp * 16 * kCols, dos + warp * 16 * HD, vs);
    __syncwarp();
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const i64 key = k0 + c;
      const bool valid = key <= t && t < g.seq;
      const float p = valid ? __expf(srow[c] * g.scale - lrow) : 0.0f;
      dsrow[c] = __float2bfloat16_rn(p * (dprow[c] - drow));
    }
    __syncwarp();
    // dQ_w (16 x HD) += dS_w (16 x 64) K (64 x HD)
#pragma unroll
    for (int d = 0; d < HD / 16; ++d) {
#pragma unroll
      for (int k = 0; k < kCols / 16; ++k) {
        FragA fa;
        FragBRow fb;
        wmma::load_matrix_sync(fa, dss + warp * 16 * kCols + k * 16, kCols);
        wmma::load_matrix_sync(fb, ks + k * 16 * HD + d * 16, HD);
        wmma::mma_sync(acc[d], fa, fb, acc[d]);
      }
    }
  }
  __syncthreads();
  // Through shared memory (the S buffer) to global, scaled.
  float* stage = ss + warp * 16 * HD;  // 16 x HD per warp fits in the two fp32 buffers
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) wmma::store_matrix_sync(stage + d * 16, acc[d], HD, wmma::mem_row_major);
  __syncwarp();
  if (t >= g.seq) return;
  float* dq = dqkv + (b * g.seq + t) * g.ld + head * HD;
  for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) dq[c] = stage[r * HD + c] * g.scale;
}

// ---- backward: dK, dV -----------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_dkv_k(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                                     const float* dd, TcGeo g) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + kRows * HD;
  bf16* qs = vs + kRows * HD;
  bf16* dos = qs + kCols * HD;
  float* sts = reinterpret_cast<float*>(dos + kCols * HD);  // S^T [key][query]
  float* dpts = sts + kRows * kCols;                       // dP^T
  bf16* pts = reinterpret_cast<bf16*>(dpts + kRows * kCols);
  bf16* dsts = pts + kRows * kCols;
  float* lq = reinterpret_cast<float*>(dsts + kRows * kCols);  // lse and D of the query tile
  float* dq_ = lq + kCols;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bk = blockIdx.y, b = bk / g.kv, kvh = bk % g.kv;
  const i64 j0 = static_cast<i64>(blockIdx.x) * kRows;
  load_tile<HD>(ks, qkv, g.ld, g.q_dim + kvh * HD, b, j0, g.seq);
  load_tile<HD>(vs, qkv, g.ld, g.q_dim + (g.kv + kvh) * HD, b, j0, g.seq);
  const int r = lane >> 1, half = lane & 1;
  const i64 j = j0 + warp * 16 + r;
  FragAcc dk[HD / 16], dv[HD / 16];
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) {
    wmma::fill_fragment(dk[d], 0.0f);
    wmma::fill_fragment(dv[d], 0.0f);
  }
  float* strow = sts + (warp * 16 + r) * kCols;
  float* dptrow = dpts + (warp * 16 + r) * kCols;
  bf16* ptrow = pts + (warp * 16 + r) * kCols;
  bf16* dstrow = dsts + (warp * 16 + r) * kCols;
  for (i64 hh = 0; hh < g.group; ++hh) {
    const i64 head = kvh * g.group + hh;
    for (i64 q0 = j0; q0 < g.seq; q0 += kCols) {  // queries before the first key see none of these keys
      __syncthreads();
      load_tile<HD>(qs, qkv, g.ld, head * HD, b, q0, g.seq);
      load_tile<HD>(dos, dout, g.q_dim, head * HD, b, q0, g.seq);
      for (int i = threadIdx.x; i < kCols; i += kThreads) {
        const bool in = q0 + i < g.seq;
        lq[i] = in ? lse[(b * g.heads + head) * g.seq + q0 + i] : 0.0f;
        dq_[i] = in ? dd[(b * g.heads + head) * g.seq + q0 + i] : 0.0f;
      }
      __syncthreads();
      // S^T_w (16 keys x 64 queries) = K_w Q^T;  dP^T_w = V_w dO^T
      rows_times_tile_t<HD>(sts + warp * 16 * kCols, ks + warp * 16 * HD, qs);
      rows_times_tile_t<HD>(dpts + warp * 16 * kCols, vs + warp * 16 * HD, dos);
      __syncwarp();
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const i64 qi = q0 + c;
        const bool valid = qi >= j && qi < g.seq && j < g.seq;
        const float p = valid ? __expf(strow[c] * g.scale - lq[c]) : 0.0f;
        ptrow[c] = __float2bfloat16_rn(p);
        dstrow[c] = __float2bfloat16_rn(p * (dptrow[c] - dq_[c]));
      }
      __syncwarp();
      // dV_w += P^T_w dO;  dK_w += dS^T_w Q
#pragma unroll
      for (int d = 0; d < HD / 16; ++d) {
#pragma unroll
        for (int k = 0; k < kCols / 16; ++k) {
          FragA fp, fds;
          FragBRow fdo, fq;
          wmma::load_matrix_sync(fp, pts + warp * 16 * kCols + k * 16, kCols);
          wmma::load_matrix_sync(fds, dsts + warp * 16 * kCols + k * 16, kCols);
          wmma::load_matrix_sync(fdo, dos + k * 16 * HD + d * 16, HD);
          wmma::load_matrix_sync(fq, qs + k * 16 * HD + d * 16, HD);
          wmma::mma_sync(dv[d], fp, fdo, dv[d]);
          wmma::mma_sync(dk[d], fds, fq, dk[d]);
        }
      }
    }
  }
  __syncthreads();
  float* stage = sts + warp * 16 * HD;  // 16 x HD per warp, in the two fp32 buffers
  float* dkr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + kvh * HD;
  float* dvr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + (g.kv + kvh) * HD;
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) wmma::store_matrix_sync(stage + d * 16, dk[d], HD, wmma::mem_row_major);
  __syncwarp();
  if (j < g.seq) {
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) dkr[c] = stage[r * HD + c] * g.scale;
  }
  __syncwarp();
#pragma unroll
  for (int d = 0; d < HD / 16; ++d) wmma::store_matrix_sync(stage + d * 16, dv[d], HD, wmma::mem_row_major);
  __syncwarp();
  if (j < g.seq) {
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) dvr[c] = stage[r * HD + c];
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error("CUDA kernel {} failed to launch: {} ({})", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

template <typename K>
void allow_smem(K kernel, std::size_t bytes) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e != cudaSuccess) throw Error("flash attention: {} KiB of shared memory is not available: {}", bytes / 1024, cudaGetErrorString(e));
}

TcGeo tc_geo(const AttentionDims& d) {
  if (d.batch * d.heads > 65535) {
    throw Error("flash attention: batch x heads = {} exceeds the 65535 blocks a grid row may hold; use a smaller micro-batch",
                d.batch * d.heads);
  }
  return {d.batch, d.seq, d.heads, d.kv_heads, (d.heads + 2 * d.kv_heads) * d.hd, d.heads * d.hd,
          d.heads / d.kv_heads, d.scale};
}

template <int HD>
void forward_hd(float* out, float* lse, const float* qkv, const AttentionDims& d, cudaStream_t stream) {
  const TcGeo g = tc_geo(d);
  const std::size_t smem = (3 * kRows * HD + kRows * kCols) * sizeof(bf16) + (kRows * kCols + kRows * HD) * sizeof(float);
  allow_smem(fa_forward_k<HD>, smem);
  const dim3 grid(static_cast<unsigned>((g.seq + kRows - 1) / kRows), static_cast<unsigned>(g.batch * g.heads));
  fa_forward_k<HD><<<grid, kThreads, smem, stream>>>(out, lse, qkv, g);
  check_launch("flash attention forward");
}

template <int HD>
void backward_hd(float* dqkv, const float* dd, const float* dout, const float* qkv, const float* lse,
                 const AttentionDims& d, cudaStream_t stream) {
  const TcGeo g = tc_geo(d);
  const std::size_t smem_q = 4 * kRows * HD * sizeof(bf16) + 2 * kRows * kCols * sizeof(float) + kRows * kCols * sizeof(bf16);
  allow_smem(fa_dq_k<HD>, smem_q);
  const dim3 grid_q(static_cast<unsigned>((g.seq + kRows - 1) / kRows), static_cast<unsigned>(g.batch * g.heads));
  fa_dq_k<HD><<<grid_q, kThreads, smem_q, stream>>>(dqkv, dout, qkv, lse, dd, g);
  check_launch("flash attention backward (dQ)");
  const std::size_t smem_kv = 4 * kRows * HD * sizeof(bf16) + 2 * kRows * kCols * sizeof(float) +
                              2 * kRows * kCols * sizeof(bf16) + 2 * kCols * sizeof(float);
  allow_smem(fa_dkv_k<HD>, smem_kv);
  const dim3 grid_kv(static_cast<unsigned>((g.seq + kRows - 1) / kRows), static_cast<unsigned>(g.batch * g.kv));
  fa_dkv_k<HD><<<grid_kv, kThreads, smem_kv, stream>>>(dqkv, dout, qkv, lse, dd, g);
  check_launch("flash attention backward (dK, dV)");
}

}  // namespace

bool flash_attention_supported(const AttentionDims& d) {
  return (d.hd == 64 || d.hd == 128) && d.heads % d.kv_heads == 0;
}

void flash_attention_forward(float* out, float* lse, const float* qkv, const AttentionDims& d, cudaStream_t stream) {
  if (d.hd == 64) {
    forward_hd<64>(out, lse, qkv, d, stream);
  } else if (d.hd == 128) {
    forward_hd<128>(out, lse, qkv, d, stream);
  } else {
    throw Error("flash attention: head dim {} is not 64 or 128", d.hd);
  }
}

void flash_attention_backward(float* dqkv, const float* dd, const float* dout, const float* qkv, const float* lse,
                              const AttentionDims& d, cudaStream_t stream) {
  if (d.hd == 64) {
    backward_hd<64>(dqkv, dd, dout, qkv, lse, d, stream);
  } else if (d.hd == 128) {
    backward_hd<128>(dqkv, dd, dout, qkv, lse, d, stream);
  } else {
    throw Error("flash attention: head dim {} is not 64 or 128", d.hd);
  }
}

}  // namespace zinf::kernels::cuda
