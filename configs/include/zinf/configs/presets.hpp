#pragma once
// Built-in presets (configs/presets/*.json and *.yaml), embedded in the binary at build time.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace zinf::config {

struct Preset {
  std::string_view name;         // e.g. "deepspeed_zero3_cpuoffload"
  std::string_view description;  // one line
  std::string_view json_text;    // configs/presets/<name>.json
  std::string_view yaml_text;    // configs/presets/<name>.yaml
};

const std::vector<Preset>& presets();

// "deepspeed_zero3.yaml" -> {"deepspeed_zero3", yaml = true}; a name without .json/.yaml/.yml stays
// as it is (JSON).
struct PresetRef {
  std::string name;
  bool yaml = false;
};
PresetRef parse_preset_ref(std::string_view text);
std::optional<Preset> find_preset(std::string_view name);
// Closest preset names, for "did you mean" in errors.
std::vector<std::string> preset_names();

}  // namespace zinf::config
