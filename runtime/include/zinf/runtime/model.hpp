#pragma once
// A Llama-family decoder (Llama, Qwen2, Mistral) on any Backend: forward, backward with per-layer
// activation checkpointing, and the cross-entropy loss of next-token prediction.
//
// Parameters live in units (model_config.hpp: embedding, each layer, final norm + head), each one
// flat buffer; the model reads them through UnitBuffers, a view that names one buffer per unit, so
// the ZeRO coordinator can hand it whichever units it has gathered. Execution is exposed unit by
// unit in the order a step runs them: forward units 0..L+1, backward L+1..0.

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <vector>

#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

// One buffer per unit (device memory of the backend), all of one dtype. Gradients with no units
// at all are a frozen model's (LoRA): grad() is null, and backward computes no weight gradient.
struct UnitBuffers {
  std::vector<void*> units;
  DType dtype = DType::kF32;
  Weight weight(const ModelLayout& layout, std::size_t unit, TensorRole role) const;
  float* grad(const ModelLayout& layout, std::size_t unit, TensorRole role) const;  // fp32 only
};

// Owns one buffer per unit in a backend's memory (zeroed).
class UnitStorage {
 public:
  UnitStorage(Backend& backend, const ModelLayout& layout, DType dtype);
  const UnitBuffers& view() const noexcept { return view_; }
  DType dtype() const noexcept { return view_.dtype; }
  std::size_t unit_bytes(std::size_t unit) const { return buffers_[unit].bytes(); }
  void zero();

 private:
  Backend& backend_;
  std::vector<DeviceBuffer> buffers_;
  UnitBuffers view_;
};

struct ModelOptions {
  DType param_dtype = DType::kF32;    // dtype of the parameter units: fp32, or bf16 (mixed precision)
  bool checkpoint_activations = true; // keep each layer's input only; recompute the layer in backward
  LoraConfig lora;                     // rank > 0: LoRA adapters on the targeted linears (set_lora)
};

// The adapters a LoRA model computes with (device memory of the backend, the model's lora_layout()).
struct LoraBinding {
  const float* params = nullptr;  // the flat buffer
  float* grads = nullptr;         // accumulated (+=) by backward; null: forward only
  std::uint64_t seed = 0;         // dropout masks of this micro-batch (mask of adapter i: dropout_stream(seed, i))
  bool training = true;           // dropout only while training
};

class Model {
 public:
  Model(ModelConfig config, Backend& backend, ModelOptions options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const noexcept { return config_; }
  const ModelLayout& layout() const noexcept { return layout_; }
  const ModelOptions& options() const noexcept { return options_; }
  // The adapters' layout (null without LoRA), and the buffers forward and backward use next.
  const LoraLayout* lora_layout() const noexcept { return lora_ ? &*lora_ : nullptr; }
  const LoraLayout& lora() const;  // throws zinf::Error without LoRA
  void set_lora(const LoraBinding& binding) { lora_bind_ = binding; }
  Backend& backend() noexcept { return backend_; }
  std::size_t unit_count() const noexcept { return layout_.units.size(); }

  // The micro-batch: tokens and targets (batch, seq) on the host; a target < 0 is ignored (-100 as
  // in Hugging Face). Throws zinf::Error for a token id outside the vocabulary, no target at all, a
  // sequence longer than max_position_embeddings or a sliding window. Activations are sized here.
  void set_batch(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, std::int64_t batch,
                 std::int64_t seq);
  std::int64_t batch() const noexcept { return batch_; }
  std::int64_t seq() const noexcept { return seq_; }
  std::int64_t target_count() const noexcept { return targets_counted_; }

  // Unit by unit. forward_unit(head) computes the loss; backward_unit(u) needs forward of every
  // unit and backward of units > u, and adds the gradient of grad_scale * loss into grads (fp32).
  // The head unit also reads the embedding unit when the embeddings are tied.
  void forward_unit(std::size_t unit, const UnitBuffers& params);
  void backward_unit(std::size_t unit, const UnitBuffers& params, const UnitBuffers& grads, float grad_scale = 1.0f);
  // Which units a unit's computation touches (itself, and the embedding for a tied head): the
  // parameters forward reads and the gradients backward writes.
  std::vector<std::size_t> unit_reads(std::size_t unit) const;
  // Which units' parameters backward_unit(unit) reads: unit_reads, except the embedding's
  // backward, which needs only the token ids (a scatter-add into its gradient).
  std::vector<std::size_t> backward_param_reads(std::size_t unit) const;

  // Whole passes. forward returns the mean loss over the targets.
  float forward(const UnitBuffers& params);
  void backward(const UnitBuffers& params, const UnitBuffers& grads, float grad_scale = 1.0f);
  float loss() const noexcept { return loss_; }

  // Full logits (batch, seq, vocab) into host memory, after forward.
  void logits(const UnitBuffers& params, float* host_out);

  // Bytes of activations and scratch held for the current batch shape.
  std::size_t activation_bytes() const;
  // The same for a batch shape, before any is set (the GPU memory plan).
  static std::size_t activation_bytes_for(const ModelConfig& config, std::int64_t batch, std::int64_t seq,
                                          const ModelOptions& options);

 private:
  struct LayerActs;
  void layer_forward(std::int64_t l, const UnitBuffers& p, LayerActs& a, float* out);
  void layer_backward(std::int64_t l, const UnitBuffers& p, const UnitBuffers& g, LayerActs& a);
  // LoRA: the adapters of layer l on `targets`, reading x (n, in) and adding into y (rows ldy
  // apart; null: only t = dropout(x) A^T, which backward needs); and their backward from dy, adding
  // d x into dx (n, in).
  void lora_forward(std::int64_t l, std::initializer_list<LoraTarget> targets, const float* x, float* y,
                    std::int64_t ldy, LayerActs& a);
  void lora_backward(std::int64_t l, std::initializer_list<LoraTarget> targets, const float* x, const float* dy,
                     std::int64_t ldy, float* dx, LayerActs& a);
  const float* lora_input(std::size_t adapter, const float* x, std::int64_t in);
  Weight head_weight(const UnitBuffers& p) const;
  float* head_grad(const UnitBuffers& g) const;

  ModelConfig config_;
  ModelLayout layout_;
  Backend& backend_;
  ModelOptions options_;
  std::int64_t batch_ = 0, seq_ = 0, rows_ = 0, targets_counted_ = 0;
  float loss_ = 0.0f;
  std::optional<LoraLayout> lora_;
  LoraBinding lora_bind_;
  struct Buffers;
  std::unique_ptr<Buffers> buf_;
};

// Rotary tables (seq, head_dim / 2) for positions 0..seq-1 with the config's theta and scaling,
// as transformers computes them (inverse frequencies in fp32, angles in fp32).
void rope_tables(const ModelConfig& config, std::int64_t seq, std::vector<float>& cos, std::vector<float>& sin);

}  // namespace zinf::runtime
