// Initialisation and safetensors load/save of parameter units (weights.hpp).
#include "zinf/runtime/weights.hpp"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numbers>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/common/hash.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/half.hpp"

namespace zinf::runtime {
namespace {

namespace k = kernels::cpu;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Fills out[i] ~ normal(0, std) for i in [0, n): element pair (2j, 2j+1) comes from one Box-Muller
// draw on counter j.
void normal_fill(float* out, std::int64_t n, std::uint64_t key, double std_dev) {
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, (n + 1) / 2, 1 << 14),
                    [&](const tbb::blocked_range<std::int64_t>& r) {
                      for (std::int64_t j = r.begin(); j < r.end(); ++j) {
                        const std::uint64_t bits = splitmix64(key ^ splitmix64(static_cast<std::uint64_t>(j)));
                        // two 32-bit uniforms in (0, 1]
                        const double u1 = (static_cast<double>(bits >> 32) + 1.0) / 4294967296.0;
                        const double u2 = (static_cast<double>(bits & 0xffffffffu) + 0.5) / 4294967296.0;
                        const double rad = std::sqrt(-2.0 * std::log(u1)) * std_dev;
                        const double th = 2.0 * std::numbers::pi * u2;
                        out[2 * j] = static_cast<float>(rad * std::cos(th));
                        if (2 * j + 1 < n) out[2 * j + 1] = static_cast<float>(rad * std::sin(th));
                      }
                    });
}

bool is_norm(TensorRole r) {
  return r == TensorRole::kInputNorm || r == TensorRole::kPostNorm || r == TensorRole::kFinalNorm;
}
bool is_bias(TensorRole r) {
  return r == TensorRole::kQkvBias || r == TensorRole::kOBias || r == TensorRole::kGateUpBias ||
         r == TensorRole::kDownBias;
}

// A unit staged on the host in its dtype, uploaded in one copy.
struct HostUnit {
  std::vector<std::byte> bytes;
  DType dtype;
  HostUnit(std::int64_t numel, DType d) : bytes(static_cast<std::size_t>(numel) * k::dtype_bytes(d)), dtype(d) {}
  void put(std::int64_t offset, const float* src, std::int64_t n) {
    k::convert(src, DType::kF32, bytes.data() + offset * static_cast<std::int64_t>(k::dtype_bytes(dtype)), dtype,
               static_cast<std::size_t>(n));
  }
};

// Converts a safetensors tensor to fp32.
void to_f32(const io::StTensor& t, std::span<const std::byte> src, float* dst) {
  const auto n = static_cast<std::size_t>(t.numel());
  switch (t.dtype) {
    case io::StDType::kF32: std::memcpy(dst, src.data(), n * 4); return;
    case io::StDType::kBF16: k::convert(src.data(), DType::kBF16, dst, DType::kF32, n); return;
    case io::StDType::kF16: k::convert(src.data(), DType::kF16, dst, DType::kF32, n); return;
    default: break;
  }
  throw Error("tensor '{}' is {}; zinf loads F32, BF16 and F16 weights", t.name, io::st_dtype_name(t.dtype));
}

}  // namespace

void init_unit(const ModelConfig& config, const UnitLayout& unit, std::uint64_t seed, std::span<float> out) {
  ZINF_ASSERT(out.size() == static_cast<std::size_t>(unit.numel), "init_unit: {} holds {} elements, not {}", unit.name,
              unit.numel, out.size());
  std::fill(out.begin(), out.end(), 0.0f);  // padding, biases
  for (const TensorSpec& t : unit.tensors) {
    float* dst = out.data() + t.offset;
    if (is_norm(t.role)) {
      std::fill(dst, dst + t.numel(), 1.0f);
    } else if (!is_bias(t.role)) {
      normal_fill(dst, t.numel(), splitmix64(seed) ^ fnv1a64(t.name), config.initializer_range);
    }
  }
}

void init_parameters(const ModelConfig& config, const ModelLayout& layout, std::uint64_t seed, Backend& backend,
                     const UnitBuffers& params) {
  std::vector<float> tmp;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const UnitLayout& unit = layout.units[u];
    tmp.resize(static_cast<std::size_t>(unit.numel));
    init_unit(config, unit, seed, tmp);
    HostUnit host(unit.numel, params.dtype);
    host.put(0, tmp.data(), unit.numel);
    backend.upload(params.units[u], host.bytes.data(), host.bytes.size());
  }
}

void load_weights(const std::string& path, const ModelConfig& config, const ModelLayout& layout, Backend& backend,
                  const UnitBuffers& params) {
  const io::SafetensorsSet set = io::SafetensorsSet::open(path);
  std::set<std::string> unused;
  for (const std::string& name : set.names()) unused.insert(name);
  std::vector<std::string> missing, mismatched;
  std::vector<float> tmp;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    const UnitLayout& unit = layout.units[u];
    HostUnit host(unit.numel, params.dtype);
    for (const TensorSpec& t : unit.tensors) {
      const auto entry = set.find(t.name);
      if (entry.file == nullptr) {
        missing.push_back(t.name);
        continue;
      }
      unused.erase(t.name);
      if (entry.tensor->shape != t.shape) {
        mismatched.push_back(fmt::format("{}: file {} vs model {}", t.name, io::shape_string(entry.tensor->shape),
                                         io::shape_string(t.shape)));
        continue;
      }
      tmp.resize(static_cast<std::size_t>(t.numel()));
      try {
        to_f32(*entry.tensor, entry.file->bytes(*entry.tensor), tmp.data());
      } catch (Error& e) {
        throw std::move(e).with_context(fmt::format("while loading '{}'", entry.file->path()));
      }
      host.put(t.offset, tmp.data(), t.numel());
    }
    if (missing.empty() && mismatched.empty()) backend.upload(params.units[u], host.bytes.data(), host.bytes.size());
  }
  if (config.tie_word_embeddings) unused.erase("lm_head.weight");
  for (auto it = unused.begin(); it != unused.end();) {
    it = it->ends_with("rotary_emb.inv_freq") ? unused.erase(it) : std::next(it);  // older exports carry these
  }
  const auto list = [](const auto& names) {
    std::vector<std::string> v(names.begin(), names.end());
    const std::size_t shown = std::min<std::size_t>(v.size(), 6);
    std::string s = fmt::format("{}", fmt::join(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(shown), ", "));
    if (v.size() > shown) s += fmt::format(" and {} more", v.size() - shown);
    return s;
  };
  std::vector<std::string> problems;
  if (!mismatched.empty()) problems.push_back(fmt::format("{} tensors have the wrong shape: {}", mismatched.size(), list(mismatched)));
  if (!missing.empty()) problems.push_back(fmt::format("{} tensors are missing: {}", missing.size(), list(missing)));
  if (!unused.empty()) problems.push_back(fmt::format("{} tensors have no place in the model: {}", unused.size(), list(unused)));
  if (!problems.empty()) {
    throw Error("weights '{}' do not match the model ({}): {}. Check that the checkpoint and the config.json "
                "describe the same model",
                path, config.summary(), fmt::join(problems, "; "));
  }
}

std::vector<std::string> save_weights(const std::string& dir, const ModelConfig& config, const ModelLayout& layout,
                                      Backend& backend, const UnitBuffers& params, DType file_dtype,
                                      std::uint64_t max_shard_bytes) {
  if (file_dtype != DType::kF32 && file_dtype != DType::kBF16) {
    throw Error("weights are saved as fp32 or bf16, not {}", k::dtype_name(file_dtype));
  }
  // Units are downloaded one at a time, when the writer reaches their first tensor.
  struct Cache {
    std::size_t unit = SIZE_MAX;
    std::vector<std::byte> bytes;
  };
  auto cache = std::make_shared<Cache>();
  std::vector<io::StWriteTensor> tensors;
  for (std::size_t u = 0; u < layout.units.size(); ++u) {
    for (const TensorSpec& t : layout.units[u].tensors) {
      io::StWriteTensor w;
      w.name = t.name;
      w.dtype = file_dtype == DType::kBF16 ? io::StDType::kBF16 : io::StDType::kF32;
      w.shape = t.shape;
      w.fill = [&backend, &params, &layout, cache, u, off = t.offset, n = t.numel(), file_dtype](std::byte* dst) {
        const std::size_t esize = k::dtype_bytes(params.dtype);
        if (cache->unit != u) {
          cache->bytes.resize(static_cast<std::size_t>(layout.units[u].numel) * esize);
          backend.download(cache->bytes.data(), params.units[u], cache->bytes.size());
          cache->unit = u;
        }
        const std::byte* src = cache->bytes.data() + off * static_cast<std::int64_t>(esize);
        if (params.dtype == file_dtype) {
          std::memcpy(dst, src, static_cast<std::size_t>(n) * esize);
        } else if (params.dtype == DType::kF32) {
          k::convert(src, DType::kF32, dst, file_dtype, static_cast<std::size_t>(n));
        } else {
          k::convert(src, params.dtype, dst, DType::kF32, static_cast<std::size_t>(n));
        }
      };
      tensors.push_back(std::move(w));
    }
  }
  auto files = io::write_safetensors_checkpoint(dir, tensors, max_shard_bytes, {{"format", "pt"}});
  write_file_atomic((std::filesystem::path(dir) / "config.json").string(), model_config_json(config).dump(2) + "\n");
  files.push_back("config.json");
  return files;
}

}  // namespace zinf::runtime
