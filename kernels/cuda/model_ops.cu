// The model's GPU kernels (cuda_ops.hpp). fp32 arithmetic throughout, weights read as fp32 or
// bf16; every reduction, the embedding's scatter-add included, runs in a fixed order (no atomics).
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cuda_ops.hpp"
#include "zinf/kernels/dropout.hpp"

namespace zinf::kernels::cuda {
namespace {

using i64 = std::int64_t;


unsigned blocks_for(i64 count, int threads, i64 cap = 1 << 20) {
  const i64 b = (count + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > cap ? cap : b));
}

__device__ __forceinline__ float load_w(const void* w, bool bf16, i64 i) {
  if (bf16) return __uint_as_float(static_cast<unsigned>(static_cast<const std::uint16_t*>(w)[i]) << 16);
  return static_cast<const float*>(w)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of `threads` (a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* shared32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float t = lane < warps ? shared32[lane] : 0.0f;
  t = warp_sum(t);
  return t;
}

// ---- embedding -------------------------------------------------------------------------------

__global__ void embedding_forward_k(float* out, const void* table, bool bf16, const std::int32_t* tokens, i64 n, i64 h) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < n * h;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = idx / h, c = idx % h;
    out[idx] = load_w(table, bf16, static_cast<i64>(tokens[r]) * h + c);
  }
}

// Deterministic (no atomics): the thread of column c and residue k adds, in row order, the rows
// whose token is k mod kEmbedResidues. Every (token, column) sum has one owner and one order, so
// the result is the same run to run; the residues spread the work over the GPU.
constexpr int kEmbedResidues = 32;
constexpr int kEmbedTokens = 1024;  // tokens staged in shared memory at a time

__global__ void embedding_backward_k(float* dtable, const float* dout, const std::int32_t* tokens, i64 n, i64 h) {
  __shared__ std::int32_t tok[kEmbedTokens];
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  const int k = static_cast<int>(blockIdx.y);
  for (i64 r0 = 0; r0 < n; r0 += kEmbedTokens) {
    const int count = static_cast<int>(n - r0 < kEmbedTokens ? n - r0 : kEmbedTokens);
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) tok[i] = tokens[r0 + i];
    __syncthreads();
    if (c >= h) continue;
    for (int i = 0; i < count; ++i) {
      const std::int32_t t = tok[i];
      if (t % kEmbedResidues != k) continue;
      dtable[static_cast<i64>(t) * h + c] += dout[(r0 + i) * h + c];
    }
  }
}

// ---- rmsnorm ----------------------------------------------------------------------------------

constexpr int kRowThreads = 256;
constexpr i64 kPartialRows = cuda_scratch::kPartialRows;  // rows per partial column sum

__global__ void rmsnorm_forward_k(float* y, float* rstd, const float* x, const void* w, bool bf16, i64 h, float eps) {
  __shared__ float red[32];
  const i64 r = blockIdx.x;
  const float* xi = x + r * h;
  float ss = 0.0f;
  for (i64 j = threadIdx.x; j < h; j += blockDim.x) ss += xi[j] * xi[j];
  ss = block_sum(ss, red);
  const float rs = 1.0f / sqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  float* yi = y + r * h;
  for (i64 j = threadIdx.x; j < h; j += blockDim.x) yi[j] = load_w(w, bf16, j) * (xi[j] * rs);
}

__global__ void rmsnorm_backward_dx_k(float* dx, const float* dy, const float* x, const void* w, bool bf16,
                                      const float* rstd, i64 h) {
  __shared__ float red[32];
  const i64 r = blockIdx.x;
  const float* xi = x + r * h;
  const float* dyi = dy + r * h;
  const float rs = rstd[r];
  float dot = 0.0f;
  for (i64 j = threadIdx.x; j < h; j += blockDim.x) dot += load_w(w, bf16, j) * dyi[j] * xi[j];
  dot = block_sum(dot, red);
  const float c = dot * rs * rs * rs / static_cast<float>(h);
  float* dxi = dx + r * h;
  for (i64 j = threadIdx.x; j < h; j += blockDim.x) dxi[j] += rs * (load_w(w, bf16, j) * dyi[j]) - xi[j] * c;
}

// partial[b][c] = sum over rows [b*64, b*64+64) of f(row, c); f = dy * x * rstd (rmsnorm) or dy.
__global__ void column_partials_k(float* partial, const float* dy, const float* x, const float* rstd, i64 n, i64 cols) {
  const i64 b = blockIdx.y;
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const i64 r0 = b * kPartialRows, r1 = r0 + kPartialRows < n ? r0 + kPartialRows : n;
  float s = 0.0f;
  for (i64 r = r0; r < r1; ++r) s += x != nullptr ? dy[r * cols + c] * (x[r * cols + c] * rstd[r]) : dy[r * cols + c];
  partial[b * cols + c] = s;
}

__global__ void reduce_partials_k(float* out, const float* partial, i64 blocks, i64 cols) {
  const i64 c = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f;
  for (i64 b = 0; b < blocks; ++b) s += partial[b * cols + c];
  out[c] += s;
}

void column_reduce(float* out, float* partial, const float* dy, const float* x, const float* rstd, i64 n, i64 cols,
                   cudaStream_t stream) {
  const i64 blocks = (n + kPartialRows - 1) / kPartialRows;
  if (blocks > 65535) {
    throw Error("column reduction over {} rows exceeds the kernel's {} rows; use a smaller micro-batch or sequence", n,
                65535 * kPartialRows);
  }
  const dim3 grid(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(blocks));
  column_partials_k<<<grid, 256, 0, stream>>>(partial, dy, x, rstd, n, cols);
  cuda_check_launch("column_partials");
  reduce_partials_k<<<blocks_for(cols, 256), 256, 0, stream>>>(out, partial, blocks, cols);
  cuda_check_launch("reduce_partials");
}

// ---- rope, swiglu, elementwise ------------------------------------------------------------------

__global__ void rope_k(float* x, i64 ld, i64 n, i64 seq, i64 heads, i64 hd, const float* cos, const float* sin,
                       float sign) {
  const i64 half = hd / 2;
  const i64 total = n * heads * half;
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 j = idx % half, hh = (idx / half) % heads, i = idx / (half * heads);
    float* v = x + i * ld + hh * hd;
    const i64 t = i % seq;
    const float c = cos[t * half + j], s = sign * sin[t * half + j];
    const float x1 = v[j], x2 = v[j + half];
    v[j] = x1 * c - x2 * s;
    v[j + half] = x2 * c + x1 * s;
  }
}

__global__ void swiglu_forward_k(float* out, const float* gu, i64 n, i64 inter) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < n * inter;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = idx / inter, j = idx % inter;
    const float g = gu[r * 2 * inter + j], u = gu[r * 2 * inter + inter + j];
    const float sig = 1.0f / (1.0f + expf(-g));
    out[idx] = (g * sig) * u;
  }
}

__global__ void swiglu_backward_k(float* dgu, const float* dout, const float* gu, i64 n, i64 inter) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < n * inter;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = idx / inter, j = idx % inter;
    const float g = gu[r * 2 * inter + j], u = gu[r * 2 * inter + inter + j];
    const float d = dout[idx];
    const float sig = 1.0f / (1.0f + expf(-g));
    dgu[r * 2 * inter + j] = d * u * (sig * (1.0f + g * (1.0f - sig)));
    dgu[r * 2 * inter + inter + j] = d * (g * sig);
  }
}

__global__ void add_k(float* y, const float* x, i64 count) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < count;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    y[idx] += x[idx];
  }
}

__global__ void dropout_k(float* y, const float* x, i64 count, float p, std::uint64_t seed, bool accumulate) {
  const float keep_scale = 1.0f / (1.0f - p);
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const float v = dropout_keep(seed, static_cast<std::uint64_t>(i), p) ? x[i] * keep_scale : 0.0f;
    y[i] = accumulate ? y[i] + v : v;
  }
}

__global__ void bias_add_k(float* y, const void* b, bool bf16, i64 n, i64 cols) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < n * cols;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    y[idx] += load_w(b, bf16, idx % cols);
  }
}

__global__ void to_bf16_k(std::uint16_t* dst, const float* src, i64 count) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < count;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const unsigned u = __float_as_uint(src[idx]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      dst[idx] = static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      dst[idx] = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
}

// ---- attention --------------------------------------------------------------------------------
// One warp per query row (forward, dQ) or key row (dK, dV); the block's warps share tiles of 32
// key (or query) rows in shared memory. Head dims up to kMaxHd; each lane owns hd / 32 columns of
// the output row.

constexpr int kWarps = 8;     // rows per block
constexpr int kTile = 32;     // keys (queries) per shared tile
constexpr int kMaxHd = 256;
constexpr int kPerLane = kMaxHd / 32;

struct Geo {
  i64 batch, seq, heads, kv, hd, ld, q_dim, group;
  float scale;
};

__device__ __forceinline__ const float* q_row(const float* qkv, const Geo& g, i64 b, i64 head, i64 t) {
  return qkv + (b * g.seq + t) * g.ld + head * g.hd;
}
__device__ __forceinline__ const float* k_row(const float* qkv, const Geo& g, i64 b, i64 kvh, i64 t) {
  return qkv + (b * g.seq + t) * g.ld + g.q_dim + kvh * g.hd;
}
__device__ __forceinline__ const float* v_row(const float* qkv, const Geo& g, i64 b, i64 kvh, i64 t) {
  return qkv + (b * g.seq + t) * g.ld + g.q_dim + (g.kv + kvh) * g.hd;
}

// Keys and values k0 .. k0 + kTile of kv head kvh into shared tiles (zero past seq), between
// barriers so the previous tile is no longer read and the new one is complete.
__device__ void load_kv_tile(float* ks, float* vs, const float* qkv, const Geo& g, i64 b, i64 kvh, i64 k0) {
  __syncthreads();
  for (i64 idx = threadIdx.x; idx < kTile * g.hd; idx += blockDim.x) {
    const i64 j = idx / g.hd, c = idx % g.hd;
    const bool in = k0 + j < g.seq;
    ks[idx] = in ? k_row(qkv, g, b, kvh, k0 + j)[c] : 0.0f;
    vs[idx] = in ? v_row(qkv, g, b, kvh, k0 + j)[c] : 0.0f;
  }
  __syncthreads();
}

// grid (ceil(seq / kWarps), batch * heads); block kWarps warps; dynamic shared: 2 tiles (K, V) of
// kTile x hd plus kWarps rows of q.
__global__ void attention_forward_k(float* out, float* lse, const float* qkv, Geo g) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = ks + kTile * g.hd;
  float* qs = vs + kTile * g.hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = static_cast<i64>(blockIdx.x) * kWarps, t = t0 + warp;
  const bool active = t < g.seq;
  if (active) {
    for (i64 c = lane; c < g.hd; c += 32) qs[warp * g.hd + c] = q_row(qkv, g, b, head, t)[c];
  }
  float m = -FLT_MAX, l = 0.0f;
  float acc[kPerLane];
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.0f;
  const i64 t_last = (t0 + kWarps - 1 < g.seq ? t0 + kWarps - 1 : g.seq - 1);  // the block's last query
  for (i64 k0 = 0; k0 <= t_last; k0 += kTile) {
    load_kv_tile(ks, vs, qkv, g, b, kvh, k0);
    if (!active || k0 > t) continue;
    // lane j scores key k0 + j
    const i64 key = k0 + lane;
    float s = -FLT_MAX;
    if (key <= t) {
      float dot = 0.0f;
      const float* kr = ks + lane * g.hd;
      const float* qr = qs + warp * g.hd;
      for (i64 c = 0; c < g.hd; ++c) dot += qr[c] * kr[c];
      s = dot * g.scale;
    }
    const float tile_max = warp_max(s);
    const float m_new = fmaxf(m, tile_max);
    const float p = key <= t ? expf(s - m_new) : 0.0f;
    const float corr = expf(m - m_new);
    l = l * corr + warp_sum(p);
    for (int e = 0; e < kPerLane; ++e) acc[e] *= corr;
    for (int j = 0; j < kTile; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      if (pj == 0.0f) continue;
      const float* vr = vs + j * g.hd;
      for (int e = 0; e < kPerLane; ++e) {
        const i64 c = lane + 32 * e;
        if (c < g.hd) acc[e] += pj * vr[c];
      }
    }
    m = m_new;
  }
  if (!active) return;
  const float inv = 1.0f / l;
  float* o = out + (b * g.seq + t) * g.q_dim + head * g.hd;
  for (int e = 0; e < kPerLane; ++e) {
    const i64 c = lane + 32 * e;
    if (c < g.hd) o[c] = acc[e] * inv;
  }
  if (lane == 0) lse[(b * g.heads + head) * g.seq + t] = m + logf(l);
}

// D[b, head, t] = dot(dout row, out row)
__global__ void attention_d_k(float* dd, const float* dout, const float* out, Geo g) {
  const i64 rows = g.batch * g.heads * g.seq;
  const i64 r = blockIdx.x * static_cast<i64>(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const i64 t = r % g.seq, head = (r / g.seq) % g.heads, b = r / (g.seq * g.heads);
  const float* a = dout + (b * g.seq + t) * g.q_dim + head * g.hd;
  const float* o = out + (b * g.seq + t) * g.q_dim + head * g.hd;
  float s = 0.0f;
  for (i64 c = lane; c < g.hd; c += 32) s += a[c] * o[c];
  s = warp_sum(s);
  if (lane == 0) dd[r] = s;
}

// dQ: one warp per query row; tiles of keys (K and V) shared by the block.
__global__ void attention_dq_k(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* dd,
                               Geo g) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = ks + kTile * g.hd;
  float* qs = vs + kTile * g.hd;
  float* dos = qs + kWarps * g.hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bh = blockIdx.y, b = bh / g.heads, head = bh % g.heads, kvh = head / g.group;
  const i64 t0 = static_cast<i64>(blockIdx.x) * kWarps, t = t0 + warp;
  const bool active = t < g.seq;
  float lrow = 0.0f, drow = 0.0f;
  if (active) {
    for (i64 c = lane; c < g.hd; c += 32) {
      qs[warp * g.hd + c] = q_row(qkv, g, b, head, t)[c];
      dos[warp * g.hd + c] = dout[(b * g.seq + t) * g.q_dim + head * g.hd + c];
    }
    lrow = lse[(b * g.heads + head) * g.seq + t];
    drow = dd[(b * g.heads + head) * g.seq + t];
  }
  float acc[kPerLane];
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.0f;
  const i64 t_last = (t0 + kWarps - 1 < g.seq ? t0 + kWarps - 1 : g.seq - 1);
  for (i64 k0 = 0; k0 <= t_last; k0 += kTile) {
    load_kv_tile(ks, vs, qkv, g, b, kvh, k0);
    if (!active || k0 > t) continue;
    const i64 key = k0 + lane;
    float ds = 0.0f;
    if (key <= t) {
      float qk = 0.0f, dv = 0.0f;
      const float* kr = ks + lane * g.hd;
      const float* vr = vs + lane * g.hd;
      const float* qr = qs + warp * g.hd;
      const float* dr = dos + warp * g.hd;
      for (i64 c = 0; c < g.hd; ++c) {
        qk += qr[c] * kr[c];
        dv += dr[c] * vr[c];
      }
      const float p = expf(qk * g.scale - lrow);
      ds = p * (dv - drow);
    }
    for (int j = 0; j < kTile; ++j) {
      const float dsj = __shfl_sync(0xffffffffu, ds, j);
      if (dsj == 0.0f) continue;
      const float* kr = ks + j * g.hd;
      for (int e = 0; e < kPerLane; ++e) {
        const i64 c = lane + 32 * e;
        if (c < g.hd) acc[e] += dsj * kr[c];
      }
    }
  }
  if (!active) return;
  float* dq = dqkv + (b * g.seq + t) * g.ld + head * g.hd;
  for (int e = 0; e < kPerLane; ++e) {
    const i64 c = lane + 32 * e;
    if (c < g.hd) dq[c] = acc[e] * g.scale;
  }
}

// dK, dV: one warp per key row of a kv head; the query rows of every head in its group, in tiles
// shared by the block.
__global__ void attention_dkv_k(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* dd,
                                Geo g) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* dos = qs + kTile * g.hd;
  float* ks = dos + kTile * g.hd;
  float* vs = ks + kWarps * g.hd;
  __shared__ float ls[kTile], ds_[kTile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 bk = blockIdx.y, b = bk / g.kv, kvh = bk % g.kv;
  const i64 j0 = static_cast<i64>(blockIdx.x) * kWarps, j = j0 + warp;
  const bool active = j < g.seq;
  if (active) {
    for (i64 c = lane; c < g.hd; c += 32) {
      ks[warp * g.hd + c] = k_row(qkv, g, b, kvh, j)[c];
      vs[warp * g.hd + c] = v_row(qkv, g, b, kvh, j)[c];
    }
  }
  float dk[kPerLane], dv[kPerLane];
  for (int e = 0; e < kPerLane; ++e) dk[e] = dv[e] = 0.0f;
  for (i64 hh = 0; hh < g.group; ++hh) {
    const i64 head = kvh * g.group + hh;
    for (i64 q0 = j0 - (j0 % kTile); q0 < g.seq; q0 += kTile) {  // queries at or after the block's first key
      __syncthreads();
      for (i64 idx = threadIdx.x; idx < kTile * g.hd; idx += blockDim.x) {
        const i64 i = idx / g.hd, c = idx % g.hd;
        const bool in = q0 + i < g.seq;
        qs[idx] = in ? q_row(qkv, g, b, head, q0 + i)[c] : 0.0f;
        dos[idx] = in ? dout[(b * g.seq + q0 + i) * g.q_dim + head * g.hd + c] : 0.0f;
      }
      for (i64 i = threadIdx.x; i < kTile; i += blockDim.x) {
        const bool in = q0 + i < g.seq;
        ls[i] = in ? lse[(b * g.heads + head) * g.seq + q0 + i] : 0.0f;
        ds_[i] = in ? dd[(b * g.heads + head) * g.seq + q0 + i] : 0.0f;
      }
      __syncthreads();
      if (!active) continue;
      // lane i handles query q0 + i
      const i64 qi = q0 + lane;
      float p = 0.0f, dsc = 0.0f;
      if (qi < g.seq && qi >= j) {
        float qk = 0.0f, dvv = 0.0f;
        const float* qr = qs + lane * g.hd;
        const float* dr = dos + lane * g.hd;
        const float* kr = ks + warp * g.hd;
        const float* vr = vs + warp * g.hd;
        for (i64 c = 0; c < g.hd; ++c) {
          qk += qr[c] * kr[c];
          dvv += dr[c] * vr[c];
        }
        p = expf(qk * g.scale - ls[lane]);
        dsc = p * (dvv - ds_[lane]);
      }
      for (int i = 0; i < kTile; ++i) {
        const float pi = __shfl_sync(0xffffffffu, p, i);
        const float dsi = __shfl_sync(0xffffffffu, dsc, i);
        if (pi == 0.0f && dsi == 0.0f) continue;
        const float* qr = qs + i * g.hd;
        const float* dr = dos + i * g.hd;
        for (int e = 0; e < kPerLane; ++e) {
          const i64 c = lane + 32 * e;
          if (c < g.hd) {
            dv[e] += pi * dr[c];
            dk[e] += dsi * qr[c];
          }
        }
      }
    }
  }
  if (!active) return;
  float* dkr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + kvh * g.hd;
  float* dvr = dqkv + (b * g.seq + j) * g.ld + g.q_dim + (g.kv + kvh) * g.hd;
  for (int e = 0; e < kPerLane; ++e) {
    const i64 c = lane + 32 * e;
    if (c < g.hd) {
      dkr[c] = dk[e] * g.scale;
      dvr[c] = dv[e];
    }
  }
}

Geo geo(const AttentionDims& d) {
  if (d.batch * d.heads > 65535) {
    throw Error("attention: batch x heads = {} exceeds the 65535 blocks a grid row may hold; use a smaller micro-batch",
                d.batch * d.heads);
  }
  if (d.hd > kMaxHd || d.hd % 2 != 0) throw Error("CUDA attention supports even head dims up to {}, not {}", kMaxHd, d.hd);
  if (d.heads % d.kv_heads != 0) throw Error("attention: {} heads do not group into {} kv heads", d.heads, d.kv_heads);
  Geo g{d.batch, d.seq, d.heads, d.kv_heads, d.hd, (d.heads + 2 * d.kv_heads) * d.hd, d.heads * d.hd,
        d.heads / d.kv_heads, d.scale};
  return g;
}

void set_smem(const void* kernel, std::size_t bytes) {
  if (bytes > 48 * 1024) {
    cuda_allow_shared_memory(kernel, bytes, "attention");
  }
}

// ---- cross-entropy ------------------------------------------------------------------------------

__global__ void ce_init_k(float* m, float* s, float* tl, i64 n) {
  for (i64 r = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; r < n; r += static_cast<i64>(gridDim.x) * blockDim.x) {
    m[r] = -INFINITY;
    s[r] = 0.0f;
    tl[r] = 0.0f;
  }
}

// One block per row.
__global__ void ce_chunk_forward_k(float* m, float* s, float* tl, const float* logits, const std::int32_t* targets,
                                   i64 v0, i64 vc) {
  __shared__ float red[32];
  const i64 r = blockIdx.x;
  const float* row = logits + r * vc;
  float cm = -INFINITY;
  for (i64 j = threadIdx.x; j < vc; j += blockDim.x) cm = fmaxf(cm, row[j]);
  // block max
  {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    cm = warp_max(cm);
    __syncthreads();
    if (lane == 0) red[warp] = cm;
    __syncthreads();
    float t = lane < warps ? red[lane] : -INFINITY;
    cm = warp_max(t);
  }
  const float nm = fmaxf(m[r], cm);
  float cs = 0.0f;
  for (i64 j = threadIdx.x; j < vc; j += blockDim.x) cs += expf(row[j] - nm);
  cs = block_sum(cs, red);
  if (threadIdx.x == 0) {
    s[r] = s[r] * expf(m[r] - nm) + cs;
    m[r] = nm;
    const i64 tg = targets[r];
    if (tg >= v0 && tg < v0 + vc) tl[r] = row[tg - v0];
  }
}

__global__ void ce_finish_k(float* lse, float* loss, const float* m, const float* s, const float* tl,
                            const std::int32_t* targets, i64 n) {
  for (i64 r = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; r < n; r += static_cast<i64>(gridDim.x) * blockDim.x) {
    lse[r] = m[r] + logf(s[r]);
    loss[r] = targets[r] >= 0 ? lse[r] - tl[r] : 0.0f;
  }
}

__global__ void ce_chunk_backward_k(float* logits, const float* lse, const std::int32_t* targets, float scale, i64 n,
                                    i64 v0, i64 vc) {
  for (i64 idx = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; idx < n * vc;
       idx += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = idx / vc, j = idx % vc;
    const i64 tg = targets[r];
    if (tg < 0) {
      logits[idx] = 0.0f;
      continue;
    }
    float p = expf(logits[idx] - lse[r]);
    if (tg == v0 + j) p -= 1.0f;
    logits[idx] = scale * p;
  }
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------------

void embedding_forward(float* out, const void* table, bool bf16, const std::int32_t* tokens, i64 n, i64 h,
                       cudaStream_t stream) {
  embedding_forward_k<<<blocks_for(n * h, 256), 256, 0, stream>>>(out, table, bf16, tokens, n, h);
  cuda_check_launch("embedding_forward");
}

void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, i64 n, i64 h,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((h + 255) / 256), kEmbedResidues);
  embedding_backward_k<<<grid, 256, 0, stream>>>(dtable, dout, tokens, n, h);
  cuda_check_launch("embedding_backward");
}

void rmsnorm_forward(float* y, float* rstd, const float* x, const void* w, bool bf16, i64 n, i64 h, float eps,
                     cudaStream_t stream) {
  if (n == 0) return;
  rmsnorm_forward_k<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(y, rstd, x, w, bf16, h, eps);
  cuda_check_launch("rmsnorm_forward");
}

std::int64_t rmsnorm_partial_floats(i64 n, i64 h) { return cuda_scratch::rmsnorm_partial_floats(n, h); }

void rmsnorm_backward(float* dx, float* dw, float* partial, const float* dy, const float* x, const void* w, bool bf16,
                      const float* rstd, i64 n, i64 h, cudaStream_t stream) {
  if (n == 0) return;
  rmsnorm_backward_dx_k<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(dx, dy, x, w, bf16, rstd, h);
  cuda_check_launch("rmsnorm_backward");
  if (dw != nullptr) column_reduce(dw, partial, dy, x, rstd, n, h, stream);
}

void rope(float* x, i64 ld, i64 n, i64 seq, i64 heads, i64 hd, const float* cos, const float* sin, bool inverse,
          cudaStream_t stream) {
  rope_k<<<blocks_for(n * heads * (hd / 2), 256), 256, 0, stream>>>(x, ld, n, seq, heads, hd, cos, sin,
                                                                     inverse ? -1.0f : 1.0f);
  cuda_check_launch("rope");
}

void swiglu_forward(float* out, const float* gu, i64 n, i64 i, cudaStream_t stream) {
  swiglu_forward_k<<<blocks_for(n * i, 256), 256, 0, stream>>>(out, gu, n, i);
  cuda_check_launch("swiglu_forward");
}

void swiglu_backward(float* dgu, const float* dout, const float* gu, i64 n, i64 i, cudaStream_t stream) {
  swiglu_backward_k<<<blocks_for(n * i, 256), 256, 0, stream>>>(dgu, dout, gu, n, i);
  cuda_check_launch("swiglu_backward");
}

void add(float* y, const float* x, i64 count, cudaStream_t stream) {
  add_k<<<blocks_for(count, 256), 256, 0, stream>>>(y, x, count);
  cuda_check_launch("add");
}

void dropout(float* y, const float* x, i64 count, float p, std::uint64_t seed, bool accumulate, cudaStream_t stream) {
  if (count == 0) return;
  dropout_k<<<blocks_for(count, 256), 256, 0, stream>>>(y, x, count, p, seed, accumulate);
  cuda_check_launch("dropout");
}

void bias_add(float* y, const void* bias, bool bf16, i64 n, i64 cols, cudaStream_t stream) {
  bias_add_k<<<blocks_for(n * cols, 256), 256, 0, stream>>>(y, bias, bf16, n, cols);
  cuda_check_launch("bias_add");
}

void column_sums_add(float* dbias, float* partial, const float* dy, i64 n, i64 cols, cudaStream_t stream) {
  if (n == 0) return;
  column_reduce(dbias, partial, dy, nullptr, nullptr, n, cols, stream);
}

void to_bf16(std::uint16_t* dst, const float* src, i64 count, cudaStream_t stream) {
  to_bf16_k<<<blocks_for(count, 256), 256, 0, stream>>>(dst, src, count);
  cuda_check_launch("to_bf16");
}

namespace {
// The D rows first, then the flash kernels' packed operands (16-byte aligned).
std::int64_t d_floats(const AttentionDims& d) { return cuda_scratch::attention_d_floats(d.batch, d.seq, d.heads); }
bool use_flash(const AttentionDims& d) { return d.bf16 && flash_attention_supported(d); }
}  // namespace

std::int64_t attention_scratch_floats(const AttentionDims& d) {
  return cuda_scratch::attention_scratch_floats(d.batch, d.seq, d.heads, d.kv_heads, d.hd, d.bf16);
}

void attention_forward(float* out, float* lse, float* scratch, const float* qkv, const AttentionDims& d,
                       cudaStream_t stream) {
  const Geo g = geo(d);
  if (use_flash(d)) {
    flash_attention_forward(out, lse, scratch + d_floats(d), qkv, d, stream);
    return;
  }
  const std::size_t smem = static_cast<std::size_t>((2 * kTile + kWarps) * g.hd) * sizeof(float);
  set_smem(reinterpret_cast<const void*>(&attention_forward_k), smem);
  const dim3 grid(static_cast<unsigned>((g.seq + kWarps - 1) / kWarps), static_cast<unsigned>(g.batch * g.heads));
  attention_forward_k<<<grid, kWarps * 32, smem, stream>>>(out, lse, qkv, g);
  cuda_check_launch("attention_forward");
}

void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* out,
                        const float* lse, const AttentionDims& d, cudaStream_t stream) {
  const Geo g = geo(d);
  const i64 rows = g.batch * g.heads * g.seq;
  attention_d_k<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(scratch, dout, out, g);
  cuda_check_launch("attention_backward (D)");
  if (use_flash(d)) {
    flash_attention_backward(dqkv, scratch + d_floats(d), scratch, dout, qkv, lse, d, stream);
    return;
  }
  const std::size_t smem_q = static_cast<std::size_t>((2 * kTile + 2 * kWarps) * g.hd) * sizeof(float);
  set_smem(reinterpret_cast<const void*>(&attention_dq_k), smem_q);
  const dim3 grid_q(static_cast<unsigned>((g.seq + kWarps - 1) / kWarps), static_cast<unsigned>(g.batch * g.heads));
  attention_dq_k<<<grid_q, kWarps * 32, smem_q, stream>>>(dqkv, dout, qkv, lse, scratch, g);
  cuda_check_launch("attention_backward (dQ)");
  const std::size_t smem_kv = static_cast<std::size_t>((2 * kTile + 2 * kWarps) * g.hd) * sizeof(float);
  set_smem(reinterpret_cast<const void*>(&attention_dkv_k), smem_kv);
  const dim3 grid_kv(static_cast<unsigned>((g.seq + kWarps - 1) / kWarps), static_cast<unsigned>(g.batch * g.kv));
  attention_dkv_k<<<grid_kv, kWarps * 32, smem_kv, stream>>>(dqkv, dout, qkv, lse, scratch, g);
  cuda_check_launch("attention_backward (dK, dV)");
}

namespace {
__device__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (threadIdx.x < 32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T>
__global__ void sum_squares_partial_k(double* partial, const T* x, i64 count) {
  double s = 0.0;
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    double v;
    if constexpr (sizeof(T) == 2) {
      v = __uint_as_float(static_cast<unsigned>(x[i]) << 16);
    } else {
      v = x[i];
    }
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_k(double* out, const double* partial, int blocks) {
  double s = 0.0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) s += partial[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}
}  // namespace

void sum_squares(double* out, double* partial, const void* x, bool bf16, i64 count, cudaStream_t stream) {
  const int blocks = static_cast<int>(std::clamp<i64>((count + 1023) / 1024, 1, sum_squares_partial_doubles()));
  if (bf16) {
    sum_squares_partial_k<<<blocks, 256, 0, stream>>>(partial, static_cast<const std::uint16_t*>(x), count);
  } else {
    sum_squares_partial_k<<<blocks, 256, 0, stream>>>(partial, static_cast<const float*>(x), count);
  }
  cuda_check_launch("sum_squares");
  sum_partials_k<<<1, 1024, 0, stream>>>(out, partial, blocks);
  cuda_check_launch("sum_squares (total)");
}

void ce_init(float* m, float* s, float* target_logit, i64 n, cudaStream_t stream) {
  ce_init_k<<<blocks_for(n, 256), 256, 0, stream>>>(m, s, target_logit, n);
  cuda_check_launch("ce_init");
}

void ce_chunk_forward(float* m, float* s, float* target_logit, const float* logits, const std::int32_t* targets, i64 n,
                      i64 v0, i64 vc, cudaStream_t stream) {
  if (n == 0) return;
  ce_chunk_forward_k<<<static_cast<unsigned>(n), 256, 0, stream>>>(m, s, target_logit, logits, targets, v0, vc);
  cuda_check_launch("ce_chunk_forward");
}

void ce_finish(float* lse, float* loss, const float* m, const float* s, const float* target_logit,
               const std::int32_t* targets, i64 n, cudaStream_t stream) {
  ce_finish_k<<<blocks_for(n, 256), 256, 0, stream>>>(lse, loss, m, s, target_logit, targets, n);
  cuda_check_launch("ce_finish");
}

void ce_chunk_backward(float* logits, const float* lse, const std::int32_t* targets, float scale, i64 n, i64 v0,
                       i64 vc, cudaStream_t stream) {
  ce_chunk_backward_k<<<blocks_for(n * vc, 256), 256, 0, stream>>>(logits, lse, targets, scale, n, v0, vc);
  cuda_check_launch("ce_chunk_backward");
}

}  // namespace zinf::kernels::cuda
