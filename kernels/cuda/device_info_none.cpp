// Built without CUDA: no GPU can be used by this binary.
#include "zinf/kernels/device_info.hpp"

namespace zinf::kernels {

GpuQuery query_gpus() {
  GpuQuery q;
  q.problem = "this zinf was built without CUDA (configure with -DZINF_CUDA=ON on a machine with the CUDA Toolkit)";
  return q;
}

}  // namespace zinf::kernels
