#pragma once
// The shape of a Llama-family decoder, read from a Hugging Face `config.json`
// (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM), and the parameter layout that follows
// from it: which tensors exist, their Hugging Face names and shapes, and how they are grouped into
// units (embedding, each decoder layer, final norm + LM head), each unit one flat buffer.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace zinf::runtime {

enum class Arch { kLlama, kQwen2, kMistral };
const char* arch_name(Arch arch);  // the Hugging Face class name

// rope_scaling: none ("default"), "linear" (positions / factor) or "llama3" (Llama 3.1's
// frequency-dependent scaling).
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 } type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::int64_t hidden_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // Qwen2 always; Llama with attention_bias
  bool o_bias = false;    // Llama with attention_bias
  bool mlp_bias = false;  // Llama with mlp_bias
  std::optional<std::int64_t> sliding_window;  // Mistral / Qwen2 with use_sliding_window
  double initializer_range = 0.02;
  std::string source;  // where it came from, for messages

  std::int64_t q_dim() const { return num_heads * head_dim; }
  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }
  std::int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  // A one-line summary: "Llama 4 layers, hidden 256, heads 8/2 x 32, mlp 688, vocab 1000, 3.2M params".
  std::string summary() const;
};

// Parses a config.json document. Throws zinf::Error naming the file and the field for a missing or
// invalid value, an unsupported architecture, or a feature zinf does not implement (with its
// value); fields zinf does not need are listed in one warning. `source` names the file in messages.
ModelConfig parse_model_config(const nlohmann::json& doc, const std::string& source);
ModelConfig load_model_config(const std::string& path);
// The config.json a Hugging Face loader reads back for this shape.
nlohmann::json model_config_json(const ModelConfig& config);

// ---------------------------------------------------------------------------------------------
// Parameter layout

enum class TensorRole {
  kEmbedding, kInputNorm, kQkvWeight, kQkvBias, kOWeight, kOBias, kPostNorm, kGateUpWeight, kGateUpBias,
  kDownWeight, kDownBias, kFinalNorm, kHead
};

// One Hugging Face tensor inside a unit.
struct TensorSpec {
  std::string name;                  // "model.layers.3.self_attn.q_proj.weight"
  std::vector<std::int64_t> shape;   // as Hugging Face stores it
  std::int64_t offset = 0;           // elements from the start of the unit
  TensorRole role = TensorRole::kEmbedding;
  std::int64_t numel() const;
};

struct UnitLayout {
  std::string name;               // "embedding", "layer.3", "head"
  std::int64_t numel = 0;         // elements, padded (see kUnitAlign)
  std::vector<TensorSpec> tensors;
  // Offsets of the fused groups the model computes with (q|k|v rows, gate|up rows are adjacent).
  std::int64_t offset(TensorRole role) const;  // -1 when absent
};

// Fused groups and units start on this many elements (256 bytes of fp32), so every weight matrix
// the kernels see is aligned; the padding is zero and stays zero.
inline constexpr std::int64_t kUnitAlign = 64;

struct ModelLayout {
  std::vector<UnitLayout> units;  // embedding, layer.0 .. layer.L-1, head
  std::int64_t total_numel() const;
  // Real parameters (without padding), as Hugging Face counts them.
  std::int64_t parameter_count() const;
  std::size_t layer_unit(std::int64_t layer) const { return static_cast<std::size_t>(1 + layer); }
  std::size_t head_unit() const { return units.size() - 1; }
};

ModelLayout make_layout(const ModelConfig& config);

}  // namespace zinf::runtime
