// The CUDA backend against the CPU backend (the reference): every op on random inputs (never
// zeros), fp32 and bf16 weights, shapes that do not divide the kernels' tiles; then a whole model's
// loss and every gradient. Skips with the reason where there is no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/weights.hpp"

namespace zinf::runtime {
namespace {

std::string gpu_missing() {
  const kernels::GpuQuery q = kernels::query_gpus();
  if (!q.built_with_cuda) return "built without CUDA";
  if (q.gpus.empty()) return q.problem.empty() ? std::string("no GPU") : q.problem;
  return "";
}

#define SKIP_WITHOUT_GPU()                                       \
  do {                                                           \
    const std::string why = gpu_missing();                       \
    if (!why.empty()) GTEST_SKIP() << "no GPU here: " << why;    \
  } while (0)

std::vector<float> random_floats(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) {
    x = nd(rng);
    if (x == 0.0f) x = scale * 1e-3f;
  }
  return v;
}

// The same data on both backends.
class Pair {
 public:
  Pair() : cpu_(make_cpu_backend(CpuBackendOptions{64u << 20, 48u * 256 * 4})),
           gpu_(make_cuda_backend(CudaBackendOptions{0, 48u * 320 * 4})) {}
  Backend& cpu() { return *cpu_; }
  Backend& gpu() { return *gpu_; }

  struct Buf {
    void* c = nullptr;
    void* g = nullptr;
    std::size_t bytes = 0;
  };
  Buf put(const void* host, std::size_t bytes) {
    Buf b{cpu_->allocate(bytes), gpu_->allocate(bytes), bytes};
    std::memcpy(b.c, host, bytes);
    gpu_->upload(b.g, host, bytes);
    bufs_.push_back(b);
    return b;
  }
  Buf floats(const std::vector<float>& v) { return put(v.data(), v.size() * 4); }
  Buf ints(const std::vector<std::int32_t>& v) { return put(v.data(), v.size() * 4); }
  // Weights as fp32 or rounded to bf16 (the same bits on both sides).
  Buf weights(const std::vector<float>& v, DType dt) {
    if (dt == DType::kF32) return floats(v);
    std::vector<std::uint16_t> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) h[i] = kernels::f32_to_bf16(v[i]);
    return put(h.data(), h.size() * 2);
  }
  std::vector<float> cpu_floats(const Buf& b) {
    std::vector<float> v(b.bytes / 4);
    std::memcpy(v.data(), b.c, b.bytes);
    return v;
  }
  std::vector<float> gpu_floats(const Buf& b) {
    gpu_->synchronize();
    std::vector<float> v(b.bytes / 4);
    gpu_->download(v.data(), b.g, b.bytes);
    return v;
  }
  ~Pair() {
    for (const Buf& b : bufs_) {
      cpu_->deallocate(b.c, b.bytes);
      gpu_->deallocate(b.g, b.bytes);
    }
  }

 private:
  std::unique_ptr<Backend> cpu_, gpu_;
  std::vector<Buf> bufs_;
};

// max |gpu - cpu| relative to max |cpu|.
void expect_close(const std::vector<float>& cpu, const std::vector<float>& gpu, double tol, const std::string& what) {
  ASSERT_EQ(cpu.size(), gpu.size()) << what;
  double max_ref = 0, max_err = 0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    ASSERT_TRUE(std::isfinite(gpu[i])) << what << "[" << i << "] = " << gpu[i];
    max_ref = std::max(max_ref, static_cast<double>(std::abs(cpu[i])));
    const double e = std::abs(static_cast<double>(gpu[i]) - cpu[i]);
    if (e > max_err) max_err = e, worst = i;
  }
  EXPECT_LE(max_err, tol * std::max(max_ref, 1e-30))
      << what << ": worst at " << worst << " cpu " << cpu[worst] << " gpu " << gpu[worst] << " (max |ref| " << max_ref
      << ")";
}

Weight w_of(const Pair::Buf& b, DType dt, bool gpu) { return {gpu ? b.g : b.c, dt}; }

class CudaOps : public ::testing::TestWithParam<DType> {};

TEST_P(CudaOps, ElementwiseNormsAndEmbeddingMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  const DType dt = GetParam();
  Pair p;
  const std::int64_t n = 150, h = 200, v = 97, inter = 130;
  std::vector<std::int32_t> tok(n);
  for (std::int64_t i = 0; i < n; ++i) tok[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 31 + 7) % v);
  auto tokens = p.ints(tok);
  auto table = p.weights(random_floats(static_cast<std::size_t>(v * h), 1), dt);
  // embedding forward / backward (repeated tokens accumulate)
  auto emb = p.floats(std::vector<float>(static_cast<std::size_t>(n * h)));
  for (const bool g : {false, true}) {
    (g ? p.gpu() : p.cpu()).embedding_forward(static_cast<float*>(g ? emb.g : emb.c), w_of(table, dt, g),
                                              static_cast<const std::int32_t*>(g ? tokens.g : tokens.c), n, h);
  }
  expect_close(p.cpu_floats(emb), p.gpu_floats(emb), 0, "embedding");
  auto dout = p.floats(random_floats(static_cast<std::size_t>(n * h), 2));
  auto dtable = p.floats(random_floats(static_cast<std::size_t>(v * h), 3));
  for (const bool g : {false, true}) {
    (g ? p.gpu() : p.cpu()).embedding_backward(static_cast<float*>(g ? dtable.g : dtable.c),
                                               static_cast<const float*>(g ? dout.g : dout.c),
                                               static_cast<const std::int32_t*>(g ? tokens.g : tokens.c), n, h);
  }
  expect_close(p.cpu_floats(dtable), p.gpu_floats(dtable), 1e-6, "embedding.backward");
  // rmsnorm
  auto x = p.floats(random_floats(static_cast<std::size_t>(n * h), 4, 3.0f));
  auto w = p.weights(random_floats(static_cast<std::size_t>(h), 5), dt);
  auto y = p.floats(std::vector<float>(static_cast<std::size_t>(n * h)));
  auto rstd = p.floats(std::vector<float>(static_cast<std::size_t>(n)));
  for (const bool g : {false, true}) {
    (g ? p.gpu() : p.cpu()).rmsnorm_forward(static_cast<float*>(g ? y.g : y.c), static_cast<float*>(g ? rstd.g : rstd.c),
                                            static_cast<const float*>(g ? x.g : x.c), w_of(w, dt, g), n, h, 1e-5f);
  }
  expect_close(p.cpu_floats(y), p.gpu_floats(y), 1e-6, "rmsnorm");
  expect_close(p.cpu_floats(rstd), p.gpu_floats(rstd), 1e-6, "rmsnorm rstd");
  auto dx = p.floats(random_floats(static_cast<std::size_t>(n * h), 6));  // added into
  auto dw = p.floats(random_floats(static_cast<std::size_t>(h), 7));
  for (const bool g : {false, true}) {
    (g ? p.gpu() : p.cpu()).rmsnorm_backward(static_cast<float*>(g ? dx.g : dx.c), static_cast<float*>(g ? dw.g : dw.c),
                                             static_cast<const float*>(g ? dout.g : dout.c),
                                             static_cast<const float*>(g ? x.g : x.c), w_of(w, dt, g),
                                             static_cast<const float*>(g ? rstd.g : rstd.c), n, h);
  }
  expect_close(p.cpu_floats(dx), p.gpu_floats(dx), 1e-5, "rmsnorm.backward dx");
  expect_close(p.cpu_floats(dw), p.gpu_floats(dw), 1e-5, "rmsnorm.backward dw");
  // swiglu
  auto gu = p.floats(random_floats(static_cast<std::size_t>(n * 2 * inter), 8, 2.0f));
  auto act = p.floats(std::vector<float>(static_cast<std::size_t>(n * inter)));
  auto dact = p.floats(random_floats(static_cast<std::size_t>(n * inter), 9));
  auto dgu = p.floats(std::vector<float>(static_cast<std::size_t>(n * 2 * inter)));
  for (const bool g : {false, true}) {
    Backend& be = g ? p.gpu() : p.cpu();
    be.swiglu_forward(static_cast<float*>(g ? act.g : act.c), static_cast<const float*>(g ? gu.g : gu.c), n, inter);
    be.swiglu_backward(static_cast<float*>(g ? dgu.g : dgu.c), static_cast<const float*>(g ? dact.g : dact.c),
                       static_cast<const float*>(g ? gu.g : gu.c), n, inter);
    be.add(static_cast<float*>(g ? dx.g : dx.c), static_cast<const float*>(g ? x.g : x.c), n * h);
  }
  expect_close(p.cpu_floats(act), p.gpu_floats(act), 1e-6, "swiglu");
  expect_close(p.cpu_floats(dgu), p.gpu_floats(dgu), 1e-6, "swiglu.backward");
  expect_close(p.cpu_floats(dx), p.gpu_floats(dx), 1e-5, "add");
  // rope on 3 heads of 16 from column 8 of rows of 80, forward then backward
  const std::int64_t seq = 50, hd = 16, ld = 80;
  std::vector<float> cos, sin;
  ModelConfig c;
  c.head_dim = hd;
  c.rope_theta = 10000.0;
  rope_tables(c, seq, cos, sin);
  auto cb = p.floats(cos), sb = p.floats(sin);
  auto r = p.floats(random_floats(static_cast<std::size_t>(n * ld), 10));
  for (const bool g : {false, true}) {
    Backend& be = g ? p.gpu() : p.cpu();
    be.rope_forward(static_cast<float*>(g ? r.g : r.c), ld, 8, n, seq, 3, hd, static_cast<const float*>(g ? cb.g : cb.c),
                    static_cast<const float*>(g ? sb.g : sb.c));
  }
  expect_close(p.cpu_floats(r), p.gpu_floats(r), 1e-6, "rope");
  for (const bool g : {false, true}) {
    Backend& be = g ? p.gpu() : p.cpu();
    be.rope_backward(static_cast<float*>(g ? r.g : r.c), ld, 8, n, seq, 3, hd, static_cast<const float*>(g ? cb.g : cb.c),
                     static_cast<const float*>(g ? sb.g : sb.c));
  }
  expect_close(p.cpu_floats(r), p.gpu_floats(r), 1e-6, "rope.backward");
}

TEST_P(CudaOps, LinearAndHeadLossMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  const DType dt = GetParam();
  const double tol = dt == DType::kF32 ? 2e-5 : 1e-4;  // same bf16 operands; accumulation order differs
  Pair p;
  const std::int64_t n = 96, in = 136, out = 200;
  auto x = p.floats(random_floats(static_cast<std::size_t>(n * in), 11));
  auto w = p.weights(random_floats(static_cast<std::size_t>(out * in), 12, 0.1f), dt);
  auto b = p.weights(random_floats(static_cast<std::size_t>(out), 13), dt);
  auto y = p.floats(std::vector<float>(static_cast<std::size_t>(n * out)));
  auto dy = p.floats(random_floats(static_cast<std::size_t>(n * out), 14));
  auto dx = p.floats(std::vector<float>(static_cast<std::size_t>(n * in)));
  auto dw = p.floats(random_floats(static_cast<std::size_t>(out * in), 15));
  auto db = p.floats(random_floats(static_cast<std::size_t>(out), 16));
  for (const bool g : {false, true}) {
    Backend& be = g ? p.gpu() : p.cpu();
    be.linear_forward(static_cast<float*>(g ? y.g : y.c), static_cast<const float*>(g ? x.g : x.c), w_of(w, dt, g),
                      w_of(b, dt, g), n, in, out);
    be.linear_backward(static_cast<float*>(g ? dx.g : dx.c), static_cast<float*>(g ? dw.g : dw.c),
                       static_cast<float*>(g ? db.g : db.c), static_cast<const float*>(g ? dy.g : dy.c),
                       static_cast<const float*>(g ? x.g : x.c), w_of(w, dt, g), n, in, out);
  }
  expect_close(p.cpu_floats(y), p.gpu_floats(y), tol, "linear");
  expect_close(p.cpu_floats(dx), p.gpu_floats(dx), tol, "linear.backward dx");
  expect_close(p.cpu_floats(dw), p.gpu_floats(dw), tol, "linear.backward dw");
  expect_close(p.cpu_floats(db), p.gpu_floats(db), 1e-5, "linear.backward dbias");
  // LM head + cross-entropy over 1000 words in several chunks; some rows ignored.
  const std::int64_t rows = 48, hidden = 64, vocab = 1000;
  std::vector<std::int32_t> tg(rows);
  for (std::int64_t i = 0; i < rows; ++i) tg[static_cast<std::size_t>(i)] = i % 7 == 3 ? -100 : static_cast<std::int32_t>((i * 37) % vocab);
  auto targets = p.ints(tg);
  auto hh = p.floats(random_floats(static_cast<std::size_t>(rows * hidden), 17));
  auto hw = p.weights(random_floats(static_cast<std::size_t>(vocab * hidden), 18, 0.2f), dt);
  auto lse = p.floats(std::vector<float>(static_cast<std::size_t>(rows)));
  auto loss = p.floats(std::vector<float>(static_cast<std::size_t>(rows)));
  auto dh = p.floats(std::vector<float>(static_cast<std::size_t>(rows * hidden)));
  auto dhw = p.floats(random_floats(static_cast<std::size_t>(vocab * hidden), 19));
  auto logits = p.floats(std::vector<float>(static_cast<std::size_t>(rows * vocab)));
  for (const bool g : {false, true}) {
    Backend& be = g ? p.gpu() : p.cpu();
    const auto* t = static_cast<const std::int32_t*>(g ? targets.g : targets.c);
    be.head_loss_forward(static_cast<float*>(g ? lse.g : lse.c), static_cast<float*>(g ? loss.g : loss.c),
                         static_cast<const float*>(g ? hh.g : hh.c), w_of(hw, dt, g), t, rows, hidden, vocab);
    be.head_loss_backward(static_cast<float*>(g ? dh.g : dh.c), static_cast<float*>(g ? dhw.g : dhw.c),
                          static_cast<const float*>(g ? hh.g : hh.c), w_of(hw, dt, g), t,
                          static_cast<const float*>(g ? lse.g : lse.c), 0.5f, rows, hidden, vocab);
    be.head_logits(static_cast<float*>(g ? logits.g : logits.c), static_cast<const float*>(g ? hh.g : hh.c),
                   w_of(hw, dt, g), rows, hidden, vocab);
  }
  expect_close(p.cpu_floats(lse), p.gpu_floats(lse), 1e-5, "head loss lse");
  expect_close(p.cpu_floats(loss), p.gpu_floats(loss), 1e-5, "head loss");
  expect_close(p.cpu_floats(dh), p.gpu_floats(dh), tol, "head loss dh");
  expect_close(p.cpu_floats(dhw), p.gpu_floats(dhw), tol, "head loss dw");
  expect_close(p.cpu_floats(logits), p.gpu_floats(logits), tol, "head logits");
}

INSTANTIATE_TEST_SUITE_P(Weights, CudaOps, ::testing::Values(DType::kF32, DType::kBF16),
                         [](const auto& param_info) { return param_info.param == DType::kF32 ? std::string("fp32") : std::string("bf16"); });

TEST(CudaAttention, MatchesTheCpuForEveryShape) {
  SKIP_WITHOUT_GPU();
  Pair p;
  struct Shape {
    std::int64_t batch, seq, heads, kv, hd;
  };
  // Sequences that do not fill the 32-row tiles; GQA groups of 1, 2 and 4; head dims 16 to 128.
  for (const Shape s : {Shape{2, 45, 4, 2, 16}, Shape{1, 70, 8, 2, 64}, Shape{2, 33, 2, 2, 128}, Shape{1, 5, 4, 1, 32}}) {
    const AttentionShape a{s.batch, s.seq, s.heads, s.kv, s.hd, static_cast<float>(1.0 / std::sqrt(double(s.hd)))};
    const std::int64_t n = a.rows();
    const std::string what = fmt::format("attention b{} t{} h{} kv{} d{}", s.batch, s.seq, s.heads, s.kv, s.hd);
    auto qkv = p.floats(random_floats(static_cast<std::size_t>(n * a.qkv_dim()), 20, 1.5f));
    auto out = p.floats(std::vector<float>(static_cast<std::size_t>(n * a.q_dim())));
    auto lse = p.floats(std::vector<float>(static_cast<std::size_t>(s.batch * s.heads * s.seq)));
    auto dout = p.floats(random_floats(static_cast<std::size_t>(n * a.q_dim()), 21));
    auto dqkv = p.floats(std::vector<float>(static_cast<std::size_t>(n * a.qkv_dim())));
    for (const bool g : {false, true}) {
      Backend& be = g ? p.gpu() : p.cpu();
      be.attention_forward(static_cast<float*>(g ? out.g : out.c), static_cast<float*>(g ? lse.g : lse.c),
                           static_cast<const float*>(g ? qkv.g : qkv.c), a);
    }
    expect_close(p.cpu_floats(out), p.gpu_floats(out), 1e-5, what);
    expect_close(p.cpu_floats(lse), p.gpu_floats(lse), 1e-5, what + " lse");
    for (const bool g : {false, true}) {
      Backend& be = g ? p.gpu() : p.cpu();
      // Both sides from the CPU's forward output, so backward is compared on its own.
      be.attention_backward(static_cast<float*>(g ? dqkv.g : dqkv.c), static_cast<const float*>(g ? dout.g : dout.c),
                            static_cast<const float*>(g ? qkv.g : qkv.c), static_cast<const float*>(g ? out.g : out.c),
                            static_cast<const float*>(g ? lse.g : lse.c), a);
    }
    expect_close(p.cpu_floats(dqkv), p.gpu_floats(dqkv), 2e-5, what + " backward");
  }
}

TEST(CudaAttention, FlashBf16MatchesTheCpuWithinBf16Tolerance) {
  // The tensor-core kernels (head dims 64 and 128, bf16 operands, fp32 accumulation and softmax)
  // against the CPU's fp32 attention: tiles of 64 rows, so sequences of 45, 64, 130 and 200 cover
  // partial, exact and several tiles, with GQA groups of 1, 2 and 4.
  SKIP_WITHOUT_GPU();
  Pair p;
  struct Shape {
    std::int64_t batch, seq, heads, kv, hd;
  };
  for (const Shape s : {Shape{2, 45, 4, 2, 64}, Shape{2, 64, 4, 4, 64}, Shape{1, 130, 8, 2, 128}, Shape{1, 200, 4, 1, 128}}) {
    AttentionShape a{s.batch, s.seq, s.heads, s.kv, s.hd, static_cast<float>(1.0 / std::sqrt(double(s.hd)))};
    const std::int64_t n = a.rows();
    const std::string what = fmt::format("flash attention b{} t{} h{} kv{} d{}", s.batch, s.seq, s.heads, s.kv, s.hd);
    auto qkv = p.floats(random_floats(static_cast<std::size_t>(n * a.qkv_dim()), 30, 1.5f));
    auto out = p.floats(std::vector<float>(static_cast<std::size_t>(n * a.q_dim())));
    auto lse = p.floats(std::vector<float>(static_cast<std::size_t>(s.batch * s.heads * s.seq)));
    auto dout = p.floats(random_floats(static_cast<std::size_t>(n * a.q_dim()), 31));
    auto dqkv = p.floats(std::vector<float>(static_cast<std::size_t>(n * a.qkv_dim())));
    for (const bool g : {false, true}) {
      a.bf16_products = g;
      Backend& be = g ? p.gpu() : p.cpu();
      be.attention_forward(static_cast<float*>(g ? out.g : out.c), static_cast<float*>(g ? lse.g : lse.c),
                           static_cast<const float*>(g ? qkv.g : qkv.c), a);
    }
    expect_close(p.cpu_floats(out), p.gpu_floats(out), 2e-2, what);
    expect_close(p.cpu_floats(lse), p.gpu_floats(lse), 5e-3, what + " lse");
    // Backward from each side's own forward (as in training).
    for (const bool g : {false, true}) {
      a.bf16_products = g;
      Backend& be = g ? p.gpu() : p.cpu();
      be.attention_backward(static_cast<float*>(g ? dqkv.g : dqkv.c), static_cast<const float*>(g ? dout.g : dout.c),
                            static_cast<const float*>(g ? qkv.g : qkv.c), static_cast<const float*>(g ? out.g : out.c),
                            static_cast<const float*>(g ? lse.g : lse.c), a);
    }
    const auto c = p.cpu_floats(dqkv), gg = p.gpu_floats(dqkv);
    // dq, dk and dv separately: each has its own scale.
    for (const auto& [name, col0, cols] : {std::tuple<const char*, std::int64_t, std::int64_t>{"dq", 0, a.q_dim()},
                                           {"dk", a.q_dim(), s.kv * s.hd}, {"dv", a.q_dim() + s.kv * s.hd, s.kv * s.hd}}) {
      std::vector<float> x, y;
      for (std::int64_t r = 0; r < n; ++r) {
        for (std::int64_t j = 0; j < cols; ++j) {
          x.push_back(c[static_cast<std::size_t>(r * a.qkv_dim() + col0 + j)]);
          y.push_back(gg[static_cast<std::size_t>(r * a.qkv_dim() + col0 + j)]);
        }
      }
      expect_close(x, y, 3e-2, what + " backward " + name);
    }
  }
}

// A whole model on both backends from the same weights and batch: the loss and every gradient.
void compare_models(DType dt, double loss_tol, double grad_tol) {
  Pair p;
  nlohmann::json j{{"architectures", {"LlamaForCausalLM"}},
                   {"hidden_size", 128},
                   {"num_hidden_layers", 2},
                   {"num_attention_heads", 2},  // head dim 64: bf16 runs use the flash kernels
                   {"num_key_value_heads", 1},
                   {"intermediate_size", 224},
                   {"vocab_size", 300},
                   {"max_position_embeddings", 128},
                   {"rms_norm_eps", 1e-5},
                   {"attention_bias", true},
                   {"tie_word_embeddings", false}};
  const ModelConfig cfg = parse_model_config(j, "test");
  Model mc(cfg, p.cpu(), ModelOptions{dt, true, {}});
  Model mg(cfg, p.gpu(), ModelOptions{dt, true, {}});
  const ModelLayout& layout = mc.layout();
  UnitStorage master(p.cpu(), layout, DType::kF32);
  init_parameters(cfg, layout, 7, p.cpu(), master.view());
  UnitStorage pc(p.cpu(), layout, dt), pg(p.gpu(), layout, dt), gc(p.cpu(), layout, DType::kF32),
      gg(p.gpu(), layout, DType::kF32);
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const auto count = static_cast<std::size_t>(layout.units[u].numel);
    const auto* m = static_cast<const float*>(master.view().units[u]);
    if (dt == DType::kF32) {
      std::memcpy(pc.view().units[u], m, count * 4);
      p.gpu().upload(pg.view().units[u], m, count * 4);
    } else {
      std::vector<std::uint16_t> h(count);
      for (std::size_t i = 0; i < count; ++i) h[i] = kernels::f32_to_bf16(m[i]);
      std::memcpy(pc.view().units[u], h.data(), count * 2);
      p.gpu().upload(pg.view().units[u], h.data(), count * 2);
    }
  }
  const std::int64_t batch = 2, seq = 40;
  std::vector<std::int32_t> tokens(batch * seq), targets(batch * seq);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<std::int32_t>((i * 7919 + 13) % 300);
    targets[i] = i % 11 == 5 ? -100 : static_cast<std::int32_t>((i * 104729 + 3) % 300);
  }
  mc.set_batch(tokens, targets, batch, seq);
  mg.set_batch(tokens, targets, batch, seq);
  const float lc = mc.forward(pc.view());
  const float lg = mg.forward(pg.view());
  EXPECT_NEAR(lg, lc, loss_tol * std::abs(lc)) << "loss";
  mc.backward(pc.view(), gc.view(), 1.0f);
  mg.backward(pg.view(), gg.view(), 1.0f);
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const auto count = static_cast<std::size_t>(layout.units[u].numel);
    std::vector<float> a(count), b(count);
    std::memcpy(a.data(), gc.view().units[u], count * 4);
    p.gpu().download(b.data(), gg.view().units[u], count * 4);
    for (const TensorSpec& t : layout.units[u].tensors) {
      expect_close(std::vector<float>(a.begin() + t.offset, a.begin() + t.offset + t.numel()),
                   std::vector<float>(b.begin() + t.offset, b.begin() + t.offset + t.numel()), grad_tol,
                   "grad " + t.name);
    }
  }
}

TEST(CudaModel, Fp32LossAndEveryGradientMatchTheCpuTightly) {
  SKIP_WITHOUT_GPU();
  compare_models(DType::kF32, 1e-5, 1e-4);
}

TEST(CudaModel, Bf16LossAndEveryGradientMatchTheCpuWithinBf16Tolerance) {
  SKIP_WITHOUT_GPU();
  compare_models(DType::kBF16, 2e-3, 3e-2);
}

TEST(CudaBackend, CopyStreamsAndSumOfSquares) {
  // The copy streams, ordered by events against compute: a buffer uploaded on the host-to-device
  // stream, added to on the compute stream, copied down on the device-to-host stream
  // into page-locked memory, waited for with Event::synchronize. Then the sum of squares against
  // a double sum on the host, on sizes around the kernel's block and partial counts.
  SKIP_WITHOUT_GPU();
  Pair p;
  Backend& g = p.gpu();
  const std::size_t n = 3 * 1024 * 1024 + 77;
  const std::vector<float> a = random_floats(n, 11), b = random_floats(n, 12);
  DeviceBuffer da(g, n * 4), db(g, n * 4);
  g.upload(db.data(), b.data(), n * 4);
  g.copy_to_device_async(da.data(), a.data(), n * 4, Stream::kHostToDevice);
  g.wait(Stream::kCompute, *g.record(Stream::kHostToDevice));
  g.add(da.f32(), db.f32(), static_cast<std::int64_t>(n));
  g.wait(Stream::kDeviceToHost, *g.record(Stream::kCompute));
  std::vector<float> out(n, 0.0f);
  g.copy_to_host_async(out.data(), da.data(), n * 4, Stream::kDeviceToHost);
  g.record(Stream::kDeviceToHost)->synchronize();
  for (std::size_t i = 0; i < n; i += 997) ASSERT_EQ(out[i], a[i] + b[i]) << i;
  ASSERT_EQ(out[n - 1], a[n - 1] + b[n - 1]);

  DeviceBuffer sq(g, 4 * sizeof(double));
  const std::size_t sizes[] = {1, 255, 1024 * 1024 + 3, n};
  for (std::size_t k = 0; k < 4; ++k) {
    g.sum_squares(static_cast<double*>(sq.data()) + k, da.f32(), static_cast<std::int64_t>(sizes[k]));
  }
  double got[4];
  g.download(got, sq.data(), sizeof(got));
  for (std::size_t k = 0; k < 4; ++k) {
    double want = 0;
    for (std::size_t i = 0; i < sizes[k]; ++i) want += double(out[i]) * out[i];
    EXPECT_NEAR(got[k], want, 1e-12 * want) << sizes[k];
  }
  // The same twice: a fixed order.
  double again = 0;
  g.sum_squares(static_cast<double*>(sq.data()), da.f32(), static_cast<std::int64_t>(n));
  g.download(&again, sq.data(), sizeof(again));
  EXPECT_EQ(again, got[3]);
  // A non-finite element makes the sum non-finite (the overflow check).
  const float inf = INFINITY;
  g.upload(da.f32() + 12345, &inf, 4);
  g.sum_squares(static_cast<double*>(sq.data()), da.f32(), static_cast<std::int64_t>(n));
  g.download(&again, sq.data(), sizeof(again));
  EXPECT_FALSE(std::isfinite(again));
}

// Runs one Adam step on `b` from the same starting point and returns (master, exp_avg, exp_avg_sq,
// bf16-or-fp32 parameters out) as raw words.
struct AdamResult {
  std::vector<std::uint32_t> master, m, v;
  std::vector<std::uint16_t> out16;
  std::vector<std::uint32_t> out32;
};
AdamResult adam_on(Backend& b, const kernels::cpu::AdamConfig& c, const std::vector<float>& p0, const std::vector<float>& m0,
                   const std::vector<float>& v0, const std::vector<float>& g32, DType grad_dtype, DType out_dtype, bool out) {
  const std::size_t n = p0.size();
  std::vector<std::uint16_t> g16(n);
  for (std::size_t i = 0; i < n; ++i) g16[i] = kernels::f32_to_bf16(g32[i]);
  DeviceBuffer dp(b, n * 4), dm(b, n * 4), dv(b, n * 4), dg(b, n * 4), dout(b, n * 4);
  b.upload(dp.data(), p0.data(), n * 4);
  b.upload(dm.data(), m0.data(), n * 4);
  b.upload(dv.data(), v0.data(), n * 4);
  if (grad_dtype == DType::kBF16) {
    b.upload(dg.data(), g16.data(), n * 2);
  } else {
    b.upload(dg.data(), g32.data(), n * 4);
  }
  kernels::cpu::AdamTensors t;
  t.param = dp.f32();
  t.exp_avg = dm.data();
  t.exp_avg_sq = dv.data();
  t.grad = dg.data();
  t.grad_dtype = grad_dtype;
  t.param_out = out ? dout.data() : nullptr;
  t.out_dtype = out_dtype;
  t.n = n;
  b.adam_step(c, t);
  const auto words = [&](const DeviceBuffer& buf) {
    std::vector<std::uint32_t> w(n);
    b.download(w.data(), buf.data(), n * 4);
    return w;
  };
  AdamResult r{words(dp), words(dm), words(dv), {}, {}};
  if (out && out_dtype == DType::kBF16) {
    std::vector<std::uint16_t> h(n);
    b.download(h.data(), dout.data(), n * 2);
    r.out16 = std::move(h);
  } else if (out) {
    r.out32 = words(dout);
  }
  return r;
}

TEST(CudaBackend, AdamStepAgreesWithTheCpuKernelBitForBit) {
  // The GPU's share of the optimizer must step a unit exactly as the host would: the same fp32
  // master and moments, the same rounded parameters. Random state over many magnitudes (moments
  // from earlier steps, gradients from 1e-8 to 1e2, a few exact bf16 ties), AdamW and Adam (L2),
  // with and without bias correction, scaled gradients, fp32 and bf16 gradients and outputs.
  SKIP_WITHOUT_GPU();
  Pair pair;
  const std::size_t n = 1'000'003;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> expo(-8.0f, 2.0f);
  std::vector<float> p0 = random_floats(n, 31, 0.05f), m0(n), v0(n), g(n);
  for (std::size_t i = 0; i < n; ++i) {
    g[i] = (rng() & 1 ? 1.0f : -1.0f) * std::pow(10.0f, expo(rng));
    m0[i] = 0.1f * g[i] * static_cast<float>(rng() % 7);
    v0[i] = 0.01f * g[i] * g[i] * static_cast<float>(rng() % 5);
  }
  for (std::size_t i = 0; i < n; i += 997) p0[i] = std::ldexp(1.0f + 1.0f / 256.0f, -static_cast<int>(i % 20));  // ties
  // Elements the step leaves as they are (no gradient, no moments), so bf16 ties and fp32
  // subnormals reach the output rounding (the cases without weight decay keep them).
  for (std::size_t i = 5; i < n; i += 1009) {
    g[i] = m0[i] = v0[i] = 0.0f;
    p0[i] = (i / 1009) % 2 ? std::ldexp(1.0f + 3.0f / 256.0f, -130) : std::ldexp(1.0f + 1.0f / 256.0f, -static_cast<int>(i % 9));
  }
  struct Case {
    kernels::cpu::AdamConfig c;
    DType grad, out;
    bool has_out;
  };
  std::vector<Case> cases;
  kernels::cpu::AdamConfig adamw;
  adamw.lr = 3e-4;
  adamw.weight_decay = 0.1;
  adamw.step = 7;
  adamw.grad_scale = 0.37f;
  kernels::cpu::AdamConfig adam = adamw;
  adam.adam_w_mode = false;
  adam.step = 1;
  adam.grad_scale = 1.0f;
  kernels::cpu::AdamConfig plain = adamw;
  plain.bias_correction = false;
  plain.weight_decay = 0.0;
  plain.eps = 1e-6;
  for (const auto& c : {adamw, adam, plain}) {
    cases.push_back({c, DType::kF32, DType::kBF16, true});
    cases.push_back({c, DType::kBF16, DType::kBF16, true});
    cases.push_back({c, DType::kF32, DType::kF32, true});
  }
  cases.push_back({adamw, DType::kBF16, DType::kBF16, false});
  for (std::size_t k = 0; k < cases.size(); ++k) {
    const Case& cs = cases[k];
    const AdamResult want = adam_on(pair.cpu(), cs.c, p0, m0, v0, g, cs.grad, cs.out, cs.has_out);
    const AdamResult got = adam_on(pair.gpu(), cs.c, p0, m0, v0, g, cs.grad, cs.out, cs.has_out);
    std::size_t bad = 0, first = n;
    for (std::size_t i = 0; i < n; ++i) {
      const bool same = got.master[i] == want.master[i] && got.m[i] == want.m[i] && got.v[i] == want.v[i] &&
                        (got.out16.empty() || got.out16[i] == want.out16[i]) &&
                        (got.out32.empty() || got.out32[i] == want.out32[i]);
      if (!same) {
        ++bad;
        if (first == n) first = i;
      }
    }
    EXPECT_EQ(bad, 0u) << "case " << k << ": " << bad << " elements differ, the first at " << first;
    EXPECT_NE(got.master, std::vector<std::uint32_t>(reinterpret_cast<const std::uint32_t*>(p0.data()),
                                                     reinterpret_cast<const std::uint32_t*>(p0.data()) + n))
        << "case " << k << ": the step changed nothing";
  }
  // What the GPU step cannot take is refused.
  DeviceBuffer x(pair.gpu(), 64);
  kernels::cpu::AdamTensors t;
  t.param = x.f32();
  t.exp_avg = t.exp_avg_sq = x.data();
  t.grad = x.data();
  t.state_dtype = DType::kBF16;
  t.n = 4;
  EXPECT_THROW(pair.gpu().adam_step(adamw, t), Error);
}

TEST(CudaBackend, AMemoryLimitCountsEveryAllocation) {
  SKIP_WITHOUT_GPU();
  CudaBackendOptions o;
  o.memory_limit = 64u << 20;
  auto g = make_cuda_backend(o);
  const std::size_t base = g->memory_in_use();  // the cuBLASLt workspace
  EXPECT_GT(base, 0u);
  EXPECT_EQ(g->memory_limit(), o.memory_limit);
  {
    DeviceBuffer a(*g, 16u << 20);
    EXPECT_EQ(g->memory_in_use(), base + (16u << 20));
    try {
      DeviceBuffer b(*g, 48u << 20);
      ADD_FAILURE() << "an allocation past the limit succeeded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("GPU memory limit"), std::string::npos) << e.what();
    }
    EXPECT_EQ(g->memory_in_use(), base + (16u << 20));  // the refused one left nothing counted
  }
  EXPECT_EQ(g->memory_in_use(), base);
  EXPECT_EQ(g->memory_peak(), base + (16u << 20));
}

TEST(CudaBackend, WithoutAGpuTheErrorSaysWhy) {
  const std::string why = gpu_missing();
  if (why.empty()) GTEST_SKIP() << "a GPU is here; the error path needs its absence";
  try {
    make_cuda_backend();
    ADD_FAILURE() << "make_cuda_backend succeeded without a GPU";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_TRUE(msg.find("no usable GPU") != std::string::npos || msg.find("without CUDA") != std::string::npos ||
                msg.find("not in this build") != std::string::npos)
        << msg;
  }
}

}  // namespace
}  // namespace zinf::runtime
