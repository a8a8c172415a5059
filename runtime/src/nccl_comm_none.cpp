// Builds without CUDA: NCCL ranks are not available (nccl_comm.hpp).
#include "zinf/common/error.hpp"
#include "zinf/runtime/nccl_comm.hpp"

namespace zinf::runtime {

namespace {
constexpr const char* kNoCuda = "this zinf was built without CUDA (configure with -DZINF_CUDA=ON on a host with the CUDA Toolkit)";
}

bool nccl_usable(std::string* why) {
  if (why) *why = kNoCuda;
  return false;
}
std::string nccl_version() { return ""; }
std::unique_ptr<Communicator> make_nccl_communicator(Communicator&, int, const NcclOptions&) {
  throw Error("NCCL ranks: {}", kNoCuda);
}
std::unique_ptr<DeviceCollectives> make_nccl_collectives(Communicator&, int, const NcclOptions&) {
  throw Error("NCCL ranks: {}", kNoCuda);
}
DeviceFloats::DeviceFloats(std::size_t) { throw Error("device memory: {}", kNoCuda); }
DeviceFloats::~DeviceFloats() = default;
void DeviceFloats::upload(const float*, std::size_t, std::size_t) { throw Error("device memory: {}", kNoCuda); }
void DeviceFloats::download(float*, std::size_t, std::size_t) const { throw Error("device memory: {}", kNoCuda); }

}  // namespace zinf::runtime
