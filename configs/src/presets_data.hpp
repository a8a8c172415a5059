#pragma once

#include <string_view>
#include <vector>

namespace zinf::config::detail {

struct PresetText {
  std::string_view name;
  std::string_view json;
  std::string_view yaml;
};

// Every configs/presets/<name>.json with its YAML twin, sorted by name (generated at configure time).
const std::vector<PresetText>& preset_texts();

}  // namespace zinf::config::detail
