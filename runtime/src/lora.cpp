// LoRA adapters: layout, PEFT initialisation, PEFT-format save/load, and the merge (lora.hpp).
#include "zinf/runtime/lora.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/common/hash.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/cpu_gemm.hpp"
#include "zinf/kernels/dropout.hpp"

namespace zinf::runtime {
namespace {

namespace fs = std::filesystem;
namespace k = kernels::cpu;
using Json = nlohmann::json;

constexpr const char* kAdapterWeights = "adapter_model.safetensors";
constexpr const char* kAdapterConfig = "adapter_config.json";
constexpr std::int64_t kAlign = 64;

std::int64_t align_up(std::int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

constexpr std::array<const char*, kLoraTargetCount> kNames = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"};

std::string all_names() { return fmt::format("{}", fmt::join(kNames, ", ")); }

// The base Linear a target adapts: (in, out), its column offset in the fused product, and its module.
struct TargetShape {
  std::int64_t in, out, col0;
  std::string module;
};
TargetShape target_shape(const ModelConfig& c, std::int64_t layer, LoraTarget t) {
  const std::string p = fmt::format("model.layers.{}.", layer);
  const std::string name = lora_target_name(t);
  const std::int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), im = c.intermediate_size;
  switch (t) {
    case LoraTarget::kQ: return {h, q, 0, p + "self_attn." + name};
    case LoraTarget::kK: return {h, kv, q, p + "self_attn." + name};
    case LoraTarget::kV: return {h, kv, q + kv, p + "self_attn." + name};
    case LoraTarget::kO: return {q, h, 0, p + "self_attn." + name};
    case LoraTarget::kGate: return {h, im, 0, p + "mlp." + name};
    case LoraTarget::kUp: return {h, im, im, p + "mlp." + name};
    case LoraTarget::kDown: return {im, h, 0, p + "mlp." + name};
  }
  throw Error("unknown LoRA target {}", static_cast<int>(t));
}

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t");
  const auto e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

}  // namespace

const char* lora_target_name(LoraTarget target) { return kNames.at(static_cast<std::size_t>(target)); }

std::vector<LoraTarget> parse_lora_targets(const std::string& text) {
  if (trim(text) == "all-linear") {
    std::vector<LoraTarget> all;
    for (int t = 0; t < kLoraTargetCount; ++t) all.push_back(static_cast<LoraTarget>(t));
    return all;
  }
  std::vector<LoraTarget> out;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string name = trim(text.substr(pos, comma - pos));
    pos = comma + 1;
    if (name.empty()) continue;
    const auto it = std::find(kNames.begin(), kNames.end(), name);
    if (it == kNames.end()) {
      throw Error("LoRA target '{}' is not a module zinf can adapt: use {} (PEFT's names), or all-linear", name,
                  all_names());
    }
    const auto t = static_cast<LoraTarget>(it - kNames.begin());
    if (std::find(out.begin(), out.end(), t) != out.end()) throw Error("LoRA target '{}' is given twice", name);
    out.push_back(t);
  }
  if (out.empty()) throw Error("no LoRA target given: name modules among {}, or all-linear", all_names());
  std::sort(out.begin(), out.end());
  return out;
}

std::string lora_targets_string(const std::vector<LoraTarget>& targets) {
  std::vector<std::string> names;
  for (const LoraTarget t : targets) names.emplace_back(lora_target_name(t));
  return fmt::format("{}", fmt::join(names, ","));
}

double LoraConfig::scale() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

void LoraConfig::validate() const {
  if (rank < 1 || rank > 4096) throw Error("--lora-rank {} is out of range: use 1 to 4096 (8 to 64 is usual)", rank);
  if (!(alpha > 0.0) || !std::isfinite(alpha)) throw Error("--lora-alpha {} must be a positive number", alpha);
  if (!(dropout >= 0.0 && dropout < 1.0)) throw Error("--lora-dropout {} must be at least 0 and below 1", dropout);
  if (targets.empty()) throw Error("no LoRA target: name modules among {}, or all-linear", all_names());
  std::set<LoraTarget> seen(targets.begin(), targets.end());
  if (seen.size() != targets.size()) throw Error("a LoRA target is repeated in {}", lora_targets_string(targets));
}

std::string LoraConfig::describe() const {
  return fmt::format("rank {}, alpha {:g} (scale {:g}{}), dropout {:g}, targets {}", rank, alpha, scale(),
                     rslora ? ", rsLoRA" : "", dropout, lora_targets_string(targets));
}

std::int64_t LoraLayout::parameter_count() const {
  std::int64_t n = 0;
  for (const LoraAdapter& a : adapters) n += config.rank * (a.in + a.out);
  return n;
}

const LoraAdapter* LoraLayout::find(std::int64_t layer, LoraTarget target) const {
  if (layer < 0 || layer >= static_cast<std::int64_t>(index.size())) return nullptr;
  const int i = index[static_cast<std::size_t>(layer)][static_cast<std::size_t>(target)];
  return i < 0 ? nullptr : &adapters[static_cast<std::size_t>(i)];
}

LoraLayout make_lora_layout(const ModelConfig& model, const LoraConfig& config) {
  config.validate();
  LoraLayout l;
  l.config = config;
  std::sort(l.config.targets.begin(), l.config.targets.end());
  l.per_layer = static_cast<std::int64_t>(l.config.targets.size());
  const std::int64_t r = config.rank;
  for (std::int64_t layer = 0; layer < model.num_layers; ++layer) {
    std::array<int, kLoraTargetCount> idx;
    idx.fill(-1);
    for (const LoraTarget t : l.config.targets) {
      const TargetShape s = target_shape(model, layer, t);
      LoraAdapter a;
      a.layer = layer;
      a.target = t;
      a.in = s.in;
      a.out = s.out;
      a.col0 = s.col0;
      a.module = s.module;
      a.a = l.numel;
      l.numel = align_up(l.numel + r * s.in);
      a.b = l.numel;
      l.numel = align_up(l.numel + s.out * r);
      idx[static_cast<std::size_t>(t)] = static_cast<int>(l.adapters.size());
      l.adapters.push_back(std::move(a));
    }
    l.index.push_back(idx);
  }
  return l;
}

void init_lora(const LoraLayout& layout, std::uint64_t seed, std::span<float> out) {
  ZINF_ASSERT(out.size() == static_cast<std::size_t>(layout.numel), "init_lora: {} elements for a layout of {}",
              out.size(), layout.numel);
  std::fill(out.begin(), out.end(), 0.0f);
  const std::int64_t r = layout.config.rank;
  for (const LoraAdapter& a : layout.adapters) {
    const std::uint64_t stream = fnv1a64(peft_tensor_name(a, 'A')) ^ (seed * 0x9E3779B97F4A7C15ull);
    const float bound = 1.0f / std::sqrt(static_cast<float>(a.in));
    float* dst = out.data() + a.a;
    for (std::int64_t i = 0; i < r * a.in; ++i) {
      dst[i] = bound * (2.0f * kernels::dropout_uniform(stream, static_cast<std::uint64_t>(i)) - 1.0f);
    }
  }
}

std::string peft_tensor_name(const LoraAdapter& adapter, char which) {
  return fmt::format("base_model.model.{}.lora_{}.weight", adapter.module, which);
}

std::vector<std::string> save_adapter(const std::string& dir, const LoraLayout& layout, std::span<const float> params,
                                      const std::string& base) {
  ZINF_ASSERT(params.size() == static_cast<std::size_t>(layout.numel), "save_adapter: {} values for a layout of {}",
              params.size(), layout.numel);
  fs::create_directories(dir);
  const std::int64_t r = layout.config.rank;
  std::vector<io::StWriteTensor> tensors;
  for (const LoraAdapter& a : layout.adapters) {
    for (const char which : {'A', 'B'}) {
      io::StWriteTensor t;
      t.name = peft_tensor_name(a, which);
      t.dtype = io::StDType::kF32;
      t.shape = which == 'A' ? std::vector<std::int64_t>{r, a.in} : std::vector<std::int64_t>{a.out, r};
      const float* src = params.data() + (which == 'A' ? a.a : a.b);
      const std::size_t n = static_cast<std::size_t>(r * (which == 'A' ? a.in : a.out));
      t.fill = [src, n](std::byte* dst) { std::memcpy(dst, src, n * sizeof(float)); };
      tensors.push_back(std::move(t));
    }
  }
  // PEFT sorts nothing: any order loads. Layer order reads best.
  io::write_safetensors((fs::path(dir) / kAdapterWeights).string(), tensors, {{"format", "pt"}});
  const LoraConfig& c = layout.config;
  Json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base;
  j["r"] = c.rank;
  j["lora_alpha"] = c.alpha;
  j["lora_dropout"] = c.dropout;
  std::vector<std::string> targets;
  for (const LoraTarget t : c.targets) targets.emplace_back(lora_target_name(t));
  j["target_modules"] = targets;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["use_rslora"] = c.rslora;
  j["use_dora"] = false;
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["rank_pattern"] = Json::object();
  j["alpha_pattern"] = Json::object();
  j["revision"] = nullptr;
  j["library"] = "zinf";
  write_file_atomic((fs::path(dir) / kAdapterConfig).string(), j.dump(2) + "\n");
  return {kAdapterWeights, kAdapterConfig};
}

LoadedAdapter load_adapter(const std::string& dir, const ModelConfig& model) {
  const fs::path cfg_path = fs::path(dir) / kAdapterConfig;
  const fs::path w_path = fs::path(dir) / kAdapterWeights;
  if (!fs::exists(cfg_path) || !fs::exists(w_path)) {
    throw Error("'{}' is not a LoRA adapter directory: it needs {} and {} (PEFT's format, as zinf and "
                "PeftModel.save_pretrained write them)",
                dir, kAdapterWeights, kAdapterConfig);
  }
  LoadedAdapter out;
  LoraConfig c;
  try {
    const Json j = Json::parse(config::read_text_file(cfg_path.string()));
    const std::string type = j.value("peft_type", "");
    if (type != "LORA") throw Error("{}: peft_type is '{}'; zinf reads LORA adapters", cfg_path.string(), type);
    c.rank = j.at("r").get<std::int64_t>();
    c.alpha = j.value("lora_alpha", 8.0);
    c.dropout = j.value("lora_dropout", 0.0);
    c.rslora = j.value("use_rslora", false);
    const auto unsupported = [&](const char* key, const std::string& what) {
      throw Error("{}: {} ({}) is not implemented by zinf", cfg_path.string(), key, what);
    };
    if (j.contains("bias") && j.at("bias").is_string() && j.at("bias").get<std::string>() != "none") {
      unsupported("bias", j.at("bias").get<std::string>());
    }
    if (j.value("fan_in_fan_out", false)) unsupported("fan_in_fan_out", "true");
    if (j.value("use_dora", false)) unsupported("use_dora", "DoRA");
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (j.contains(key) && j.at(key).is_object() && !j.at(key).empty()) unsupported(key, "per-module ranks");
    }
    for (const char* key : {"layers_to_transform", "modules_to_save"}) {
      if (j.contains(key) && !j.at(key).is_null() && !(j.at(key).is_array() && j.at(key).empty())) unsupported(key, j.at(key).dump());
    }
    const Json& tm = j.at("target_modules");
    if (tm.is_string()) {
      c.targets = parse_lora_targets(tm.get<std::string>());
    } else {
      std::string list;
      for (const Json& t : tm) { if (!list.empty()) list += ","; list += t.get<std::string>(); }
      c.targets = parse_lora_targets(list);
    }
    out.base = j.contains("base_model_name_or_path") && j.at("base_model_name_or_path").is_string()
                   ? j.at("base_model_name_or_path").get<std::string>()
                   : std::string();
  } catch (const Json::exception& e) {
    throw Error("{} is damaged: {}", cfg_path.string(), e.what());
  } catch (Error& e) {
    throw std::move(e).with_context(fmt::format("while reading '{}'", cfg_path.string()));
  }
  out.layout = make_lora_layout(model, c);
  out.params.assign(static_cast<std::size_t>(out.layout.numel), 0.0f);
  const auto file = io::SafetensorsFile::open(w_path.string());
  std::set<std::string> unused;
  for (const auto& [name, t] : file->tensors()) unused.insert(name);
  std::vector<std::string> problems;
  const std::int64_t r = c.rank;
  for (const LoraAdapter& a : out.layout.adapters) {
    for (const char which : {'A', 'B'}) {
      const std::string name = peft_tensor_name(a, which);
      // PEFT writes no adapter name; an adapter saved with one ("lora_A.default.weight") loads too.
      std::string found = name;
      const io::StTensor* t = file->find(name);
      if (t == nullptr) {
        found = fmt::format("base_model.model.{}.lora_{}.default.weight", a.module, which);
        t = file->find(found);
      }
      if (t == nullptr) {
        problems.push_back(fmt::format("{} is missing", name));
        continue;
      }
      unused.erase(found);
      const std::vector<std::int64_t> want = which == 'A' ? std::vector<std::int64_t>{r, a.in}
                                                          : std::vector<std::int64_t>{a.out, r};
      if (t->shape != want) {
        problems.push_back(fmt::format("{} is {}, the model wants {}", name, io::shape_string(t->shape), io::shape_string(want)));
        continue;
      }
      float* dst = out.params.data() + (which == 'A' ? a.a : a.b);
      const auto bytes = file->bytes(*t);
      const auto n = static_cast<std::size_t>(t->numel());
      switch (t->dtype) {
        case io::StDType::kF32: std::memcpy(dst, bytes.data(), n * 4); break;
        case io::StDType::kBF16: k::convert(bytes.data(), k::DType::kBF16, dst, k::DType::kF32, n); break;
        case io::StDType::kF16: k::convert(bytes.data(), k::DType::kF16, dst, k::DType::kF32, n); break;
        default: problems.push_back(fmt::format("{} is {}; zinf reads F32, BF16 and F16", name, io::st_dtype_name(t->dtype)));
      }
    }
  }
  for (const std::string& u : unused) problems.push_back(fmt::format("{} has no place in the model", u));
  if (!problems.empty()) {
    const std::size_t shown = std::min<std::size_t>(problems.size(), 6);
    throw Error("adapter '{}' does not match the model ({}; {}): {}{}", dir, model.summary(), c.describe(),
                fmt::join(problems.begin(), problems.begin() + static_cast<std::ptrdiff_t>(shown), "; "),
                problems.size() > shown ? fmt::format(" and {} more", problems.size() - shown) : std::string());
  }
  return out;
}

std::vector<std::string> merge_adapter(const std::string& base, const ModelConfig& model, const LoadedAdapter& adapter,
                                       const std::string& out_dir, std::optional<k::DType> file_dtype,
                                       std::uint64_t max_shard_bytes) {
  if (file_dtype && *file_dtype != k::DType::kF32 && *file_dtype != k::DType::kBF16) {
    throw Error("a merged model is written as fp32 or bf16, not {}", k::dtype_name(*file_dtype));
  }
  const io::SafetensorsSet set = io::SafetensorsSet::open(base);
  fs::path base_dir = fs::is_directory(base) ? fs::path(base) : fs::path(base).parent_path();
  if (base_dir.empty()) base_dir = ".";
  std::error_code ec;
  if (fs::exists(out_dir) && fs::equivalent(base_dir, out_dir, ec)) {
    throw Error("the merged model would overwrite its base in '{}': write it to another directory", out_dir);
  }
  // Every adapted weight by its Hugging Face name.
  std::map<std::string, const LoraAdapter*> by_weight;
  for (const LoraAdapter& a : adapter.layout.adapters) by_weight[a.module + ".weight"] = &a;
  const float scale = static_cast<float>(adapter.layout.config.scale());
  const std::int64_t r = adapter.layout.config.rank;
  std::vector<io::StWriteTensor> tensors;
  std::vector<std::string> names = set.names();
  // The base's tensors, as the layout orders them (unknown extra tensors are an error: the same
  // model as the adapter's is expected).
  const ModelLayout layout = make_layout(model);
  std::set<std::string> expected;
  for (const UnitLayout& u : layout.units) {
    for (const TensorSpec& t : u.tensors) expected.insert(t.name);
  }
  for (const auto& [name, a] : by_weight) {
    if (set.find(name).file == nullptr) {
      throw Error("base '{}' has no tensor {}, which the adapter adapts: is it the adapter's base model ({})?", base,
                  name, model.summary());
    }
  }
  std::size_t merged = 0;
  for (const std::string& name : names) {
    if (!expected.contains(name) && !name.ends_with("rotary_emb.inv_freq") && name != "lm_head.weight") {
      throw Error("base '{}' holds tensor {}, which the model {} does not have: pass the base model's own config",
                  base, name, model.summary());
    }
    const io::SafetensorsSet::Entry e = set.find(name);
    const io::StTensor& t = *e.tensor;
    if (t.dtype != io::StDType::kF32 && t.dtype != io::StDType::kBF16 && t.dtype != io::StDType::kF16) {
      throw Error("base tensor {} is {}; zinf merges F32, BF16 and F16 weights", name, io::st_dtype_name(t.dtype));
    }
    const io::StDType st_out = !file_dtype ? t.dtype : *file_dtype == k::DType::kF32 ? io::StDType::kF32 : io::StDType::kBF16;
    const k::DType in_dt = t.dtype == io::StDType::kF32 ? k::DType::kF32 : t.dtype == io::StDType::kBF16 ? k::DType::kBF16 : k::DType::kF16;
    const k::DType out_dt = st_out == io::StDType::kF32 ? k::DType::kF32 : st_out == io::StDType::kBF16 ? k::DType::kBF16 : k::DType::kF16;
    const auto it = by_weight.find(name);
    const LoraAdapter* a = it == by_weight.end() ? nullptr : it->second;
    if (a != nullptr) {
      ++merged;
      if (t.shape != std::vector<std::int64_t>{a->out, a->in}) {
        throw Error("base tensor {} is {}, the adapter was made for [{}, {}]", name, io::shape_string(t.shape), a->out, a->in);
      }
    }
    io::StWriteTensor w;
    w.name = name;
    w.dtype = st_out;
    w.shape = t.shape;
    w.fill = [file = e.file, tp = e.tensor, a, in_dt, out_dt, scale, r, params = adapter.params.data()](std::byte* dst) {
      const auto src = file->bytes(*tp);
      const auto n = static_cast<std::size_t>(tp->numel());
      if (a == nullptr && in_dt == out_dt) {
        std::memcpy(dst, src.data(), src.size());
        return;
      }
      std::vector<float> w32(n);
      k::convert(src.data(), in_dt, w32.data(), k::DType::kF32, n);
      if (a != nullptr) {
        // W (out, in) += scale * B (out, r) A (r, in)
        k::Gemm g;
        g.m = a->out, g.n = a->in, g.k = r;
        g.a = params + a->b, g.lda = r;
        g.b = params + a->a, g.ldb = a->in;
        g.c = w32.data(), g.ldc = a->in;
        g.alpha = scale;
        g.accumulate = true;
        k::gemm(g);
      }
      k::convert(w32.data(), k::DType::kF32, dst, out_dt, n);
    };
    tensors.push_back(std::move(w));
  }
  ZINF_ASSERT(merged == by_weight.size(), "merged {} of {} adapted weights", merged, by_weight.size());
  fs::create_directories(out_dir);
  auto files = io::write_safetensors_checkpoint(out_dir, tensors, max_shard_bytes, {{"format", "pt"}});
  // config.json and the base directory's other small files (tokenizer, generation config).
  const fs::path cfg = base_dir / "config.json";
  std::string cfg_text = fs::exists(cfg) ? config::read_text_file(cfg.string()) : model_config_json(model).dump(2) + "\n";
  write_file_atomic((fs::path(out_dir) / "config.json").string(), cfg_text);
  files.push_back("config.json");
  if (fs::is_directory(base_dir)) {
    for (const auto& entry : fs::directory_iterator(base_dir)) {
      const std::string fname = entry.path().filename().string();
      if (!entry.is_regular_file() || fname == "config.json" || fname.ends_with(".safetensors") ||
          fname == "model.safetensors.index.json" || fname.ends_with(".bin") || fname.ends_with(".pt") ||
          fname.starts_with("adapter_") || entry.file_size() > (64u << 20)) {
        continue;
      }
      if (fname.starts_with("tokenizer") || fname == "generation_config.json" || fname == "special_tokens_map.json" ||
          fname.ends_with(".model") || fname == "vocab.json" || fname == "merges.txt") {
        std::string bytes(static_cast<std::size_t>(entry.file_size()), '\0');
        std::ifstream f(entry.path(), std::ios::binary);
        if (!f.read(bytes.data(), static_cast<std::streamsize>(bytes.size()))) {
          throw Error("cannot read '{}': {}", entry.path().string(), errno_text(errno));
        }
        write_file_atomic((fs::path(out_dir) / fname).string(), bytes);
        files.push_back(fname);
      }
    }
  }
  return files;
}

}  // namespace zinf::runtime
