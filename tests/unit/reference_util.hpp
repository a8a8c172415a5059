#pragma once
// Shared by the tests that compare against files a PyTorch reference script wrote (the model's and
// LoRA's): where the files are, which cases they hold, the batches, and whether a GPU is here.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "zinf/common/error.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/device_info.hpp"

namespace zinf::testing {

// The directory named by environment variable `env`, else the build's default.
inline std::string reference_dir(const char* env, const char* fallback) {
  const char* v = std::getenv(env);
  return (v != nullptr && *v != '\0') ? std::string(v) : std::string(fallback);
}

// The case names listed in `dir`/cases.txt (none when the reference has not run).
inline std::vector<std::string> reference_cases(const std::string& dir) {
  std::vector<std::string> out;
  std::ifstream in(dir + "/cases.txt");
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

// A (b, s) int32 tensor of a reference file.
inline std::vector<std::int32_t> read_i32(const io::SafetensorsFile& f, const std::string& name, std::int64_t& b,
                                          std::int64_t& s) {
  const io::StTensor* t = f.find(name);
  if (t == nullptr || t->dtype != io::StDType::kI32 || t->shape.size() != 2) throw Error("bad {} in {}", name, f.path());
  b = t->shape[0], s = t->shape[1];
  std::vector<std::int32_t> v(static_cast<std::size_t>(t->numel()));
  std::memcpy(v.data(), f.bytes(*t).data(), v.size() * 4);
  return v;
}

// Whether a GPU is usable here; `why` says why not.
inline bool gpu_here(std::string& why) {
  const kernels::GpuQuery q = kernels::query_gpus();
  if (q.gpus.empty()) why = q.built_with_cuda ? q.problem : std::string("built without CUDA");
  return !q.gpus.empty();
}

}  // namespace zinf::testing
