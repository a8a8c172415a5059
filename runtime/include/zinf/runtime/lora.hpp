#pragma once
// LoRA (low-rank adaptation) on the decoder's linear layers, as Hugging Face PEFT defines it:
// a targeted Linear W (out, in) computes
//     y = x W^T (+ bias) + scale * dropout(x) A^T B^T,     A (rank, in), B (out, rank),
// scale = alpha / rank (alpha / sqrt(rank) with rsLoRA). A starts as PEFT's kaiming-uniform
// (uniform in +-1/sqrt(in)), B at zero, so training starts from the base model exactly. The base
// weights are frozen: no gradients, no optimizer state; only A and B train.
//
// All adapters of a model live in one flat fp32 buffer (the layout below), so they move, reduce
// and step as one tensor. They are saved in PEFT's format, `adapter_model.safetensors` (tensor
// names `base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`, ...) with
// `adapter_config.json`, which `PeftModel.from_pretrained` loads; `merge_adapter` folds them into
// the base weights as a full model.

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "zinf/kernels/cpu_optim.hpp"  // DType
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

// The PEFT module names zinf can adapt, in this order inside a layer.
enum class LoraTarget : int { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kLoraTargetCount = 7;
const char* lora_target_name(LoraTarget target);  // "q_proj", ...
// "q_proj,v_proj" (PEFT names, any order, spaces allowed) or "all-linear" (all seven). Throws
// zinf::Error naming an unknown or repeated entry and the accepted names.
std::vector<LoraTarget> parse_lora_targets(const std::string& text);
std::string lora_targets_string(const std::vector<LoraTarget>& targets);  // "q_proj,v_proj"

struct LoraConfig {
  std::int64_t rank = 0;  // 0: no LoRA (full training)
  double alpha = 8.0;     // PEFT's default lora_alpha
  double dropout = 0.0;   // on the adapter's input, training only
  std::vector<LoraTarget> targets{LoraTarget::kQ, LoraTarget::kV};  // PEFT's default for Llama-family models
  bool rslora = false;  // use_rslora: scale alpha / sqrt(rank)
  bool enabled() const { return rank > 0; }
  double scale() const;
  // Throws zinf::Error for a rank below 1 or above 4096, alpha <= 0, dropout outside [0, 1), no
  // target, or a repeated one.
  void validate() const;
  // One line: "rank 16, alpha 32 (scale 2), dropout 0.05, targets q_proj,v_proj".
  std::string describe() const;
  bool operator==(const LoraConfig&) const = default;
};

// One adapted Linear.
struct LoraAdapter {
  std::int64_t layer = 0;
  LoraTarget target = LoraTarget::kQ;
  std::int64_t in = 0, out = 0;  // the base Linear's in_features, out_features
  std::int64_t a = 0, b = 0;     // offsets of A (rank, in) and B (out, rank) in the flat buffer
  std::int64_t col0 = 0;         // the target's first column in the fused product (q|k|v, gate|up)
  std::string module;            // "model.layers.3.self_attn.q_proj"
};

struct LoraLayout {
  LoraConfig config;
  std::vector<LoraAdapter> adapters;  // layer by layer, targets in LoraTarget order
  std::vector<std::array<int, kLoraTargetCount>> index;  // [layer][target]: adapter, or -1
  std::int64_t numel = 0;  // of the flat buffer (every matrix starts 64-aligned; padding stays 0)
  std::int64_t per_layer = 0;  // adapters per layer
  std::int64_t parameter_count() const;  // A and B elements, without padding
  const LoraAdapter* find(std::int64_t layer, LoraTarget target) const;
};

// Throws zinf::Error when the config is invalid.
LoraLayout make_lora_layout(const ModelConfig& model, const LoraConfig& config);

// PEFT's initialisation into the flat buffer: A ~ uniform(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform
// with a = sqrt(5)), B = 0, padding 0. Element i of A draws from a counter-based generator keyed by
// (seed, module name, i): the same values whatever the thread count.
void init_lora(const LoraLayout& layout, std::uint64_t seed, std::span<float> out);

// PEFT's tensor names of adapter `a`: "base_model.model.<module>.lora_A.weight" and "...lora_B...".
std::string peft_tensor_name(const LoraAdapter& adapter, char which);

// Writes `dir`/adapter_model.safetensors (fp32) and `dir`/adapter_config.json (PEFT's LoraConfig:
// peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, use_rslora,
// base_model_name_or_path = base), each atomically. Returns the files written.
std::vector<std::string> save_adapter(const std::string& dir, const LoraLayout& layout, std::span<const float> params,
                                      const std::string& base);

struct LoadedAdapter {
  LoraLayout layout;
  std::vector<float> params;  // the flat buffer
  std::string base;           // base_model_name_or_path, "" when absent
};
// Reads a PEFT LoRA adapter directory (or a zinf checkpoint holding one) for `model`. Throws
// zinf::Error for a missing file, another peft_type, options zinf does not implement (bias other
// than "none", fan_in_fan_out, DoRA, per-layer ranks, layers_to_transform, modules_to_save), target
// modules zinf cannot adapt, or tensors that are missing, extra or of the wrong shape.
LoadedAdapter load_adapter(const std::string& dir, const ModelConfig& model);

// Writes base + scale * B A into each adapted weight, the rest of the base unchanged, as a full
// model in `out_dir` (safetensors, sharded above max_shard_bytes, config.json and the base
// directory's other files: tokenizer, generation config). `base` is a safetensors file, index or
// directory; `model` its config. file_dtype: each tensor's own dtype when empty, else fp32 or bf16.
// The merge runs in fp32, one tensor at a time. Returns the files written.
std::vector<std::string> merge_adapter(const std::string& base, const ModelConfig& model, const LoadedAdapter& adapter,
                                       const std::string& out_dir, std::optional<kernels::cpu::DType> file_dtype,
                                       std::uint64_t max_shard_bytes);

}  // namespace zinf::runtime
