#pragma once
// The GPUs this process can use, for `zinf --version` and for the clear "no GPU" error of every
// command that needs one.

#include <cstdint>
#include <string>
#include <vector>

namespace zinf::kernels {

struct GpuInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  std::uint64_t total_memory = 0;  // bytes
  int multiprocessors = 0;
};

struct GpuQuery {
  bool built_with_cuda = false;
  std::vector<GpuInfo> gpus;
  std::string driver;   // "13.0" etc., empty without one
  std::string runtime;  // CUDA runtime version this binary uses
  std::string problem;  // why no GPU is usable (no driver, no device, ...); empty when gpus is not
};

// Never throws: a machine without a GPU or driver is an answer, not an error.
GpuQuery query_gpus();

}  // namespace zinf::kernels
