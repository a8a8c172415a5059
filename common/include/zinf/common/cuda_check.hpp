#pragma once
// The one way zinf checks CUDA, cuBLASLt and kernel launches: include only from targets compiled
// with the CUDA Toolkit. A failing call becomes a zinf::Error naming what failed (the call, or what
// it was for), the CUDA error's name and its text: CUDA failures are almost always environmental
// (no device, out of memory, driver mismatch), which the user can act on.
//   cuda_check(cudaMalloc(&p, n), "cudaMalloc (the cuBLASLt workspace)");
//   ZINF_CUDA_CHECK(cudaStreamSynchronize(s));      // names the call itself
//   cuda_check_launch("rmsnorm_forward");           // after a kernel launch

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "zinf/common/error.hpp"

namespace zinf {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) [[unlikely]] {
    (void)cudaGetLastError();  // a non-sticky error is cleared, so the next call does not report it again
    throw Error("CUDA: {} failed: {} ({})", what, cudaGetErrorName(err), cudaGetErrorString(err));
  }
}

inline void cuda_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) [[unlikely]] {
    throw Error("cuBLASLt: {} failed: {}", what, cublasLtGetStatusString(status));
  }
}

// The last kernel launch (configuration errors surface here, not at the next sync).
inline void cuda_check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) [[unlikely]] {
    throw Error("CUDA kernel {} failed to launch: {} ({})", kernel, cudaGetErrorName(err), cudaGetErrorString(err));
  }
}

// Asks for more than 48 KiB of dynamic shared memory for `kernel` (for `what`).
inline void cuda_allow_shared_memory(const void* kernel, std::size_t bytes, const char* what) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) [[unlikely]] {
    (void)cudaGetLastError();
    throw Error("{}: {} KiB of shared memory is not available: {}", what, bytes / 1024, cudaGetErrorString(err));
  }
}

}  // namespace zinf

#define ZINF_CUDA_CHECK(call) ::zinf::cuda_check((call), #call)
