// The Llama-family decoder on a Backend (model.hpp). Per layer (HF LlamaDecoderLayer):
//   h1 = rmsnorm(x); qkv = h1 Wqkv^T (+b); rope(q, k); a = attention(q, k, v); xm = x + a Wo^T (+b)
//   h2 = rmsnorm(xm); gu = h2 Wgu^T (+b); m = silu(gate) * up; out = xm + m Wdown^T (+b)
// and the head: loss = cross_entropy(rmsnorm(x_L) Whead^T, targets), mean over targets.
#include "zinf/runtime/model.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/kernels/dropout.hpp"

namespace zinf::runtime {

Weight UnitBuffers::weight(const ModelLayout& layout, std::size_t unit, TensorRole role) const {
  const std::int64_t off = layout.units[unit].offset(role);
  if (off < 0) return {};
  ZINF_ASSERT(units[unit] != nullptr, "unit {} ({}) is not available", unit, layout.units[unit].name);
  return {static_cast<const char*>(units[unit]) + off * static_cast<std::int64_t>(kernels::cpu::dtype_bytes(dtype)),
          dtype};
}

float* UnitBuffers::grad(const ModelLayout& layout, std::size_t unit, TensorRole role) const {
  if (units.empty()) return nullptr;  // a frozen model
  ZINF_ASSERT(dtype == DType::kF32, "gradients are fp32");
  const std::int64_t off = layout.units[unit].offset(role);
  if (off < 0) return nullptr;
  ZINF_ASSERT(units[unit] != nullptr, "gradient of unit {} ({}) is not available", unit, layout.units[unit].name);
  return static_cast<float*>(units[unit]) + off;
}

UnitStorage::UnitStorage(Backend& backend, const ModelLayout& layout, DType dtype) : backend_(backend) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    throw Error("model parameters must be fp32 or bf16, not {}", kernels::cpu::dtype_name(dtype));
  }
  view_.dtype = dtype;
  for (const UnitLayout& u : layout.units) {
    buffers_.emplace_back(backend, static_cast<std::size_t>(u.numel) * kernels::cpu::dtype_bytes(dtype));
    view_.units.push_back(buffers_.back().data());
  }
  zero();
}

void UnitStorage::zero() {
  for (const DeviceBuffer& b : buffers_) backend_.fill_zero(b.data(), b.bytes());
}

void rope_tables(const ModelConfig& c, std::int64_t seq, std::vector<float>& cos, std::vector<float>& sin) {
  const std::int64_t half = c.head_dim / 2;
  std::vector<float> inv(static_cast<std::size_t>(half));
  const RopeScaling& rs = c.rope_scaling;
  for (std::int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    float f = 1.0f / std::pow(static_cast<float>(c.rope_theta), e);
    if (rs.type == RopeScaling::Type::kLinear) {
      f = static_cast<float>(f / rs.factor);
    } else if (rs.type == RopeScaling::Type::kLlama3) {
      const double old_len = static_cast<double>(rs.original_max_position_embeddings);
      const double low_wavelen = old_len / rs.low_freq_factor;
      const double high_wavelen = old_len / rs.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rs.factor);  // low frequencies: scaled
      } else if (wavelen >= high_wavelen) {
        // medium: interpolated between scaled and unscaled
        const double smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rs.factor + smooth * f);
      }
    }
    inv[i] = f;
  }
  cos.resize(static_cast<std::size_t>(seq * half));
  sin.resize(cos.size());
  for (std::int64_t t = 0; t < seq; ++t) {
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(t) * inv[i];
      cos[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

// What one layer's backward needs from its forward.
struct Model::LayerActs {
  DeviceBuffer h1, rstd1, qkv, attn, lse, xmid, h2, rstd2, gu, act;
  DeviceBuffer lora_t;  // LoRA: t = dropout(x) A^T (n, rank) of each adapter of the layer
  LayerActs(Backend& b, const ModelConfig& c, std::int64_t n, std::int64_t batch, std::int64_t lora_floats) {
    const auto f = [&](std::int64_t count) { return DeviceBuffer(b, static_cast<std::size_t>(count) * sizeof(float)); };
    h1 = f(n * c.hidden_size);
    rstd1 = f(n);
    qkv = f(n * c.qkv_dim());
    attn = f(n * c.q_dim());
    lse = f(batch * c.num_heads * (n / batch));
    xmid = f(n * c.hidden_size);
    h2 = f(n * c.hidden_size);
    rstd2 = f(n);
    gu = f(n * 2 * c.intermediate_size);
    act = f(n * c.intermediate_size);
    if (lora_floats > 0) lora_t = f(lora_floats);
  }
  std::size_t bytes() const {
    return h1.bytes() + rstd1.bytes() + qkv.bytes() + attn.bytes() + lse.bytes() + xmid.bytes() + h2.bytes() +
           rstd2.bytes() + gu.bytes() + act.bytes() + lora_t.bytes();
  }
};

struct Model::Buffers {
  DeviceBuffer tokens, targets, cos, sin;
  std::vector<DeviceBuffer> x;        // layer inputs x[0..L] (x[L] feeds the final norm)
  std::vector<LayerActs> layers;      // one (checkpointing) or L
  DeviceBuffer hf, rstd_f, lse_ce, loss_rows;
  DeviceBuffer dx, dh, dattn, dqkv, dgu, dact;
  DeviceBuffer lora_x, lora_dx, lora_dt;  // LoRA scratch: dropped input, its gradient, d t
  std::vector<std::int32_t> host_targets;
};

namespace {

// LoRA's activation sizes for n rows: per layer t of every adapter; shared, d t and (with dropout)
// the dropped input and its gradient at the widest adapter input.
struct LoraActFloats {
  std::int64_t per_layer = 0, dt = 0, x = 0;
};
LoraActFloats lora_act_floats(const ModelConfig& c, const LoraConfig& lora, std::int64_t n) {
  LoraActFloats f;
  if (!lora.enabled()) return f;
  std::int64_t widest = 0;
  for (const LoraTarget t : lora.targets) {
    widest = std::max(widest, t == LoraTarget::kO ? c.q_dim() : t == LoraTarget::kDown ? c.intermediate_size : c.hidden_size);
  }
  f.per_layer = n * lora.rank * static_cast<std::int64_t>(lora.targets.size());
  f.dt = n * lora.rank;
  f.x = lora.dropout > 0.0 ? n * widest : 0;
  return f;
}

}  // namespace

Model::Model(ModelConfig config, Backend& backend, ModelOptions options)
    : config_(std::move(config)), layout_(make_layout(config_)), backend_(backend), options_(options) {
  if (options_.param_dtype != DType::kF32 && options_.param_dtype != DType::kBF16) {
    throw Error("model parameters must be fp32 or bf16, not {}", kernels::cpu::dtype_name(options_.param_dtype));
  }
  if (options_.lora.enabled()) lora_.emplace(make_lora_layout(config_, options_.lora));
}

Model::~Model() = default;

const LoraLayout& Model::lora() const {
  if (!lora_) throw Error("the model has no LoRA adapters");
  return *lora_;
}

std::vector<std::size_t> Model::backward_param_reads(std::size_t unit) const {
  if (unit == 0) return {};
  return unit_reads(unit);
}

std::vector<std::size_t> Model::unit_reads(std::size_t unit) const {
  if (unit == layout_.head_unit() && config_.tie_word_embeddings) return {unit, 0};
  return {unit};
}

void Model::set_batch(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets,
                      std::int64_t batch, std::int64_t seq) {
  if (batch <= 0 || seq <= 0) throw Error("batch ({}) and sequence length ({}) must be positive", batch, seq);
  const std::int64_t n = batch * seq;
  if (static_cast<std::int64_t>(tokens.size()) != n || static_cast<std::int64_t>(targets.size()) != n) {
    throw Error("a batch of {} x {} needs {} tokens and targets, got {} and {}", batch, seq, n, tokens.size(),
                targets.size());
  }
  if (seq > config_.max_position_embeddings) {
    throw Error("sequence length {} exceeds the model's max_position_embeddings {} ({}); use a shorter --seq", seq,
                config_.max_position_embeddings, config_.source);
  }
  if (config_.sliding_window && seq > *config_.sliding_window) {
    throw Error("sequence length {} exceeds the sliding window {} of {}; zinf does not implement sliding-window "
                "attention, so sequences must fit in the window", seq, *config_.sliding_window, config_.source);
  }
  std::int64_t counted = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      throw Error("token id {} at position {} is outside the vocabulary (vocab_size {}); the data does not match the "
                  "model", tokens[i], i, config_.vocab_size);
    }
    if (targets[i] >= config_.vocab_size) {
      throw Error("target id {} at position {} is outside the vocabulary (vocab_size {})", targets[i], i,
                  config_.vocab_size);
    }
    counted += targets[i] >= 0 ? 1 : 0;
  }
  if (counted == 0) throw Error("the batch has no target token (every target is ignored)");

  const bool reshape = !buf_ || batch != batch_ || seq != seq_;
  batch_ = batch, seq_ = seq, rows_ = n, targets_counted_ = counted;
  if (reshape) {
    buf_.reset();
    auto b = std::make_unique<Buffers>();
    Backend& be = backend_;
    const ModelConfig& c = config_;
    const auto f = [&](std::int64_t count) { return DeviceBuffer(be, static_cast<std::size_t>(count) * sizeof(float)); };
    b->tokens = DeviceBuffer(be, static_cast<std::size_t>(n) * 4);
    b->targets = DeviceBuffer(be, static_cast<std::size_t>(n) * 4);
    std::vector<float> cos, sin;
    rope_tables(c, seq, cos, sin);
    b->cos = f(static_cast<std::int64_t>(cos.size()));
    b->sin = f(static_cast<std::int64_t>(sin.size()));
    be.upload(b->cos.data(), cos.data(), cos.size() * 4);
    be.upload(b->sin.data(), sin.data(), sin.size() * 4);
    for (std::int64_t l = 0; l <= c.num_layers; ++l) b->x.push_back(f(n * c.hidden_size));
    const std::int64_t kept = options_.checkpoint_activations ? 1 : c.num_layers;
    const LoraActFloats lf = lora_act_floats(c, options_.lora, n);
    for (std::int64_t l = 0; l < kept; ++l) b->layers.emplace_back(be, c, n, batch, lf.per_layer);
    if (lf.dt > 0) b->lora_dt = f(lf.dt);
    if (lf.x > 0) {
      b->lora_x = f(lf.x);
      b->lora_dx = f(lf.x);
    }
    b->hf = f(n * c.hidden_size);
    b->rstd_f = f(n);
    b->lse_ce = f(n);
    b->loss_rows = f(n);
    b->dx = f(n * c.hidden_size);
    b->dh = f(n * c.hidden_size);
    b->dattn = f(n * c.q_dim());
    b->dqkv = f(n * c.qkv_dim());
    b->dgu = f(n * 2 * c.intermediate_size);
    b->dact = f(n * c.intermediate_size);
    buf_ = std::move(b);
  }
  backend_.upload(buf_->tokens.data(), tokens.data(), static_cast<std::size_t>(n) * 4);
  backend_.upload(buf_->targets.data(), targets.data(), static_cast<std::size_t>(n) * 4);
  buf_->host_targets.assign(targets.begin(), targets.end());
}

std::size_t Model::activation_bytes_for(const ModelConfig& c, std::int64_t batch, std::int64_t seq,
                                        const ModelOptions& options) {
  // Mirrors set_batch's and LayerActs' allocations (a test checks they agree).
  const std::int64_t n = batch * seq, h = c.hidden_size, i = c.intermediate_size;
  const std::int64_t layer = 3 * n * h + 2 * n + n * c.qkv_dim() + n * c.q_dim() + n * c.num_heads + 3 * n * i;
  const std::int64_t kept = options.checkpoint_activations ? 1 : c.num_layers;
  std::vector<float> cos, sin;
  rope_tables(c, seq, cos, sin);
  const LoraActFloats lf = lora_act_floats(c, options.lora, n);
  const std::int64_t floats = 2 * n + static_cast<std::int64_t>(cos.size() + sin.size()) + (c.num_layers + 1) * n * h +
                              kept * (layer + lf.per_layer) + 3 * n * h + 3 * n + n * c.q_dim() + n * c.qkv_dim() +
                              3 * n * i + lf.dt + 2 * lf.x;
  return static_cast<std::size_t>(floats) * sizeof(float);
}

std::size_t Model::activation_bytes() const {
  if (!buf_) return 0;
  std::size_t total = 0;
  for (const DeviceBuffer& x : buf_->x) total += x.bytes();
  for (const LayerActs& a : buf_->layers) total += a.bytes();
  for (const DeviceBuffer* d : {&buf_->hf, &buf_->rstd_f, &buf_->lse_ce, &buf_->loss_rows, &buf_->dx, &buf_->dh,
                                &buf_->dattn, &buf_->dqkv, &buf_->dgu, &buf_->dact, &buf_->tokens, &buf_->targets,
                                &buf_->cos, &buf_->sin, &buf_->lora_x, &buf_->lora_dx, &buf_->lora_dt}) {
    total += d->bytes();
  }
  return total;
}

Weight Model::head_weight(const UnitBuffers& p) const {
  return config_.tie_word_embeddings ? p.weight(layout_, 0, TensorRole::kEmbedding)
                                     : p.weight(layout_, layout_.head_unit(), TensorRole::kHead);
}

float* Model::head_grad(const UnitBuffers& g) const {
  return config_.tie_word_embeddings ? g.grad(layout_, 0, TensorRole::kEmbedding)
                                     : g.grad(layout_, layout_.head_unit(), TensorRole::kHead);
}

void Model::layer_forward(std::int64_t l, const UnitBuffers& p, LayerActs& a, float* out) {
  const ModelConfig& c = config_;
  const std::size_t u = layout_.layer_unit(l);
  const std::int64_t n = rows_, h = c.hidden_size, im = c.intermediate_size;
  const float* x = buf_->x[l].f32();
  Backend& be = backend_;
  be.rmsnorm_forward(a.h1.f32(), a.rstd1.f32(), x, p.weight(layout_, u, TensorRole::kInputNorm), n, h,
                     static_cast<float>(c.rms_norm_eps));
  be.linear_forward(a.qkv.f32(), a.h1.f32(), p.weight(layout_, u, TensorRole::kQkvWeight),
                    p.weight(layout_, u, TensorRole::kQkvBias), n, h, c.qkv_dim());
  if (lora_) lora_forward(l, {LoraTarget::kQ, LoraTarget::kK, LoraTarget::kV}, a.h1.f32(), a.qkv.f32(), c.qkv_dim(), a);
  be.rope_forward(a.qkv.f32(), c.qkv_dim(), 0, n, seq_, c.num_heads, c.head_dim, buf_->cos.f32(), buf_->sin.f32());
  be.rope_forward(a.qkv.f32(), c.qkv_dim(), c.q_dim(), n, seq_, c.num_kv_heads, c.head_dim, buf_->cos.f32(),
                  buf_->sin.f32());
  const AttentionShape shape{batch_, seq_, c.num_heads, c.num_kv_heads, c.head_dim,
                             static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim))),
                             options_.param_dtype == DType::kBF16};
  be.attention_forward(a.attn.f32(), a.lse.f32(), a.qkv.f32(), shape);
  be.linear_forward(a.xmid.f32(), a.attn.f32(), p.weight(layout_, u, TensorRole::kOWeight),
                    p.weight(layout_, u, TensorRole::kOBias), n, c.q_dim(), h);
  if (lora_) lora_forward(l, {LoraTarget::kO}, a.attn.f32(), a.xmid.f32(), h, a);
  be.add(a.xmid.f32(), x, n * h);
  be.rmsnorm_forward(a.h2.f32(), a.rstd2.f32(), a.xmid.f32(), p.weight(layout_, u, TensorRole::kPostNorm), n, h,
                     static_cast<float>(c.rms_norm_eps));
  be.linear_forward(a.gu.f32(), a.h2.f32(), p.weight(layout_, u, TensorRole::kGateUpWeight),
                    p.weight(layout_, u, TensorRole::kGateUpBias), n, h, 2 * im);
  if (lora_) lora_forward(l, {LoraTarget::kGate, LoraTarget::kUp}, a.h2.f32(), a.gu.f32(), 2 * im, a);
  be.swiglu_forward(a.act.f32(), a.gu.f32(), n, im);
  if (out != nullptr) {
    be.linear_forward(out, a.act.f32(), p.weight(layout_, u, TensorRole::kDownWeight),
                      p.weight(layout_, u, TensorRole::kDownBias), n, im, h);
    if (lora_) lora_forward(l, {LoraTarget::kDown}, a.act.f32(), out, h, a);
    be.add(out, a.xmid.f32(), n * h);
  } else if (lora_) {
    lora_forward(l, {LoraTarget::kDown}, a.act.f32(), nullptr, h, a);  // its t, for backward
  }
}

const float* Model::lora_input(std::size_t adapter, const float* x, std::int64_t in) {
  const double p = lora_bind_.training ? lora_->config.dropout : 0.0;
  if (p <= 0.0) return x;
  backend_.dropout(buf_->lora_x.f32(), x, rows_ * in, static_cast<float>(p),
                   kernels::dropout_stream(lora_bind_.seed, adapter), false);
  return buf_->lora_x.f32();
}

void Model::lora_forward(std::int64_t l, std::initializer_list<LoraTarget> targets, const float* x, float* y,
                         std::int64_t ldy, LayerActs& acts) {
  ZINF_ASSERT(lora_bind_.params != nullptr, "a LoRA model without adapters (set_lora)");
  const std::int64_t n = rows_, r = lora_->config.rank;
  const auto s = static_cast<float>(lora_->config.scale());
  for (const LoraTarget target : targets) {
    const LoraAdapter* ad = lora_->find(l, target);
    if (ad == nullptr) continue;
    const auto i = static_cast<std::size_t>(ad - lora_->adapters.data());
    float* t = acts.lora_t.f32() + (static_cast<std::int64_t>(i) - l * lora_->per_layer) * n * r;
    // t (n, r) = dropout(x) A^T;  y (n, out) += s t B^T
    Matmul ta;
    ta.m = n, ta.n = r, ta.k = ad->in;
    ta.a = lora_input(i, x, ad->in), ta.lda = ad->in;
    ta.b = lora_bind_.params + ad->a, ta.ldb = ad->in, ta.trans_b = true;
    ta.c = t, ta.ldc = r;
    backend_.matmul(ta);
    if (y == nullptr) continue;
    Matmul yb;
    yb.m = n, yb.n = ad->out, yb.k = r;
    yb.a = t, yb.lda = r;
    yb.b = lora_bind_.params + ad->b, yb.ldb = r, yb.trans_b = true;
    yb.c = y + ad->col0, yb.ldc = ldy;
    yb.alpha = s;
    yb.accumulate = true;
    backend_.matmul(yb);
  }
}

void Model::lora_backward(std::int64_t l, std::initializer_list<LoraTarget> targets, const float* x, const float* dy,
                          std::int64_t ldy, float* dx, LayerActs& acts) {
  ZINF_ASSERT(lora_bind_.grads != nullptr, "LoRA backward without adapter gradients (set_lora)");
  const std::int64_t n = rows_, r = lora_->config.rank;
  const auto s = static_cast<float>(lora_->config.scale());
  const bool dropped = lora_bind_.training && lora_->config.dropout > 0.0;
  for (const LoraTarget target : targets) {
    const LoraAdapter* ad = lora_->find(l, target);
    if (ad == nullptr) continue;
    const auto i = static_cast<std::size_t>(ad - lora_->adapters.data());
    const float* t = acts.lora_t.f32() + (static_cast<std::int64_t>(i) - l * lora_->per_layer) * n * r;
    const float* g = dy + ad->col0;
    float* dt = buf_->lora_dt.f32();
    // dB (out, r) += s dy^T t
    Matmul gb;
    gb.m = ad->out, gb.n = r, gb.k = n;
    gb.a = g, gb.lda = ldy, gb.trans_a = true;
    gb.b = t, gb.ldb = r;
    gb.c = lora_bind_.grads + ad->b, gb.ldc = r;
    gb.alpha = s;
    gb.accumulate = true;
    backend_.matmul(gb);
    // dt (n, r) = s dy B
    Matmul gt;
    gt.m = n, gt.n = r, gt.k = ad->out;
    gt.a = g, gt.lda = ldy;
    gt.b = lora_bind_.params + ad->b, gt.ldb = r;
    gt.c = dt, gt.ldc = r;
    gt.alpha = s;
    backend_.matmul(gt);
    // dA (r, in) += dt^T dropout(x)
    Matmul ga;
    ga.m = r, ga.n = ad->in, ga.k = n;
    ga.a = dt, ga.lda = r, ga.trans_a = true;
    ga.b = lora_input(i, x, ad->in), ga.ldb = ad->in;
    ga.c = lora_bind_.grads + ad->a, ga.ldc = ad->in;
    ga.accumulate = true;
    backend_.matmul(ga);
    // dx (n, in) += dropout'(dt A)
    Matmul gx;
    gx.m = n, gx.n = ad->in, gx.k = r;
    gx.a = dt, gx.lda = r;
    gx.b = lora_bind_.params + ad->a, gx.ldb = ad->in;
    gx.c = dropped ? buf_->lora_dx.f32() : dx, gx.ldc = ad->in;
    gx.accumulate = !dropped;
    backend_.matmul(gx);
    if (dropped) {
      backend_.dropout(dx, buf_->lora_dx.f32(), n * ad->in, static_cast<float>(lora_->config.dropout),
                       kernels::dropout_stream(lora_bind_.seed, i), true);
    }
  }
}

void Model::layer_backward(std::int64_t l, const UnitBuffers& p, const UnitBuffers& g, LayerActs& a) {
  const ModelConfig& c = config_;
  const std::size_t u = layout_.layer_unit(l);
  const std::int64_t n = rows_, h = c.hidden_size, im = c.intermediate_size;
  Backend& be = backend_;
  float* dx = buf_->dx.f32();  // in: d out; out: d x[l]
  be.linear_backward(buf_->dact.f32(), g.grad(layout_, u, TensorRole::kDownWeight),
                     g.grad(layout_, u, TensorRole::kDownBias), dx, a.act.f32(),
                     p.weight(layout_, u, TensorRole::kDownWeight), n, im, h);
  if (lora_) lora_backward(l, {LoraTarget::kDown}, a.act.f32(), dx, h, buf_->dact.f32(), a);
  be.swiglu_backward(buf_->dgu.f32(), buf_->dact.f32(), a.gu.f32(), n, im);
  be.linear_backward(buf_->dh.f32(), g.grad(layout_, u, TensorRole::kGateUpWeight),
                     g.grad(layout_, u, TensorRole::kGateUpBias), buf_->dgu.f32(), a.h2.f32(),
                     p.weight(layout_, u, TensorRole::kGateUpWeight), n, h, 2 * im);
  if (lora_) lora_backward(l, {LoraTarget::kGate, LoraTarget::kUp}, a.h2.f32(), buf_->dgu.f32(), 2 * im, buf_->dh.f32(), a);
  be.rmsnorm_backward(dx, g.grad(layout_, u, TensorRole::kPostNorm), buf_->dh.f32(), a.xmid.f32(),
                      p.weight(layout_, u, TensorRole::kPostNorm), a.rstd2.f32(), n, h);
  // dx is now d xmid
  be.linear_backward(buf_->dattn.f32(), g.grad(layout_, u, TensorRole::kOWeight),
                     g.grad(layout_, u, TensorRole::kOBias), dx, a.attn.f32(),
                     p.weight(layout_, u, TensorRole::kOWeight), n, c.q_dim(), h);
  if (lora_) lora_backward(l, {LoraTarget::kO}, a.attn.f32(), dx, h, buf_->dattn.f32(), a);
  const AttentionShape shape{batch_, seq_, c.num_heads, c.num_kv_heads, c.head_dim,
                             static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim))),
                             options_.param_dtype == DType::kBF16};
  be.attention_backward(buf_->dqkv.f32(), buf_->dattn.f32(), a.qkv.f32(), a.attn.f32(), a.lse.f32(), shape);
  be.rope_backward(buf_->dqkv.f32(), c.qkv_dim(), 0, n, seq_, c.num_heads, c.head_dim, buf_->cos.f32(),
                   buf_->sin.f32());
  be.rope_backward(buf_->dqkv.f32(), c.qkv_dim(), c.q_dim(), n, seq_, c.num_kv_heads, c.head_dim, buf_->cos.f32(),
                   buf_->sin.f32());
  be.linear_backward(buf_->dh.f32(), g.grad(layout_, u, TensorRole::kQkvWeight),
                     g.grad(layout_, u, TensorRole::kQkvBias), buf_->dqkv.f32(), a.h1.f32(),
                     p.weight(layout_, u, TensorRole::kQkvWeight), n, h, c.qkv_dim());
  if (lora_) {
    lora_backward(l, {LoraTarget::kQ, LoraTarget::kK, LoraTarget::kV}, a.h1.f32(), buf_->dqkv.f32(), c.qkv_dim(),
                  buf_->dh.f32(), a);
  }
  be.rmsnorm_backward(dx, g.grad(layout_, u, TensorRole::kInputNorm), buf_->dh.f32(), buf_->x[l].f32(),
                      p.weight(layout_, u, TensorRole::kInputNorm), a.rstd1.f32(), n, h);
}

void Model::forward_unit(std::size_t unit, const UnitBuffers& p) {
  ZINF_ASSERT(buf_ != nullptr, "forward before set_batch");
  ZINF_ASSERT(p.dtype == options_.param_dtype, "parameters are {}, the model was built for {}",
              kernels::cpu::dtype_name(p.dtype), kernels::cpu::dtype_name(options_.param_dtype));
  const ModelConfig& c = config_;
  const std::int64_t n = rows_, h = c.hidden_size;
  if (unit == 0) {
    backend_.embedding_forward(buf_->x[0].f32(), p.weight(layout_, 0, TensorRole::kEmbedding),
                               static_cast<const std::int32_t*>(buf_->tokens.data()), n, h);
  } else if (unit == layout_.head_unit()) {
    backend_.rmsnorm_forward(buf_->hf.f32(), buf_->rstd_f.f32(), buf_->x[c.num_layers].f32(),
                             p.weight(layout_, unit, TensorRole::kFinalNorm), n, h, static_cast<float>(c.rms_norm_eps));
    backend_.head_loss_forward(buf_->lse_ce.f32(), buf_->loss_rows.f32(), buf_->hf.f32(), head_weight(p),
                               static_cast<const std::int32_t*>(buf_->targets.data()), n, h, c.vocab_size);
    std::vector<float> rows(static_cast<std::size_t>(n));
    backend_.download(rows.data(), buf_->loss_rows.data(), rows.size() * sizeof(float));
    double sum = 0.0;
    for (const float r : rows) sum += r;
    loss_ = static_cast<float>(sum / static_cast<double>(targets_counted_));
  } else {
    const auto l = static_cast<std::int64_t>(unit) - 1;
    LayerActs& a = buf_->layers[options_.checkpoint_activations ? 0 : l];
    layer_forward(l, p, a, buf_->x[l + 1].f32());
  }
}

void Model::backward_unit(std::size_t unit, const UnitBuffers& p, const UnitBuffers& g, float grad_scale) {
  ZINF_ASSERT(buf_ != nullptr, "backward before set_batch");
  const ModelConfig& c = config_;
  const std::int64_t n = rows_, h = c.hidden_size;
  if (unit == layout_.head_unit()) {
    const float scale = grad_scale / static_cast<float>(targets_counted_);
    backend_.head_loss_backward(buf_->dh.f32(), head_grad(g), buf_->hf.f32(), head_weight(p),
                                static_cast<const std::int32_t*>(buf_->targets.data()), buf_->lse_ce.f32(), scale, n, h,
                                c.vocab_size);
    backend_.fill_zero(buf_->dx.data(), buf_->dx.bytes());
    backend_.rmsnorm_backward(buf_->dx.f32(), g.grad(layout_, unit, TensorRole::kFinalNorm), buf_->dh.f32(),
                              buf_->x[c.num_layers].f32(), p.weight(layout_, unit, TensorRole::kFinalNorm),
                              buf_->rstd_f.f32(), n, h);
  } else if (unit == 0) {
    if (g.units.empty()) return;  // a frozen embedding: nothing below it to differentiate
    backend_.embedding_backward(g.grad(layout_, 0, TensorRole::kEmbedding), buf_->dx.f32(),
                                static_cast<const std::int32_t*>(buf_->tokens.data()), n, h);
  } else {
    const auto l = static_cast<std::int64_t>(unit) - 1;
    if (options_.checkpoint_activations) {
      LayerActs& a = buf_->layers[0];
      layer_forward(l, p, a, nullptr);  // recompute from the saved input x[l]
      layer_backward(l, p, g, a);
    } else {
      layer_backward(l, p, g, buf_->layers[l]);
    }
  }
}

float Model::forward(const UnitBuffers& params) {
  for (std::size_t u = 0; u < unit_count(); ++u) forward_unit(u, params);
  return loss_;
}

void Model::backward(const UnitBuffers& params, const UnitBuffers& grads, float grad_scale) {
  for (std::size_t u = unit_count(); u-- > 0;) backward_unit(u, params, grads, grad_scale);
}

void Model::logits(const UnitBuffers& params, float* host_out) {
  ZINF_ASSERT(buf_ != nullptr, "logits before set_batch");
  const std::int64_t n = rows_, v = config_.vocab_size;
  DeviceBuffer out(backend_, static_cast<std::size_t>(n * v) * sizeof(float));
  backend_.head_logits(out.f32(), buf_->hf.f32(), head_weight(params), n, config_.hidden_size, v);
  backend_.download(host_out, out.data(), out.bytes());
}

}  // namespace zinf::runtime
