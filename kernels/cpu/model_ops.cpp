// Element-wise and row-wise kernels of the CPU backend (see cpu_model_ops.hpp). References:
// transformers' LlamaRMSNorm / apply_rotary_pos_emb / LlamaMLP and torch.nn.functional.cross_entropy.
// Rows are split into fixed blocks; reductions across rows go through one partial per block,
// summed in block order, so the results do not depend on the thread count.
#include "zinf/kernels/cpu_model_ops.hpp"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "zinf/common/error.hpp"
#include "zinf/kernels/dropout.hpp"
#include "zinf/kernels/half.hpp"

namespace zinf::kernels::cpu {
namespace {

constexpr std::int64_t kRowBlock = 16;  // rows per task in row-parallel kernels

// Runs f(begin, end) over fixed blocks of `block` rows, in parallel.
template <typename F>
void for_blocks(std::int64_t n, std::int64_t block, F&& f) {
  if (n <= 0) return;
  const std::int64_t blocks = (n + block - 1) / block;
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, blocks, 1),
                    [&](const tbb::blocked_range<std::int64_t>& r) {
                      for (std::int64_t b = r.begin(); b < r.end(); ++b) f(b * block, std::min(n, (b + 1) * block));
                    },
                    tbb::simple_partitioner());
}

// A weight vector as fp32 (bf16 widened once per call).
std::vector<float> widen(const void* w, DType dtype, std::int64_t n) {
  std::vector<float> out(static_cast<std::size_t>(n));
  if (dtype == DType::kF32) {
    std::memcpy(out.data(), w, out.size() * sizeof(float));
  } else if (dtype == DType::kBF16) {
    const auto* p = static_cast<const std::uint16_t*>(w);
    for (std::int64_t j = 0; j < n; ++j) out[j] = bf16_to_f32(p[j]);
  } else {
    throw Error("model weights must be fp32 or bf16, not {}", dtype_name(dtype));
  }
  return out;
}

// Sum of x[j] * y[j] with 16 independent lanes (vectorisable without reassociation flags).
inline float dot(const float* x, const float* y, std::int64_t n) {
  float lanes[16] = {};
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += x[j + l] * y[j + l];
  }
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// Column sums of rows [r0, r1) of m (row stride ld) into acc (cols), added.
inline void add_rows(float* acc, const float* m, std::int64_t ld, std::int64_t r0, std::int64_t r1, std::int64_t cols) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* row = m + r * ld;
    for (std::int64_t j = 0; j < cols; ++j) acc[j] += row[j];
  }
}

// Reduces per-block partials (blocks, cols) in block order into out (cols), added.
void reduce_partials(float* out, const std::vector<float>& partial, std::int64_t blocks, std::int64_t cols) {
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, cols, 1024), [&](const tbb::blocked_range<std::int64_t>& r) {
    for (std::int64_t j = r.begin(); j < r.end(); ++j) {
      float s = 0.0f;
      for (std::int64_t b = 0; b < blocks; ++b) s += partial[b * cols + j];
      out[j] += s;
    }
  });
}

constexpr std::int64_t kReduceBlock = 64;  // rows per partial in column reductions

}  // namespace

void embedding_forward(float* out, const void* table, DType wdtype, const std::int32_t* tokens, std::int64_t n,
                       std::int64_t h) {
  if (wdtype != DType::kF32 && wdtype != DType::kBF16) {
    throw Error("embedding weights must be fp32 or bf16, not {}", dtype_name(wdtype));
  }
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i) {
      const std::int64_t row = tokens[i];
      float* o = out + i * h;
      if (wdtype == DType::kF32) {
        std::memcpy(o, static_cast<const float*>(table) + row * h, static_cast<std::size_t>(h) * sizeof(float));
      } else {
        const auto* src = static_cast<const std::uint16_t*>(table) + row * h;
        for (std::int64_t j = 0; j < h; ++j) o[j] = bf16_to_f32(src[j]);
      }
    }
  });
}

void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n, std::int64_t h) {
  // Parallel over column ranges, tokens in order within each: repeated tokens never race.
  constexpr std::int64_t kCols = 256;
  for_blocks(h, kCols, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t i = 0; i < n; ++i) {
      float* d = dtable + static_cast<std::int64_t>(tokens[i]) * h;
      const float* g = dout + i * h;
      for (std::int64_t j = c0; j < c1; ++j) d[j] += g[j];
    }
  });
}

void rmsnorm_forward(float* y, float* rstd, const float* x, const void* w, DType wdtype, std::int64_t n,
                     std::int64_t h, float eps) {
  const std::vector<float> wf = widen(w, wdtype, h);
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i) {
      const float* xi = x + i * h;
      const float r = 1.0f / std::sqrt(dot(xi, xi, h) / static_cast<float>(h) + eps);
      rstd[i] = r;
      float* yi = y + i * h;
      for (std::int64_t j = 0; j < h; ++j) yi[j] = wf[j] * (xi[j] * r);
    }
  });
}

void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const void* w, DType wdtype,
                      const float* rstd, std::int64_t n, std::int64_t h) {
  const std::vector<float> wf = widen(w, wdtype, h);
  const std::int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<float> partial(dw != nullptr ? static_cast<std::size_t>(blocks * h) : 0, 0.0f);
  for_blocks(n, kReduceBlock, [&](std::int64_t r0, std::int64_t r1) {
    float* pw = dw != nullptr ? partial.data() + (r0 / kReduceBlock) * h : nullptr;
    std::vector<float> wdy(static_cast<std::size_t>(h));
    for (std::int64_t i = r0; i < r1; ++i) {
      const float* xi = x + i * h;
      const float* dyi = dy + i * h;
      const float r = rstd[i];
      for (std::int64_t j = 0; j < h; ++j) wdy[j] = wf[j] * dyi[j];
      // y = w * x * r, r = (mean(x^2) + eps)^-1/2:  dx = r * w*dy - x * r^3 * mean(w*dy*x)
      const float c = dot(wdy.data(), xi, h) * r * r * r / static_cast<float>(h);
      float* dxi = dx + i * h;
      for (std::int64_t j = 0; j < h; ++j) dxi[j] += r * wdy[j] - xi[j] * c;
      if (pw != nullptr) {
        for (std::int64_t j = 0; j < h; ++j) pw[j] += dyi[j] * (xi[j] * r);
      }
    }
  });
  if (dw != nullptr) reduce_partials(dw, partial, blocks, h);
}

void rope_apply(float* x, std::int64_t ld, std::int64_t n, std::int64_t t, std::int64_t heads, std::int64_t hd,
                const float* cos, const float* sin, bool inverse) {
  const std::int64_t half = hd / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i) {
      const float* c = cos + (i % t) * half;
      const float* s = sin + (i % t) * half;
      for (std::int64_t hh = 0; hh < heads; ++hh) {
        float* v = x + i * ld + hh * hd;
        for (std::int64_t j = 0; j < half; ++j) {
          const float x1 = v[j];
          const float x2 = v[j + half];
          const float sj = sign * s[j];
          v[j] = x1 * c[j] - x2 * sj;
          v[j + half] = x2 * c[j] + x1 * sj;
        }
      }
    }
  });
}

void heads_gather(float* dst, const float* src, std::int64_t ld, std::int64_t col0, std::int64_t t,
                  std::int64_t groups, std::int64_t per, std::int64_t hd, std::int64_t p0, std::int64_t p1) {
  // One item per (work item, head, time) row: every destination row is written once.
  const std::size_t row_bytes = static_cast<std::size_t>(hd) * sizeof(float);
  for_blocks((p1 - p0) * per * t, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t tt = r % t, j = (r / t) % per, p = p0 + r / (t * per);
      const std::int64_t seq = p / groups, head = (p % groups) * per + j;
      std::memcpy(dst + r * hd, src + (seq * t + tt) * ld + col0 + head * hd, row_bytes);
    }
  });
}

void heads_scatter(float* dst, std::int64_t ld, std::int64_t col0, const float* src, std::int64_t t,
                   std::int64_t groups, std::int64_t per, std::int64_t hd, std::int64_t p0, std::int64_t p1) {
  const std::size_t row_bytes = static_cast<std::size_t>(hd) * sizeof(float);
  for_blocks((p1 - p0) * per * t, 64, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t tt = r % t, j = (r / t) % per, p = p0 + r / (t * per);
      const std::int64_t seq = p / groups, head = (p % groups) * per + j;
      std::memcpy(dst + (seq * t + tt) * ld + col0 + head * hd, src + r * hd, row_bytes);
    }
  });
}

void causal_softmax(float* s, float* lse, std::int64_t rows, std::int64_t t) {
  for_blocks(rows, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* row = s + r * t;
      const std::int64_t valid = r % t + 1;
      float m = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < valid; ++j) m = std::max(m, row[j]);
      float sum = 0.0f;
      for (std::int64_t j = 0; j < valid; ++j) {
        row[j] = std::exp(row[j] - m);
        sum += row[j];
      }
      const float inv = 1.0f / sum;
      for (std::int64_t j = 0; j < valid; ++j) row[j] *= inv;
      std::fill(row + valid, row + t, 0.0f);
      lse[r] = m + std::log(sum);
    }
  });
}

void causal_softmax_recompute(float* s, const float* lse, std::int64_t rows, std::int64_t t) {
  for_blocks(rows, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* row = s + r * t;
      const std::int64_t valid = r % t + 1;
      const float l = lse[r];
      for (std::int64_t j = 0; j < valid; ++j) row[j] = std::exp(row[j] - l);
      std::fill(row + valid, row + t, 0.0f);
    }
  });
}

void rowwise_dot(float* d, const float* dout, const float* out, std::int64_t rows, std::int64_t hd) {
  for_blocks(rows, 256, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) d[r] = dot(dout + r * hd, out + r * hd, hd);
  });
}

void softmax_backward(float* dp, const float* p, const float* d, std::int64_t rows, std::int64_t t) {
  for_blocks(rows, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* g = dp + r * t;
      const float* pr = p + r * t;
      const float dr = d[r];
      for (std::int64_t j = 0; j < t; ++j) g[j] = pr[j] * (g[j] - dr);
    }
  });
}

void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i) {
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* g = gu + r * 2 * i;
      const float* u = g + i;
      float* o = out + r * i;
      for (std::int64_t j = 0; j < i; ++j) {
        const float sig = 1.0f / (1.0f + std::exp(-g[j]));
        o[j] = (g[j] * sig) * u[j];
      }
    }
  });
}

void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i) {
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* g = gu + r * 2 * i;
      const float* u = g + i;
      const float* d = dout + r * i;
      float* dg = dgu + r * 2 * i;
      float* du = dg + i;
      for (std::int64_t j = 0; j < i; ++j) {
        const float sig = 1.0f / (1.0f + std::exp(-g[j]));
        const float silu = g[j] * sig;
        dg[j] = d[j] * u[j] * (sig * (1.0f + g[j] * (1.0f - sig)));
        du[j] = d[j] * silu;
      }
    }
  });
}

void bias_add(float* y, std::int64_t ld, const void* bias, DType wdtype, std::int64_t n, std::int64_t cols) {
  const std::vector<float> b = widen(bias, wdtype, cols);
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* row = y + r * ld;
      for (std::int64_t j = 0; j < cols; ++j) row[j] += b[j];
    }
  });
}

void bias_backward(float* dbias, const float* dy, std::int64_t ld, std::int64_t n, std::int64_t cols) {
  const std::int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<float> partial(static_cast<std::size_t>(blocks * cols), 0.0f);
  for_blocks(n, kReduceBlock, [&](std::int64_t r0, std::int64_t r1) {
    add_rows(partial.data() + (r0 / kReduceBlock) * cols, dy, ld, r0, r1, cols);
  });
  reduce_partials(dbias, partial, blocks, cols);
}

void add_inplace(float* y, const float* x, std::int64_t n) {
  for_blocks(n, 1 << 14, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t j = r0; j < r1; ++j) y[j] += x[j];
  });
}

void dropout(float* y, const float* x, std::int64_t n, float p, std::uint64_t seed, bool accumulate) {
  const float keep_scale = 1.0f / (1.0f - p);
  for_blocks(n, 1 << 14, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t j = r0; j < r1; ++j) {
      const float v = dropout_keep(seed, static_cast<std::uint64_t>(j), p) ? x[j] * keep_scale : 0.0f;
      y[j] = accumulate ? y[j] + v : v;
    }
  });
}

void ce_chunk_forward(float* m, float* s, float* target_logit, const float* logits, const std::int32_t* targets,
                      std::int64_t n, std::int64_t v0, std::int64_t vc) {
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* row = logits + r * vc;
      float cm = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < vc; ++j) cm = std::max(cm, row[j]);
      const float nm = std::max(m[r], cm);
      float cs = 0.0f;
      for (std::int64_t j = 0; j < vc; ++j) cs += std::exp(row[j] - nm);
      s[r] = s[r] * std::exp(m[r] - nm) + cs;
      m[r] = nm;
      const std::int64_t tg = targets[r];
      if (tg >= v0 && tg < v0 + vc) target_logit[r] = row[tg - v0];
    }
  });
}

void ce_chunk_backward(float* logits, const float* lse, const std::int32_t* targets, const float* scale,
                       std::int64_t n, std::int64_t v0, std::int64_t vc) {
  for_blocks(n, kRowBlock, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* row = logits + r * vc;
      const float sc = scale[r];
      if (sc == 0.0f) {
        std::fill(row, row + vc, 0.0f);
        continue;
      }
      const float l = lse[r];
      for (std::int64_t j = 0; j < vc; ++j) row[j] = std::exp(row[j] - l);
      const std::int64_t tg = targets[r];
      if (tg >= v0 && tg < v0 + vc) row[tg - v0] -= 1.0f;
      for (std::int64_t j = 0; j < vc; ++j) row[j] *= sc;
    }
  });
}

}  // namespace zinf::kernels::cpu
