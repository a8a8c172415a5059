#pragma once

#include <string_view>

namespace zinf {

// What this binary was built with; `zinf --version` prints it.
struct BuildInfo {
  std::string_view version;
  std::string_view build_type;
  std::string_view compiler;
  bool cuda;
  std::string_view cuda_architectures;
  std::string_view sanitizers;
};

const BuildInfo& build_info();

}  // namespace zinf
