#pragma once
// ZINF_CUDA_CHECK / ZINF_CUBLAS_CHECK: include only from targets compiled with the CUDA Toolkit.
// A failing call becomes a zinf::Error quoting the call, the CUDA error name and its text: CUDA
// failures are almost always environmental (no device, out of memory, driver mismatch), which
// the user can act on.

#include <cuda_runtime_api.h>

#include "zinf/common/error.hpp"

namespace zinf::detail {
[[noreturn]] inline void throw_cuda_error(const char* call, const char* file, int line, cudaError_t err) {
  throw Error("CUDA call failed: {} -> {} ({}) at {}:{}", call, cudaGetErrorName(err), cudaGetErrorString(err),
              file, line);
}
}  // namespace zinf::detail

#define ZINF_CUDA_CHECK(call)                                                           \
  do {                                                                                  \
    const cudaError_t zinf_err_ = (call);                                               \
    if (zinf_err_ != cudaSuccess) [[unlikely]] {                                        \
      ::zinf::detail::throw_cuda_error(#call, __FILE__, __LINE__, zinf_err_);           \
    }                                                                                   \
  } while (0)

// Checks the last kernel launch (configuration errors surface here, not at the next sync).
#define ZINF_CUDA_CHECK_LAUNCH() ZINF_CUDA_CHECK(cudaGetLastError())
