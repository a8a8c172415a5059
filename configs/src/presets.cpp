#include "zinf/configs/presets.hpp"

#include <map>

#include "presets_data.hpp"
#include "zinf/common/error.hpp"

namespace zinf::config {

namespace {

// One line per preset for `zinf config presets`; a preset file without a line here is a build bug.
const std::map<std::string_view, std::string_view> kDescriptions{
    {"deepspeed_zero0", "no ZeRO partitioning: plain data parallel, everything on the GPU"},
    {"deepspeed_zero1", "ZeRO-1: optimizer state partitioned across ranks, on the GPU"},
    {"deepspeed_zero2", "ZeRO-2: optimizer state and gradients partitioned, on the GPU"},
    {"deepspeed_zero2_offload", "ZeRO-2 with optimizer state and the optimizer step in pinned host memory (CPU Adam)"},
    {"deepspeed_zero3", "ZeRO-3: parameters, gradients and optimizer state partitioned, on the GPU"},
    {"deepspeed_zero3_cpuoffload", "ZeRO-3 with parameters and optimizer state offloaded to pinned host memory"},
    {"deepspeed_zero3_nvme", "ZeRO-3 with parameters and optimizer state on NVMe (set nvme_path to your NVMe mount)"},
    {"zinf_gpu24g_cpuoffload", "24 GB GPU, state in pinned host memory, bf16 gradients: up to 8B at 4 x 2048 with 128 GB of RAM, 13B with 192 GB"},
    {"zinf_gpu24g_nvme", "24 GB GPU, optimizer state on NVMe (set nvme_path), parameters in host memory: up to 13B with 64 GB of RAM"},
    {"zinf_gpu80g_cpuoffload", "80 GB GPU, state in pinned host memory, fp32 gradients, 4e9 live parameters: 8B with 160 GB of RAM, 13B with 256 GB"},
    {"zinf_gpu80g_nvme", "80 GB GPU, optimizer state on NVMe (set nvme_path), bf16 gradients: 13B with 64 GB of RAM, 70B with 192 GB"},
    {"zinf_gpu141g_cpuoffload", "141 GB GPU, half the optimizer state stepped on the GPU (ratio 0.5): up to 8B with 128 GB of RAM, at the GPU's speed"},
    {"zinf_gpu141g_nvme", "141 GB GPU, optimizer state on NVMe (set nvme_path), 8e9 live parameters: 13B with 96 GB of RAM, 70B with 512 GB"},
};

}  // namespace

const std::vector<Preset>& presets() {
  static const std::vector<Preset> all = [] {
    std::vector<Preset> out;
    for (const auto& t : detail::preset_texts()) {
      const auto it = kDescriptions.find(t.name);
      ZINF_ASSERT(it != kDescriptions.end(), "preset {} has no description in presets.cpp", t.name);
      out.push_back({t.name, it->second, t.json, t.yaml});
    }
    return out;
  }();
  return all;
}

PresetRef parse_preset_ref(std::string_view text) {
  PresetRef ref{std::string(text), false};
  for (const std::string_view ext : {".json", ".yaml", ".yml"}) {
    if (text.size() > ext.size() && text.substr(text.size() - ext.size()) == ext) {
      ref.name.resize(text.size() - ext.size());
      ref.yaml = ext != ".json";
      break;
    }
  }
  return ref;
}

std::optional<Preset> find_preset(std::string_view name) {
  for (const auto& p : presets()) {
    if (p.name == name) return p;
  }
  return std::nullopt;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& p : presets()) names.emplace_back(p.name);
  return names;
}

}  // namespace zinf::config
