// Causal GQA flash attention on the tensor cores, in the style of FlashAttention-2: bf16 mma.sync
// (m16n8k16) with fp32 accumulation, the softmax and every accumulator in registers, and the
// seq x seq scores never in memory.
//
// q, k, v (and dO for the backward) are first packed into bf16 [head][batch][seq rounded up to 64]
// [head dim] with zero rows past the sequence, so every tile load is a whole, aligned 16-byte
// cp.async copy. Blocks of 4 warps own 64 rows (queries, or keys in the dK/dV kernel), 16 per warp;
// tiles of the other side stream through double-buffered shared memory (rows padded by 16 bytes so
// ldmatrix is free of bank conflicts). Fragments follow the PTX m16n8k16 layouts: an accumulator
// tile of S becomes the A operand of P.V without leaving the registers.
//
// Backward is two kernels without atomics: dQ per query tile, dK and dV per key tile (looping over
// the group's heads), so results do not depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cuda_ops.hpp"

namespace zinf::kernels::cuda {
namespace {

using i64 = std::int64_t;
using u32 = std::uint32_t;
using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // rows a block owns; also the key tile of the forward and dQ kernels
constexpr int kQTile = 32;     // query tile streamed by the dK/dV kernel
constexpr int kPad = 8;        // bf16 elements of padding per shared-memory row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Geo {
  i64 batch, seq, tp, heads, kv, group, ld, q_dim;
  float scale;
};

// ---- PTX wrappers ---------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16 x 8, fp32) += a (16 x 16, bf16, row) * b (16 x 8, bf16, col).
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}

// The A operand (rows r0 .. r0 + 16, columns k0 .. k0 + 16) of a row-major tile of row stride S.
template <int S>
__device__ __forceinline__ void frag_a(u32 (&a)[4], const bf16* base, int r0, int k0, int lane) {
  const int i = lane >> 3;
  ldsm_x4(a, base + (r0 + (i & 1) * 8 + (lane & 7)) * S + k0 + (i >> 1) * 8);
}

// B operands of two 8-column tiles (n0 and n0 + 8) at k0 .. k0 + 16, from a tile stored [n][k]
// (rows are the output columns, e.g. keys for Q.K^T): b[0], b[1] for n0; b[2], b[3] for n0 + 8.
template <int S>
__device__ __forceinline__ void frag_b_nk(u32 (&b)[4], const bf16* base, int n0, int k0, int lane) {
  const int i = lane >> 3;
  ldsm_x4(b, base + (n0 + (i >> 1) * 8 + (lane & 7)) * S + k0 + (i & 1) * 8);
}

// The same from a tile stored [k][n] (e.g. V for P.V), through the transposing ldmatrix.
template <int S>
__device__ __forceinline__ void frag_b_kn(u32 (&b)[4], const bf16* base, int k0, int n0, int lane) {
  const int i = lane >> 3;
  ldsm_x4_t(b, base + (k0 + (i & 1) * 8 + (lane & 7)) * S + n0 + (i >> 1) * 8);
}

// The A operand for k-step kk (columns 16 kk .. 16 kk + 16) from fp32 accumulator tiles.
__device__ __forceinline__ void acc_to_a(u32 (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack_bf16(lo[0], lo[1]);
  a[1] = pack_bf16(lo[2], lo[3]);
  a[2] = pack_bf16(hi[0], hi[1]);
  a[3] = pack_bf16(hi[2], hi[3]);
}

// R rows of a packed head (contiguous rows of HD) into shared memory, asynchronously.
template <int HD, int R>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src) {
  constexpr int kChunks = HD / 8;
#pragma unroll
  for (int i = threadIdx.x; i < R * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    cp_async16(dst + r * (HD + kPad) + c, src + static_cast<i64>(r) * HD + c);
  }
}

// Key/value tile j of a query tile's loop (tiles 0 .. last) is in buffer j & 1 once this returns;
// tile j + 1's copies are started first, into the other buffer (free since the loop's trailing
// barrier).
template <int HD>
__device__ __forceinline__ void kv_tile_ready(bf16* ks, bf16* vs, const bf16* kg, const bf16* vg, i64 j, i64 last) {
  constexpr int S = HD + kPad;
  if (j < last) {
    const int nb = static_cast<int>((j + 1) & 1);
    load_rows<HD, kRows>(ks + nb * kRows * S, kg + (j + 1) * kRows * HD);
    load_rows<HD, kRows>(vs + nb * kRows * S, vg + (j + 1) * kRows * HD);
  }
  cp_commit();
  cp_wait_one();
  __syncthreads();
}

template <int N>
__device__ __forceinline__ void zero_tiles(float (&a)[N][4]) {
#pragma unroll
  for (int t = 0; t < N; ++t) a[t][0] = a[t][1] = a[t][2] = a[t][3] = 0.0f;
}

// acc (16 x N per warp, N / 8 tiles) = A rows (row0 .. +16 of a) times B^T, B stored [n][k] (HD wide).
template <int HD, int N>
__device__ __forceinline__ void rows_times_t(float (&acc)[N / 8][4], const bf16* a, int row0, const bf16* b, int lane) {
  constexpr int S = HD + kPad;
  zero_tiles(acc);
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    u32 fa[4];
    frag_a<S>(fa, a, row0, kk * 16, lane);
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      u32 fb[4];
      frag_b_nk<S>(fb, b, n * 16, kk * 16, lane);
      mma(acc[2 * n], fa, fb[0], fb[1]);
      mma(acc[2 * n + 1], fa, fb[2], fb[3]);
    }
  }
}

// out (16 x HD per warp) += P (16 x N, accumulator tiles) times B, B stored [k][n] (N rows of HD).
template <int HD, int N>
__device__ __forceinline__ void acc_times(float (&out)[HD / 8][4], const float (&p)[N / 8][4], const bf16* b, int lane) {
  constexpr int S = HD + kPad;
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    u32 fa[4];
    acc_to_a(fa, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) {
      u32 fb[4];
      frag_b_kn<S>(fb, b, kk * 16, n * 16, lane);
      mma(out[2 * n], fa, fb[0], fb[1]);
      mma(out[2 * n + 1], fa, fb[2], fb[3]);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Row offsets (in rows of HD) of a head in the packed buffer [head][batch][tp].
__device__ __forceinline__ i64 q_rows(const Geo& g, i64 b, i64 head) { return (head * g.batch + b) * g.tp; }
__device__ __forceinline__ i64 k_rows(const Geo& g, i64 b, i64 kvh) { return ((g.heads + kvh) * g.batch + b) * g.tp; }
__device__ __forceinline__ i64 v_rows(const Geo& g, i64 b, i64 kvh) {
  return ((g.heads + g.kv + kvh) * g.batch + b) * g.tp;
}

// ---- packing ----------------------------------------------------------------------------------------

// dst [h][b][tp][hd] bf16 from src rows (b * seq + t) of stride ld, head h at columns h * hd.
__global__ void pack_k(bf16* dst, const float* src, i64 ld, i64 heads, int hd, i64 batch, i64 seq, i64 tp) {
  const i64 total = heads * batch * tp * hd / 4;
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 e = i * 4;
    const int c = static_cast<int>(e % hd);
    i64 rest = e / hd;
    const i64 t = rest % tp;
    rest /= tp;
    const i64 b = rest % batch, h = rest / batch;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t < seq) v = *reinterpret_cast<const float4*>(src + (b * seq + t) * ld + h * hd + c);
    uint2 o;
    o.x = pack_bf16(v.x, v.y);
    o.y = pack_bf16(v.z, v.w);
    *reinterpret_cast<uint2*>(dst + e) = o;
  }
}

// ---- forward ------------------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_forward_k(float* out, float* lse, const bf16* pk, Geo g) {
  constexpr int S = HD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);  // [64][S]
  bf16* ks = qs + kRows * S;                 // [2][64][S]
  bf16* vs = ks + 2 * kRows * S;             // [2][64][S]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tig = lane & 3;
  const i64 tiles = (g.seq + kRows - 1) / kRows;
  const i64 qt = tiles - 1 - blockIdx.x;  // the longest rows first
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = qt * kRows;
  const bf16* kg = pk + k_rows(g, b, kvh) * HD;
  const bf16* vg = pk + v_rows(g, b, kvh) * HD;
  load_rows<HD, kRows>(qs, pk + (q_rows(g, b, head) + t0) * HD);
  load_rows<HD, kRows>(ks, kg);
  load_rows<HD, kRows>(vs, vg);
  cp_commit();
  const int row0 = warp * 16;
  const float sl2 = g.scale * kLog2e;
  float o[HD / 8][4];
  zero_tiles(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (i64 j = 0; j <= qt; ++j) {
    kv_tile_ready<HD>(ks, vs, kg, vg, j, qt);
    const bf16* kt = ks + (j & 1) * kRows * S;
    const bf16* vt = vs + (j & 1) * kRows * S;
    float s[kRows / 8][4];
    rows_times_t<HD, kRows>(s, qs, row0, kt, lane);
    // Scale into the log2 domain, mask above the diagonal (only the last tile has such keys; it
    // also holds every key past the sequence a valid query could see).
    const bool diag = j == qt;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int t = 0; t < kRows / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + tig * 2 + (e & 1), row = row0 + gr + (e >> 1) * 8;
        const float x = (diag && col > row) ? -INFINITY : s[t][e] * sl2;
        s[t][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);  // finite: key 0 is visible to every row
      corr[r] = exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= corr[r];
    }
#pragma unroll
    for (int t = 0; t < kRows / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[t][e] - m[e >> 1]);
        s[t][e] = p;
        l[e >> 1] += p;
      }
    }
#pragma unroll
    for (int t = 0; t < HD / 8; ++t) {
      o[t][0] *= corr[0];
      o[t][1] *= corr[0];
      o[t][2] *= corr[1];
      o[t][3] *= corr[1];
    }
    acc_times<HD, kRows>(o, s, vt, lane);
    __syncthreads();  // the next iteration's loads overwrite this buffer
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lr = quad_sum(l[r]);
    const i64 t = t0 + row0 + gr + r * 8;
    if (t >= g.seq) continue;
    const float inv = 1.0f / lr;
    float* orow = out + (b * g.seq + t) * g.q_dim + head * HD + tig * 2;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      *reinterpret_cast<float2*>(orow + n * 8) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    if (tig == 0) lse[bh * g.seq + t] = (m[r] + log2f(lr)) * kLn2;
  }
}

// ---- backward: dQ -------------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_dq_k(float* dqkv, const bf16* pk, const bf16* pdo, const float* lse,
                                                    const float* dd, Geo g) {
  constexpr int S = HD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);  // [64][S]
  bf16* dos = qs + kRows * S;                // [64][S]
  bf16* ks = dos + kRows * S;                // [2][64][S]
  bf16* vs = ks + 2 * kRows * S;             // [2][64][S]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tig = lane & 3;
  const i64 tiles = (g.seq + kRows - 1) / kRows;
  const i64 qt = tiles - 1 - blockIdx.x;
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = qt * kRows;
  const bf16* kg = pk + k_rows(g, b, kvh) * HD;
  const bf16* vg = pk + v_rows(g, b, kvh) * HD;
  load_rows<HD, kRows>(qs, pk + (q_rows(g, b, head) + t0) * HD);
  load_rows<HD, kRows>(dos, pdo + (q_rows(g, b, head) + t0) * HD);
  load_rows<HD, kRows>(ks, kg);
  load_rows<HD, kRows>(vs, vg);
  cp_commit();
  const int row0 = warp * 16;
  const float sl2 = g.scale * kLog2e;
  float lse2[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 t = t0 + row0 + gr + r * 8;
    lse2[r] = t < g.seq ? lse[bh * g.seq + t] * kLog2e : 0.0f;
    drow[r] = t < g.seq ? dd[bh * g.seq + t] : 0.0f;
  }
  float dq[HD / 8][4];
  zero_tiles(dq);
  for (i64 j = 0; j <= qt; ++j) {
    kv_tile_ready<HD>(ks, vs, kg, vg, j, qt);
    const bf16* kt = ks + (j & 1) * kRows * S;
    const bf16* vt = vs + (j & 1) * kRows * S;
    float s[kRows / 8][4], dp[kRows / 8][4];
    rows_times_t<HD, kRows>(s, qs, row0, kt, lane);
    rows_times_t<HD, kRows>(dp, dos, row0, vt, lane);
    const bool diag = j == qt;
#pragma unroll
    for (int t = 0; t < kRows / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + tig * 2 + (e & 1), row = row0 + gr + (e >> 1) * 8;
        const float p = (diag && col > row) ? 0.0f : exp2f(s[t][e] * sl2 - lse2[e >> 1]);
        s[t][e] = p * (dp[t][e] - drow[e >> 1]);
      }
    }
    acc_times<HD, kRows>(dq, s, kt, lane);  // dQ += dS K
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 t = t0 + row0 + gr + r * 8;
    if (t >= g.seq) continue;
    float* row = dqkv + (b * g.seq + t) * g.ld + head * HD + tig * 2;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      *reinterpret_cast<float2*>(row + n * 8) = make_float2(dq[n][2 * r] * g.scale, dq[n][2 * r + 1] * g.scale);
    }
  }
}

// ---- backward: dK, dV -----------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(kThreads) fa_dkv_k(float* dqkv, const bf16* pk, const bf16* pdo, const float* lse,
                                                     const float* dd, Geo g) {
  constexpr int S = HD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);  // [64][S]
  bf16* vs = ks + kRows * S;                 // [64][S]
  bf16* qs = vs + kRows * S;                 // [2][32][S]
  bf16* dos = qs + 2 * kQTile * S;           // [2][32][S]
  float* lq = reinterpret_cast<float*>(dos + 2 * kQTile * S);  // [2][32] lse (log2 domain)
  float* dq_ = lq + 2 * kQTile;                                // [2][32] D
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tig = lane & 3;
  const i64 bk = blockIdx.y, b = bk / g.kv, kvh = bk % g.kv;
  const i64 j0 = static_cast<i64>(blockIdx.x) * kRows;  // the longest columns first
  load_rows<HD, kRows>(ks, pk + (k_rows(g, b, kvh) + j0) * HD);
  load_rows<HD, kRows>(vs, pk + (v_rows(g, b, kvh) + j0) * HD);
  // Query tiles from the block's first key to the end, for each head of the group.
  const i64 nq = (g.seq - j0 + kQTile - 1) / kQTile, total = nq * g.group;
  auto fetch = [&](i64 it, int buf) {
    const i64 head = kvh * g.group + it / nq, q0 = j0 + (it % nq) * kQTile;
    load_rows<HD, kQTile>(qs + buf * kQTile * S, pk + (q_rows(g, b, head) + q0) * HD);
    load_rows<HD, kQTile>(dos + buf * kQTile * S, pdo + (q_rows(g, b, head) + q0) * HD);
    if (threadIdx.x < kQTile) {
      const i64 q = q0 + threadIdx.x, bh = b * g.heads + head;
      lq[buf * kQTile + threadIdx.x] = q < g.seq ? lse[bh * g.seq + q] * kLog2e : 0.0f;
      dq_[buf * kQTile + threadIdx.x] = q < g.seq ? dd[bh * g.seq + q] : 0.0f;
    }
  };
  fetch(0, 0);
  cp_commit();
  const int row0 = warp * 16;
  const float sl2 = g.scale * kLog2e;
  float dk[HD / 8][4], dv[HD / 8][4];
  zero_tiles(dk);
  zero_tiles(dv);
  for (i64 it = 0; it < total; ++it) {
    const int cur = static_cast<int>(it & 1);
    if (it + 1 < total) fetch(it + 1, cur ^ 1);
    cp_commit();
    cp_wait_one();
    __syncthreads();
    const bf16* qt = qs + cur * kQTile * S;
    const bf16* dot = dos + cur * kQTile * S;
    const float* lt = lq + cur * kQTile;
    const float* dt = dq_ + cur * kQTile;
    const i64 q0 = j0 + (it % nq) * kQTile;
    float st[kQTile / 8][4], dpt[kQTile / 8][4];
    rows_times_t<HD, kQTile>(st, ks, row0, qt, lane);   // S^T = K Q^T
    rows_times_t<HD, kQTile>(dpt, vs, row0, dot, lane);  // dP^T = V dO^T
#pragma unroll
    for (int t = 0; t < kQTile / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + tig * 2 + (e & 1);
        const i64 key = j0 + row0 + gr + (e >> 1) * 8, q = q0 + col;
        const float p = (q >= key && q < g.seq) ? exp2f(st[t][e] * sl2 - lt[col]) : 0.0f;
        st[t][e] = p;
        dpt[t][e] = p * (dpt[t][e] - dt[col]);
      }
    }
    acc_times<HD, kQTile>(dv, st, dot, lane);  // dV += P^T dO
    acc_times<HD, kQTile>(dk, dpt, qt, lane);  // dK += dS^T Q
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 j = j0 + row0 + gr + r * 8;
    if (j >= g.seq) continue;
    float* dkr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + kvh * HD + tig * 2;
    float* dvr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + (g.kv + kvh) * HD + tig * 2;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      *reinterpret_cast<float2*>(dkr + n * 8) = make_float2(dk[n][2 * r] * g.scale, dk[n][2 * r + 1] * g.scale);
      *reinterpret_cast<float2*>(dvr + n * 8) = make_float2(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------


template <typename K>
void allow_smem(K kernel, std::size_t bytes) {
  cuda_allow_shared_memory(reinterpret_cast<const void*>(kernel), bytes, "flash attention");
}

static_assert(kRows == cuda_scratch::kAttentionRows, "the scratch sizing pads sequences to the row tile");
i64 padded_seq(i64 seq) { return cuda_scratch::padded_seq(seq); }

Geo make_geo(const AttentionDims& d) {
  if (d.batch * d.heads > 65535) {
    throw Error("flash attention: batch x heads = {} exceeds the 65535 blocks a grid row may hold; use a smaller micro-batch",
                d.batch * d.heads);
  }
  return {d.batch, d.seq, padded_seq(d.seq), d.heads, d.kv_heads, d.heads / d.kv_heads,
          (d.heads + 2 * d.kv_heads) * d.hd, d.heads * d.hd, d.scale};
}

// Packed elements (bf16) of q, k and v; dO follows them.
i64 packed_qkv(const AttentionDims& d) { return cuda_scratch::flash_packed_qkv(d.batch, d.seq, d.heads, d.kv_heads, d.hd); }

void pack(bf16* dst, const float* src, i64 ld, i64 heads, const AttentionDims& d, cudaStream_t stream) {
  const i64 groups = heads * d.batch * padded_seq(d.seq) * d.hd / 4;
  const unsigned blocks = static_cast<unsigned>(std::min<i64>((groups + 255) / 256, 65535));
  pack_k<<<blocks, 256, 0, stream>>>(dst, src, ld, heads, static_cast<int>(d.hd), d.batch, d.seq, padded_seq(d.seq));
  cuda_check_launch("flash attention (pack)");
}

template <int HD>
std::size_t forward_smem() {
  return static_cast<std::size_t>(5 * kRows * (HD + kPad)) * sizeof(bf16);
}
template <int HD>
std::size_t dq_smem() {
  return static_cast<std::size_t>(6 * kRows * (HD + kPad)) * sizeof(bf16);
}
template <int HD>
std::size_t dkv_smem() {
  return static_cast<std::size_t>((2 * kRows + 4 * kQTile) * (HD + kPad)) * sizeof(bf16) + 4 * kQTile * sizeof(float);
}

template <int HD>
void forward_hd(float* out, float* lse, const bf16* pk, const Geo& g, cudaStream_t stream) {
  allow_smem(fa_forward_k<HD>, forward_smem<HD>());
  const dim3 grid(static_cast<unsigned>(g.tp / kRows), static_cast<unsigned>(g.batch * g.heads));
  fa_forward_k<HD><<<grid, kThreads, forward_smem<HD>(), stream>>>(out, lse, pk, g);
  cuda_check_launch("flash attention forward");
}

template <int HD>
void backward_hd(float* dqkv, const float* dd, const bf16* pk, const bf16* pdo, const float* lse, const Geo& g,
                 cudaStream_t stream) {
  allow_smem(fa_dq_k<HD>, dq_smem<HD>());
  const dim3 grid_q(static_cast<unsigned>(g.tp / kRows), static_cast<unsigned>(g.batch * g.heads));
  fa_dq_k<HD><<<grid_q, kThreads, dq_smem<HD>(), stream>>>(dqkv, pk, pdo, lse, dd, g);
  cuda_check_launch("flash attention backward (dQ)");
  allow_smem(fa_dkv_k<HD>, dkv_smem<HD>());
  const dim3 grid_kv(static_cast<unsigned>(g.tp / kRows), static_cast<unsigned>(g.batch * g.kv));
  fa_dkv_k<HD><<<grid_kv, kThreads, dkv_smem<HD>(), stream>>>(dqkv, pk, pdo, lse, dd, g);
  cuda_check_launch("flash attention backward (dK, dV)");
}

bf16* as_bf16(float* scratch) { return reinterpret_cast<bf16*>(scratch); }

}  // namespace

bool flash_attention_supported(const AttentionDims& d) {
  return cuda_scratch::flash_attention_supported(d.hd, d.heads, d.kv_heads);
}

std::int64_t flash_attention_scratch_floats(const AttentionDims& d) {
  return cuda_scratch::flash_attention_scratch_floats(d.batch, d.seq, d.heads, d.kv_heads, d.hd);
}

void flash_attention_forward(float* out, float* lse, float* scratch, const float* qkv, const AttentionDims& d,
                             cudaStream_t stream) {
  if (d.hd != 64 && d.hd != 128) throw Error("flash attention: head dim {} is not 64 or 128", d.hd);
  const Geo g = make_geo(d);
  bf16* pk = as_bf16(scratch);
  pack(pk, qkv, g.ld, d.heads + 2 * d.kv_heads, d, stream);
  if (d.hd == 64) {
    forward_hd<64>(out, lse, pk, g, stream);
  } else {
    forward_hd<128>(out, lse, pk, g, stream);
  }
}

void flash_attention_backward(float* dqkv, float* scratch, const float* dd, const float* dout, const float* qkv,
                              const float* lse, const AttentionDims& d, cudaStream_t stream) {
  if (d.hd != 64 && d.hd != 128) throw Error("flash attention: head dim {} is not 64 or 128", d.hd);
  const Geo g = make_geo(d);
  bf16* pk = as_bf16(scratch);
  bf16* pdo = pk + packed_qkv(d);  // packed_qkv is a multiple of 64 elements: 16-byte aligned
  pack(pk, qkv, g.ld, d.heads + 2 * d.kv_heads, d, stream);
  pack(pdo, dout, g.q_dim, d.heads, d, stream);
  if (d.hd == 64) {
    backward_hd<64>(dqkv, dd, pk, pdo, lse, g, stream);
  } else {
    backward_hd<128>(dqkv, dd, pk, pdo, lse, g, stream);
  }
}

}  // namespace zinf::kernels::cuda
