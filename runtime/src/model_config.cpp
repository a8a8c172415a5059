// config.json -> ModelConfig, and the parameter layout (Hugging Face names, units, fused groups).
#include "zinf/runtime/model_config.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/summary.hpp"

namespace zinf::runtime {
namespace {

using nlohmann::json;

// Fields read below, and fields a config may carry that change nothing in training.
const std::set<std::string> kUsed = {
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "initializer_range", "hidden_act",
    "attention_dropout", "pretraining_tp"};
const std::set<std::string> kHarmless = {
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "transformers_version", "use_cache",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "dtype", "layer_types"};

struct Reader {
  const json& doc;
  const std::string& source;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error("{}: \"{}\" {}", source, field, what);
  }
  std::int64_t positive(const char* field, std::optional<std::int64_t> fallback = std::nullopt) const {
    if (!doc.contains(field) || doc[field].is_null()) {
      if (fallback) return *fallback;
      fail(field, "is missing; a Llama-family config.json must give it");
    }
    const json& v = doc[field];
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0) fail(field, fmt::format("must be a positive integer, not {}", v.dump()));
    return v.get<std::int64_t>();
  }
  double number(const char* field, double fallback, bool must_be_positive = true) const {
    if (!doc.contains(field) || doc[field].is_null()) return fallback;
    const json& v = doc[field];
    if (!v.is_number()) fail(field, fmt::format("must be a number, not {}", v.dump()));
    const double d = v.get<double>();
    if (must_be_positive && !(d > 0.0 && std::isfinite(d))) fail(field, fmt::format("must be positive, not {}", v.dump()));
    return d;
  }
  bool flag(const char* field, bool fallback) const {
    if (!doc.contains(field) || doc[field].is_null()) return fallback;
    if (!doc[field].is_boolean()) fail(field, fmt::format("must be true or false, not {}", doc[field].dump()));
    return doc[field].get<bool>();
  }
};

Arch parse_arch(const json& doc, const std::string& source) {
  std::string name;
  if (doc.contains("architectures") && doc["architectures"].is_array() && !doc["architectures"].empty()) {
    if (doc["architectures"].size() > 1) {
      throw Error("{}: \"architectures\" lists {}; zinf trains one model class", source, doc["architectures"].dump());
    }
    name = doc["architectures"][0].is_string() ? doc["architectures"][0].get<std::string>() : "";
    if (name == "LlamaForCausalLM") return Arch::kLlama;
    if (name == "Qwen2ForCausalLM") return Arch::kQwen2;
    if (name == "MistralForCausalLM") return Arch::kMistral;
  } else if (doc.contains("model_type") && doc["model_type"].is_string()) {
    name = doc["model_type"].get<std::string>();
    if (name == "llama") return Arch::kLlama;
    if (name == "qwen2") return Arch::kQwen2;
    if (name == "mistral") return Arch::kMistral;
  } else {
    throw Error("{}: neither \"architectures\" nor \"model_type\" says what model this is; zinf supports "
                "LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM", source);
  }
  throw Error("{}: architecture '{}' is not supported; zinf supports LlamaForCausalLM, Qwen2ForCausalLM and "
              "MistralForCausalLM", source, name);
}

RopeScaling parse_rope_scaling(const json& doc, const std::string& source) {
  RopeScaling rs;
  if (!doc.contains("rope_scaling") || doc["rope_scaling"].is_null()) return rs;
  const json& v = doc["rope_scaling"];
  if (!v.is_object()) throw Error("{}: \"rope_scaling\" must be an object or null, not {}", source, v.dump());
  std::string type = v.value("rope_type", v.value("type", std::string("default")));
  const Reader r{v, source};
  if (type == "default") return rs;
  rs.factor = r.number("factor", 0.0);
  if (rs.factor <= 0.0) throw Error("{}: \"rope_scaling\" of type '{}' needs a positive \"factor\"", source, type);
  if (type == "linear") {
    rs.type = RopeScaling::Type::kLinear;
  } else if (type == "llama3") {
    rs.type = RopeScaling::Type::kLlama3;
    rs.low_freq_factor = r.number("low_freq_factor", 1.0);
    rs.high_freq_factor = r.number("high_freq_factor", 4.0);
    rs.original_max_position_embeddings = r.positive("original_max_position_embeddings", 8192);
    if (rs.high_freq_factor <= rs.low_freq_factor) {
      throw Error("{}: \"rope_scaling\" needs high_freq_factor ({}) > low_freq_factor ({})", source,
                  rs.high_freq_factor, rs.low_freq_factor);
    }
  } else {
    throw Error("{}: rope_scaling type '{}' is not supported; zinf implements 'default', 'linear' and 'llama3'",
                source, type);
  }
  return rs;
}

std::int64_t align_up(std::int64_t n) { return (n + kUnitAlign - 1) / kUnitAlign * kUnitAlign; }

}  // namespace

const char* arch_name(Arch arch) {
  switch (arch) {
    case Arch::kLlama: return "LlamaForCausalLM";
    case Arch::kQwen2: return "Qwen2ForCausalLM";
    case Arch::kMistral: return "MistralForCausalLM";
  }
  return "?";
}

ModelConfig parse_model_config(const json& doc, const std::string& source) {
  if (!doc.is_object()) throw Error("{}: a model config.json must be a JSON object", source);
  ModelConfig c;
  c.source = source;
  c.arch = parse_arch(doc, source);
  const Reader r{doc, source};
  c.hidden_size = r.positive("hidden_size");
  c.num_layers = r.positive("num_hidden_layers");
  c.num_heads = r.positive("num_attention_heads");
  c.num_kv_heads = r.positive("num_key_value_heads", c.num_heads);
  c.intermediate_size = r.positive("intermediate_size");
  c.vocab_size = r.positive("vocab_size");
  c.max_position_embeddings = r.positive("max_position_embeddings", 2048);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  c.rope_theta = r.number("rope_theta", 10000.0);
  c.initializer_range = r.number("initializer_range", 0.02);
  c.rope_scaling = parse_rope_scaling(doc, source);
  c.tie_word_embeddings = r.flag("tie_word_embeddings", false);
  if (doc.contains("head_dim") && !doc["head_dim"].is_null()) {
    c.head_dim = r.positive("head_dim");
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      throw Error("{}: hidden_size {} is not a multiple of num_attention_heads {}; give \"head_dim\"", source,
                  c.hidden_size, c.num_heads);
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) throw Error("{}: head_dim {} must be even for rotary embeddings", source, c.head_dim);
  if (c.num_heads % c.num_kv_heads != 0) {
    throw Error("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source, c.num_heads,
                c.num_kv_heads);
  }
  if (c.vocab_size > std::numeric_limits<std::int32_t>::max()) {
    throw Error("{}: vocab_size {} does not fit 32-bit token ids", source, c.vocab_size);
  }
  switch (c.arch) {
    case Arch::kQwen2:
      c.qkv_bias = true;  // Qwen2's q/k/v projections always carry a bias
      if (r.flag("use_sliding_window", false)) c.sliding_window = r.positive("sliding_window");
      break;
    case Arch::kMistral:
      if (doc.contains("sliding_window") && !doc["sliding_window"].is_null()) c.sliding_window = r.positive("sliding_window");
      break;
    case Arch::kLlama:
      c.qkv_bias = c.o_bias = r.flag("attention_bias", false);
      c.mlp_bias = r.flag("mlp_bias", false);
      break;
  }
  if (doc.contains("hidden_act") && doc["hidden_act"] != "silu") {
    throw Error("{}: hidden_act {} is not supported; zinf's MLP is SwiGLU with silu", source, doc["hidden_act"].dump());
  }
  if (r.number("attention_dropout", 0.0, false) != 0.0) {
    throw Error("{}: attention_dropout {} is not supported; set it to 0.0", source, doc["attention_dropout"].dump());
  }
  std::vector<std::string> unknown;
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (!kUsed.contains(it.key()) && !kHarmless.contains(it.key())) unknown.push_back(it.key());
  }
  if (!unknown.empty()) {
    spdlog::warn("{}: fields zinf does not use: {}", source, fmt::join(unknown, ", "));
  }
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::string text;
  try {
    text = config::read_text_file(path);
  } catch (Error& e) {
    throw std::move(e).with_context(fmt::format("cannot read model config '{}'", path));
  }
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error("model config '{}' is not valid JSON: {}", path, e.what());
  }
  return parse_model_config(doc, path);
}

json model_config_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {arch_name(c.arch)};
  j["model_type"] = c.arch == Arch::kLlama ? "llama" : c.arch == Arch::kQwen2 ? "qwen2" : "mistral";
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["intermediate_size"] = c.intermediate_size;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["hidden_act"] = "silu";
  j["initializer_range"] = c.initializer_range;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone: j["rope_scaling"] = nullptr; break;
    case RopeScaling::Type::kLinear: j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scaling.factor}}; break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", c.rope_scaling.factor},
                           {"low_freq_factor", c.rope_scaling.low_freq_factor},
                           {"high_freq_factor", c.rope_scaling.high_freq_factor},
                           {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
  }
  if (c.arch == Arch::kLlama) {
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = c.mlp_bias;
  } else {
    j["sliding_window"] = c.sliding_window ? json(*c.sliding_window) : json(nullptr);
    if (c.arch == Arch::kQwen2) j["use_sliding_window"] = c.sliding_window.has_value();
  }
  j["torch_dtype"] = "bfloat16";
  return j;
}

std::string ModelConfig::summary() const {
  const ModelLayout layout = make_layout(*this);
  const char* family = arch == Arch::kLlama ? "Llama" : arch == Arch::kQwen2 ? "Qwen2" : "Mistral";
  return fmt::format("{} {} layers, hidden {}, heads {}/{} x {}, mlp {}, vocab {}{}, {} params", family, num_layers,
                     hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size,
                     tie_word_embeddings ? " (tied)" : "", config::human_count(layout.parameter_count()));
}

// ---------------------------------------------------------------------------------------------

std::int64_t TensorSpec::numel() const {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;
  return n;
}

std::int64_t UnitLayout::offset(TensorRole role) const {
  for (const TensorSpec& t : tensors) {
    if (t.role == role) return t.offset;
  }
  return -1;
}

std::int64_t ModelLayout::total_numel() const {
  std::int64_t n = 0;
  for (const UnitLayout& u : units) n += u.numel;
  return n;
}

std::int64_t ModelLayout::parameter_count() const {
  std::int64_t n = 0;
  for (const UnitLayout& u : units) {
    for (const TensorSpec& t : u.tensors) n += t.numel();
  }
  return n;
}

ModelLayout make_layout(const ModelConfig& c) {
  const std::int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), im = c.intermediate_size;
  ModelLayout layout;
  // Appends a group of tensors stored back to back, starting aligned.
  struct Builder {
    UnitLayout unit;
    void group(std::vector<TensorSpec> specs) {
      unit.numel = align_up(unit.numel);
      for (TensorSpec& s : specs) {
        s.offset = unit.numel;
        unit.numel += s.numel();
        unit.tensors.push_back(std::move(s));
      }
    }
    UnitLayout done() {
      unit.numel = align_up(unit.numel);
      return std::move(unit);
    }
  };
  {
    Builder b{UnitLayout{"embedding", 0, {}}};
    b.group({{"model.embed_tokens.weight", {c.vocab_size, h}, 0, TensorRole::kEmbedding}});
    layout.units.push_back(b.done());
  }
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    Builder b{UnitLayout{fmt::format("layer.{}", l), 0, {}}};
    b.group({{p + "input_layernorm.weight", {h}, 0, TensorRole::kInputNorm}});
    b.group({{p + "self_attn.q_proj.weight", {qd, h}, 0, TensorRole::kQkvWeight},
             {p + "self_attn.k_proj.weight", {kvd, h}, 0, TensorRole::kQkvWeight},
             {p + "self_attn.v_proj.weight", {kvd, h}, 0, TensorRole::kQkvWeight}});
    if (c.qkv_bias) {
      b.group({{p + "self_attn.q_proj.bias", {qd}, 0, TensorRole::kQkvBias},
               {p + "self_attn.k_proj.bias", {kvd}, 0, TensorRole::kQkvBias},
               {p + "self_attn.v_proj.bias", {kvd}, 0, TensorRole::kQkvBias}});
    }
    b.group({{p + "self_attn.o_proj.weight", {h, qd}, 0, TensorRole::kOWeight}});
    if (c.o_bias) b.group({{p + "self_attn.o_proj.bias", {h}, 0, TensorRole::kOBias}});
    b.group({{p + "post_attention_layernorm.weight", {h}, 0, TensorRole::kPostNorm}});
    b.group({{p + "mlp.gate_proj.weight", {im, h}, 0, TensorRole::kGateUpWeight},
             {p + "mlp.up_proj.weight", {im, h}, 0, TensorRole::kGateUpWeight}});
    if (c.mlp_bias) {
      b.group({{p + "mlp.gate_proj.bias", {im}, 0, TensorRole::kGateUpBias},
               {p + "mlp.up_proj.bias", {im}, 0, TensorRole::kGateUpBias}});
    }
    b.group({{p + "mlp.down_proj.weight", {h, im}, 0, TensorRole::kDownWeight}});
    if (c.mlp_bias) b.group({{p + "mlp.down_proj.bias", {h}, 0, TensorRole::kDownBias}});
    layout.units.push_back(b.done());
  }
  {
    Builder b{UnitLayout{"head", 0, {}}};
    b.group({{"model.norm.weight", {h}, 0, TensorRole::kFinalNorm}});
    if (!c.tie_word_embeddings) b.group({{"lm_head.weight", {c.vocab_size, h}, 0, TensorRole::kHead}});
    layout.units.push_back(b.done());
  }
  return layout;
}

}  // namespace zinf::runtime
