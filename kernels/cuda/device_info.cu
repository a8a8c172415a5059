// Device query through the CUDA runtime (cudaGetDeviceCount / cudaGetDeviceProperties).
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include "zinf/kernels/device_info.hpp"

namespace zinf::kernels {

namespace {
std::string version_text(int v) { return fmt::format("{}.{}", v / 1000, (v % 1000) / 10); }
}  // namespace

GpuQuery query_gpus() {
  GpuQuery q;
  q.built_with_cuda = true;
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) q.runtime = version_text(runtime);
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) q.driver = version_text(driver);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (err == cudaErrorInsufficientDriver) {
      q.problem = fmt::format("no NVIDIA driver, or one older than CUDA {} needs; install or update the driver",
                              q.runtime);
    } else if (err == cudaErrorNoDevice) {
      q.problem = "no GPU visible to this process; check CUDA_VISIBLE_DEVICES";
    } else {
      q.problem = fmt::format("no usable GPU: cudaGetDeviceCount -> {} ({})", cudaGetErrorName(err),
                              cudaGetErrorString(err));
    }
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return q;
  }
  if (count == 0) {
    q.problem = "no GPU found (cudaGetDeviceCount = 0); check CUDA_VISIBLE_DEVICES";
    return q;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    q.gpus.push_back({i, prop.name, prop.major, prop.minor, static_cast<std::uint64_t>(prop.totalGlobalMem),
                      prop.multiProcessorCount});
  }
  if (q.gpus.empty()) q.problem = "GPUs were counted but none could be queried";
  return q;
}

}  // namespace zinf::kernels
