// Built without CUDA: the GPU benchmarks say so.
#include "zinf/common/error.hpp"
#include "zinf/runtime/gpu_bench.hpp"

namespace zinf::runtime {

double PcieResult::best(const std::string&, const std::string&, const std::string&) const { return 0; }

PcieResult bench_pcie(const PcieOptions&) {
  throw Error("this zinf was built without CUDA: no GPU to measure (configure with -DZINF_CUDA=ON on a machine with "
              "the CUDA Toolkit)");
}

GemmResult bench_gemm(int, std::vector<GemmRow>, int) {
  throw Error("this zinf was built without CUDA: no GPU to measure (configure with -DZINF_CUDA=ON on a machine with "
              "the CUDA Toolkit)");
}

}  // namespace zinf::runtime
