#pragma once
// ZINF_NCCL_CHECK: include only from targets that link NCCL.

#include <nccl.h>

#include "zinf/common/error.hpp"

#define ZINF_NCCL_CHECK(call)                                                                     \
  do {                                                                                            \
    const ncclResult_t zinf_nccl_ = (call);                                                       \
    if (zinf_nccl_ != ncclSuccess) [[unlikely]] {                                                 \
      throw ::zinf::Error("NCCL call failed: {} -> {} ({}) at {}:{}", #call, ncclGetErrorString(zinf_nccl_), \
                          ncclGetLastError(nullptr), __FILE__, __LINE__);                         \
    }                                                                                             \
  } while (0)
