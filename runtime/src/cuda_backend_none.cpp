// Builds without CUDA: the CUDA backend is not available (backend.hpp).
#include "zinf/common/error.hpp"
#include "zinf/runtime/backend.hpp"

namespace zinf::runtime {

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  throw Error("the CUDA backend is not in this build of zinf (configure with -DZINF_CUDA=ON on a host with the CUDA "
              "Toolkit)");
}

}  // namespace zinf::runtime
