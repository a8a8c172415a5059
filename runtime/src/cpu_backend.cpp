// The CPU backend: oneDNN matrix products (kernels/cpu_gemm.hpp) and the plain C++ kernels of
// kernels/cpu_model_ops.hpp, composed into the ops of backend.hpp. Every op completes before it
// returns, so streams and events are no-ops.
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/kernels/cpu_gemm.hpp"
#include "zinf/kernels/cpu_model_ops.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/runtime/backend.hpp"

namespace zinf::runtime {
namespace {

namespace k = kernels::cpu;

// Scratch that grows to the largest request and is reused (ops run one at a time).
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }

  float* f32(std::size_t count) {
    const std::size_t bytes = count * sizeof(float);
    if (bytes > bytes_) {
      std::free(data_);
      data_ = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
      if (data_ == nullptr) {
        bytes_ = 0;
        throw Error("CPU backend: out of memory allocating {} MiB of scratch", bytes >> 20);
      }
      bytes_ = bytes;
    }
    return static_cast<float*>(data_);
  }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

class CpuEvent final : public Backend::Event {};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& o) : options_(o) {}

  std::string name() const override { return "cpu"; }
  std::string describe() const override {
    return fmt::format("cpu: {} threads (oneTBB), {}, bf16 matmul {}", tbb::info::default_concurrency(),
                       k::gemm_library(), k::gemm_native_bf16() ? "native" : "widened to fp32");
  }

  void* allocate(std::size_t bytes) override {
    void* p = std::aligned_alloc(4096, (std::max<std::size_t>(bytes, 1) + 4095) / 4096 * 4096);
    if (p == nullptr) throw Error("CPU backend: out of memory allocating {:.1f} MiB", bytes / 1048576.0);
    return p;
  }
  void deallocate(void* p, std::size_t) noexcept override { std::free(p); }
  void upload(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void fill_zero(void* dst, std::size_t bytes) override { std::memset(dst, 0, bytes); }
  void copy_to_device_async(void* dst, const void* src, std::size_t bytes, Stream) override {
    std::memcpy(dst, src, bytes);
  }
  void copy_to_host_async(void* dst, const void* src, std::size_t bytes, Stream) override { std::memcpy(dst, src, bytes); }
  void round_to_bf16(std::uint16_t* dst, const float* src, std::int64_t count) override {
    tbb::parallel_for(std::int64_t{0}, count, std::int64_t{1} << 16, [&](std::int64_t i) { dst[i] = kernels::f32_to_bf16(src[i]); });
  }
  void adam_step(const kernels::cpu::AdamConfig& config, const kernels::cpu::AdamTensors& t) override {
    kernels::cpu::Exec exec;
    exec.native_bf16 = false;  // the rounding every backend agrees on
    kernels::cpu::adam_step(config, t, exec);
  }
  void sum_squares(double* out, const void* data, std::int64_t count, DType dtype) override {
    // The optimizer's gradient statistics: fixed chunks, so the same result on any thread count.
    *out = kernels::cpu::grad_stats(data, dtype, static_cast<std::size_t>(count)).sum_sq;
  }

  std::unique_ptr<Event> record(Stream) override { return std::make_unique<CpuEvent>(); }
  void wait(Stream, const Event&) override {}
  void synchronize() override {}

  void embedding_forward(float* out, Weight table, const std::int32_t* tokens, std::int64_t n,
                         std::int64_t h) override {
    OpTimer t(*this, "embedding");
    k::embedding_forward(out, table.data, table.dtype, tokens, n, h);
  }
  void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n,
                          std::int64_t h) override {
    OpTimer t(*this, "embedding.backward");
    k::embedding_backward(dtable, dout, tokens, n, h);
  }

  void rmsnorm_forward(float* y, float* rstd, const float* x, Weight w, std::int64_t n, std::int64_t h,
                       float eps) override {
    OpTimer t(*this, "rmsnorm");
    k::rmsnorm_forward(y, rstd, x, w.data, w.dtype, n, h, eps);
  }
  void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, Weight w, const float* rstd,
                        std::int64_t n, std::int64_t h) override {
    OpTimer t(*this, "rmsnorm.backward");
    k::rmsnorm_backward(dx, dw, dy, x, w.data, w.dtype, rstd, n, h);
  }

  void linear_forward(float* y, const float* x, Weight w, Weight bias, std::int64_t n, std::int64_t in,
                      std::int64_t out) override {
    OpTimer t(*this, "linear", 2.0 * n * in * out);
    k::Gemm g;
    g.m = n, g.n = out, g.k = in, g.ab_dtype = w.dtype;
    g.a = operand(x, n * in, w.dtype, 0), g.lda = in;
    g.b = w.data, g.ldb = in, g.trans_b = true;
    g.c = y, g.ldc = out;
    k::gemm(g);
    if (bias) k::bias_add(y, out, bias.data, bias.dtype, n, out);
  }

  void linear_backward(float* dx, float* dw, float* dbias, const float* dy, const float* x, Weight w,
                       std::int64_t n, std::int64_t in, std::int64_t out) override {
    OpTimer t(*this, "linear.backward", 4.0 * n * in * out);
    // With bf16 weights both products take bf16 operands (dy and x rounded once each).
    const void* dy_op = operand(dy, n * out, w.dtype, 0);
    // dx (n, in) = dy (n, out) w (out, in)
    k::Gemm gx;
    gx.m = n, gx.n = in, gx.k = out, gx.ab_dtype = w.dtype;
    gx.a = dy_op, gx.lda = out;
    gx.b = w.data, gx.ldb = in;
    gx.c = dx, gx.ldc = in;
    k::gemm(gx);
    if (dbias != nullptr) k::bias_backward(dbias, dy, out, n, out);
    if (dw == nullptr) return;  // a frozen weight
    // dw (out, in) += dy^T (out, n) x (n, in)
    k::Gemm gw;
    gw.m = out, gw.n = in, gw.k = n, gw.ab_dtype = w.dtype;
    gw.a = dy_op, gw.lda = out, gw.trans_a = true;
    gw.b = operand(x, n * in, w.dtype, 1), gw.ldb = in;
    gw.c = dw, gw.ldc = in;
    gw.accumulate = true;
    k::gemm(gw);
  }

  void rope_forward(float* x, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq, std::int64_t heads,
                    std::int64_t hd, const float* cos, const float* sin) override {
    OpTimer t(*this, "rope");
    k::rope_apply(x + col0, ld, n, seq, heads, hd, cos, sin, false);
  }
  void rope_backward(float* dx, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq,
                     std::int64_t heads, std::int64_t hd, const float* cos, const float* sin) override {
    OpTimer t(*this, "rope.backward");
    k::rope_apply(dx + col0, ld, n, seq, heads, hd, cos, sin, true);
  }

  void attention_forward(float* out, float* lse, const float* qkv, const AttentionShape& s) override {
    OpTimer timer(*this, "attention", 4.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim);
    const Geometry g(s, options_.attention_scratch_bytes, false);
    float* q = scratch_.f32(g.scratch_floats);
    float* kk = q + g.chunk * g.q_block;
    float* v = kk + g.chunk * g.kv_block;
    float* sc = v + g.chunk * g.kv_block;
    float* o = sc + g.chunk * g.s_block;
    for (std::int64_t p0 = 0; p0 < g.pairs; p0 += g.chunk) {
      const std::int64_t p1 = std::min(g.pairs, p0 + g.chunk), c = p1 - p0;
      gather_qkv(q, kk, v, qkv, s, g, p0, p1);
      // S (group*seq, seq) = scale * Q K^T per pair
      batched(c, g.rows, s.seq, s.head_dim, q, s.head_dim, g.q_block, false, kk, s.head_dim, g.kv_block, true, sc,
              s.seq, g.s_block, s.scale, false);
      k::causal_softmax(sc, lse + p0 * g.rows, c * g.rows, s.seq);
      // O (group*seq, hd) = P V
      batched(c, g.rows, s.head_dim, s.seq, sc, s.seq, g.s_block, false, v, s.head_dim, g.kv_block, false, o,
              s.head_dim, g.q_block, 1.0f, false);
      k::heads_scatter(out, s.q_dim(), 0, o, s.seq, s.kv_heads, g.group, s.head_dim, p0, p1);
    }
  }

  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                          const AttentionShape& s) override {
    OpTimer timer(*this, "attention.backward", 10.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim);
    const Geometry g(s, options_.attention_scratch_bytes, true);
    float* q = scratch_.f32(g.scratch_floats);
    float* kk = q + g.chunk * g.q_block;
    float* v = kk + g.chunk * g.kv_block;
    float* p = v + g.chunk * g.kv_block;
    float* dp = p + g.chunk * g.s_block;
    float* o = dp + g.chunk * g.s_block;
    float* dout_h = o + g.chunk * g.q_block;
    float* dq = dout_h + g.chunk * g.q_block;
    float* dk = dq + g.chunk * g.q_block;
    float* dv = dk + g.chunk * g.kv_block;
    float* d = dv + g.chunk * g.kv_block;
    const std::int64_t hd = s.head_dim, kv_col = s.q_dim(), v_col = s.q_dim() + s.kv_heads * hd;
    for (std::int64_t p0 = 0; p0 < g.pairs; p0 += g.chunk) {
      const std::int64_t p1 = std::min(g.pairs, p0 + g.chunk), c = p1 - p0;
      gather_qkv(q, kk, v, qkv, s, g, p0, p1);
      k::heads_gather(o, out, s.q_dim(), 0, s.seq, s.kv_heads, g.group, hd, p0, p1);
      k::heads_gather(dout_h, dout, s.q_dim(), 0, s.seq, s.kv_heads, g.group, hd, p0, p1);
      k::rowwise_dot(d, dout_h, o, c * g.rows, hd);
      // P from the saved log-sum-exp
      batched(c, g.rows, s.seq, hd, q, hd, g.q_block, false, kk, hd, g.kv_block, true, p, s.seq, g.s_block, s.scale,
              false);
      k::causal_softmax_recompute(p, lse + p0 * g.rows, c * g.rows, s.seq);
      // dV (seq, hd) = P^T dO, summed over the group's heads by the product itself
      batched(c, s.seq, hd, g.rows, p, s.seq, g.s_block, true, dout_h, hd, g.q_block, false, dv, hd, g.kv_block, 1.0f,
              false);
      // dP = dO V^T;  dS = P * (dP - rowsum(dO * O))
      batched(c, g.rows, s.seq, hd, dout_h, hd, g.q_block, false, v, hd, g.kv_block, true, dp, s.seq, g.s_block, 1.0f,
              false);
      k::softmax_backward(dp, p, d, c * g.rows, s.seq);
      // dQ = scale dS K;  dK = scale dS^T Q
      batched(c, g.rows, hd, s.seq, dp, s.seq, g.s_block, false, kk, hd, g.kv_block, false, dq, hd, g.q_block, s.scale,
              false);
      batched(c, s.seq, hd, g.rows, dp, s.seq, g.s_block, true, q, hd, g.q_block, false, dk, hd, g.kv_block, s.scale,
              false);
      k::heads_scatter(dqkv, g.ld, 0, dq, s.seq, s.kv_heads, g.group, hd, p0, p1);
      k::heads_scatter(dqkv, g.ld, kv_col, dk, s.seq, s.kv_heads, 1, hd, p0, p1);
      k::heads_scatter(dqkv, g.ld, v_col, dv, s.seq, s.kv_heads, 1, hd, p0, p1);
    }
  }

  void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i) override {
    OpTimer t(*this, "swiglu");
    k::swiglu_forward(out, gu, n, i);
  }
  void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i) override {
    OpTimer t(*this, "swiglu.backward");
    k::swiglu_backward(dgu, dout, gu, n, i);
  }

  void matmul(const Matmul& m) override {
    OpTimer t(*this, "matmul", 2.0 * m.m * m.n * m.k);
    k::Gemm g;
    g.m = m.m, g.n = m.n, g.k = m.k, g.ab_dtype = DType::kF32;
    g.a = m.a, g.lda = m.lda, g.trans_a = m.trans_a;
    g.b = m.b, g.ldb = m.ldb, g.trans_b = m.trans_b;
    g.c = m.c, g.ldc = m.ldc;
    g.alpha = m.alpha;
    g.accumulate = m.accumulate;
    k::gemm(g);
  }
  void dropout(float* y, const float* x, std::int64_t count, float p, std::uint64_t seed, bool accumulate) override {
    OpTimer t(*this, "dropout");
    k::dropout(y, x, count, p, seed, accumulate);
  }
  void add(float* y, const float* x, std::int64_t count) override {
    OpTimer t(*this, "residual");
    k::add_inplace(y, x, count);
  }

  void head_loss_forward(float* lse, float* loss, const float* h, Weight w, const std::int32_t* targets,
                         std::int64_t n, std::int64_t hidden, std::int64_t vocab) override {
    OpTimer t(*this, "head+loss", 2.0 * n * hidden * vocab);
    const std::int64_t vc = vocab_chunk(n, vocab);
    float* logits = scratch_.f32(static_cast<std::size_t>(n * vc));
    std::vector<float> m(static_cast<std::size_t>(n), -INFINITY), sum(static_cast<std::size_t>(n), 0.0f),
        tl(static_cast<std::size_t>(n), 0.0f);
    const void* a = operand(h, n * hidden, w.dtype, 0);
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const std::int64_t c = std::min(vc, vocab - v0);
      chunk_logits(logits, a, w, v0, c, n, hidden);
      k::ce_chunk_forward(m.data(), sum.data(), tl.data(), logits, targets, n, v0, c);
    }
    for (std::int64_t r = 0; r < n; ++r) {
      lse[r] = m[r] + std::log(sum[r]);
      loss[r] = targets[r] >= 0 ? lse[r] - tl[r] : 0.0f;
    }
  }

  void head_loss_backward(float* dh, float* dw, const float* h, Weight w, const std::int32_t* targets,
                          const float* lse, float scale, std::int64_t n, std::int64_t hidden,
                          std::int64_t vocab) override {
    OpTimer t(*this, "head+loss.backward", 6.0 * n * hidden * vocab);
    const std::int64_t vc = vocab_chunk(n, vocab);
    std::vector<float> row_scale(static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < n; ++r) row_scale[r] = targets[r] >= 0 ? scale : 0.0f;
    float* logits = scratch_.f32(static_cast<std::size_t>(n * vc));
    const bool bf = w.dtype == DType::kBF16;
    const void* a = operand(h, n * hidden, w.dtype, 0);
    const std::size_t wbytes = k::dtype_bytes(w.dtype);
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const std::int64_t c = std::min(vc, vocab - v0);
      chunk_logits(logits, a, w, v0, c, n, hidden);
      k::ce_chunk_backward(logits, lse, targets, row_scale.data(), n, v0, c);
      const void* dl = bf ? operand(logits, n * c, w.dtype, 1) : logits;
      // dh (n, hidden) (+)= dlogits (n, c) W_c (c, hidden)
      k::Gemm gh;
      gh.m = n, gh.n = hidden, gh.k = c, gh.ab_dtype = w.dtype;
      gh.a = dl, gh.lda = c;
      gh.b = static_cast<const char*>(w.data) + static_cast<std::size_t>(v0 * hidden) * wbytes, gh.ldb = hidden;
      gh.c = dh, gh.ldc = hidden;
      gh.accumulate = v0 > 0;
      k::gemm(gh);
      if (dw == nullptr) continue;  // a frozen head
      // dW_c (c, hidden) += dlogits^T (c, n) h (n, hidden)
      k::Gemm gw;
      gw.m = c, gw.n = hidden, gw.k = n, gw.ab_dtype = w.dtype;
      gw.a = dl, gw.lda = c, gw.trans_a = true;
      gw.b = a, gw.ldb = hidden;
      gw.c = dw + v0 * hidden, gw.ldc = hidden;
      gw.accumulate = true;
      k::gemm(gw);
    }
  }

  void head_logits(float* logits, const float* h, Weight w, std::int64_t n, std::int64_t hidden,
                   std::int64_t vocab) override {
    OpTimer t(*this, "head.logits", 2.0 * n * hidden * vocab);
    const void* a = operand(h, n * hidden, w.dtype, 0);
    k::Gemm g;
    g.m = n, g.n = vocab, g.k = hidden, g.ab_dtype = w.dtype;
    g.a = a, g.lda = hidden;
    g.b = w.data, g.ldb = hidden, g.trans_b = true;
    g.c = logits, g.ldc = vocab;
    k::gemm(g);
  }

 private:
  // Chunking of attention into work items p = (sequence, kv head) that share one K and V.
  struct Geometry {
    std::int64_t pairs, group, rows, ld, q_block, kv_block, s_block, chunk;
    std::size_t scratch_floats;
    Geometry(const AttentionShape& s, std::size_t budget, bool backward) {
      pairs = s.batch * s.kv_heads;
      group = s.heads / s.kv_heads;
      rows = group * s.seq;
      ld = s.qkv_dim();
      q_block = rows * s.head_dim;
      kv_block = s.seq * s.head_dim;
      s_block = rows * s.seq;
      // forward: Q, K, V, S, O; backward: Q, K, V, P, dP, O, dO, dQ, dK, dV, D
      const std::int64_t per = backward ? 4 * q_block + 4 * kv_block + 2 * s_block + rows
                                        : 2 * q_block + 2 * kv_block + s_block;
      chunk = std::clamp<std::int64_t>(static_cast<std::int64_t>(budget / sizeof(float)) / per, 1, pairs);
      scratch_floats = static_cast<std::size_t>(chunk * per);
    }
  };

  // Q (group heads), K and V of work items [p0, p1) into head-major blocks.
  static void gather_qkv(float* q, float* kk, float* v, const float* qkv, const AttentionShape& s, const Geometry& g,
                         std::int64_t p0, std::int64_t p1) {
    const std::int64_t hd = s.head_dim;
    k::heads_gather(q, qkv, g.ld, 0, s.seq, s.kv_heads, g.group, hd, p0, p1);
    k::heads_gather(kk, qkv, g.ld, s.q_dim(), s.seq, s.kv_heads, 1, hd, p0, p1);
    k::heads_gather(v, qkv, g.ld, s.q_dim() + s.kv_heads * hd, s.seq, s.kv_heads, 1, hd, p0, p1);
  }

  // C[i] = alpha op(A[i]) op(B[i]) over `count` fp32 blocks.
  static void batched(std::int64_t count, std::int64_t m, std::int64_t n, std::int64_t kk, const float* a,
                      std::int64_t lda, std::int64_t sa, bool ta, const float* b, std::int64_t ldb, std::int64_t sb,
                      bool tb, float* c, std::int64_t ldc, std::int64_t sc, float alpha, bool accumulate) {
    k::Gemm g;
    g.batch = count, g.m = m, g.n = n, g.k = kk;
    g.a = a, g.lda = lda, g.stride_a = sa, g.trans_a = ta;
    g.b = b, g.ldb = ldb, g.stride_b = sb, g.trans_b = tb;
    g.c = c, g.ldc = ldc, g.stride_c = sc;
    g.alpha = alpha, g.accumulate = accumulate;
    k::gemm(g);
  }

  // An activation operand of a product with weights of `dtype`: x itself (fp32), or x rounded to
  // bf16 into scratch slot `slot` (two slots: a product may need two rounded operands).
  const void* operand(const float* x, std::int64_t count, DType dtype, int slot) {
    if (dtype != DType::kBF16) return x;
    auto& buf = bf16_[slot];
    if (buf.size() < static_cast<std::size_t>(count)) buf.resize(static_cast<std::size_t>(count));
    k::convert(x, DType::kF32, buf.data(), DType::kBF16, static_cast<std::size_t>(count));
    return buf.data();
  }

  std::int64_t vocab_chunk(std::int64_t n, std::int64_t vocab) const {
    const auto by_budget = static_cast<std::int64_t>(options_.head_chunk_bytes / sizeof(float)) / std::max<std::int64_t>(n, 1);
    const std::int64_t v = std::max<std::int64_t>(vocab, 1);
    return std::clamp<std::int64_t>(by_budget / 64 * 64, std::min<std::int64_t>(64, v), v);
  }

  // logits (n, c) = a (n, hidden) W[v0 : v0 + c]^T
  void chunk_logits(float* logits, const void* a, Weight w, std::int64_t v0, std::int64_t c, std::int64_t n,
                    std::int64_t hidden) {
    k::Gemm g;
    g.m = n, g.n = c, g.k = hidden, g.ab_dtype = w.dtype;
    g.a = a, g.lda = hidden;
    g.b = static_cast<const char*>(w.data) + static_cast<std::size_t>(v0 * hidden) * k::dtype_bytes(w.dtype);
    g.ldb = hidden, g.trans_b = true;
    g.c = logits, g.ldc = c;
    k::gemm(g);
  }

  CpuBackendOptions options_;
  Scratch scratch_;
  std::vector<std::uint16_t> bf16_[2];
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace zinf::runtime
