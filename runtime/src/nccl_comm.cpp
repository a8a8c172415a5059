// The NCCL communicator (nccl_comm.hpp). NCCL is opened with dlopen so the binary does not need it
// to start; every call goes through the table below.
#include "zinf/runtime/nccl_comm.hpp"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"

namespace zinf::runtime {
namespace {

using Clock = std::chrono::steady_clock;

struct NcclApi {
  std::string error;  // why NCCL could not be loaded; empty when it was
  decltype(&ncclGetVersion) get_version = nullptr;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRankConfig) init_rank_config = nullptr;
  decltype(&ncclCommDestroy) destroy = nullptr;
  decltype(&ncclCommFinalize) finalize = nullptr;
  decltype(&ncclCommAbort) abort = nullptr;
  decltype(&ncclCommGetAsyncError) async_error = nullptr;
  decltype(&ncclCommSplit) split = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclReduceScatter) reduce_scatter = nullptr;
  decltype(&ncclBroadcast) broadcast = nullptr;
};

const NcclApi& nccl() {
  static NcclApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("ZINF_NCCL_LIBRARY");
    const std::string name = env != nullptr && *env != '\0' ? env : "libnccl.so.2";
    void* lib = ::dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = ::dlerror();
      api.error = fmt::format("cannot load NCCL ({}): {}; install NCCL 2.18 or later, or point ZINF_NCCL_LIBRARY at "
                              "libnccl.so.2", name, e != nullptr ? e : "not found");
      return;
    }
    bool ok = true;
    const auto sym = [&](auto& fn, const char* s) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(lib, s));
      if (fn == nullptr) {
        ok = false;
        api.error = fmt::format("NCCL at {} lacks {} (zinf needs NCCL 2.18 or later)", name, s);
      }
    };
    sym(api.get_version, "ncclGetVersion");
    sym(api.get_unique_id, "ncclGetUniqueId");
    sym(api.init_rank_config, "ncclCommInitRankConfig");
    sym(api.destroy, "ncclCommDestroy");
    sym(api.finalize, "ncclCommFinalize");
    sym(api.abort, "ncclCommAbort");
    sym(api.async_error, "ncclCommGetAsyncError");
    sym(api.split, "ncclCommSplit");
    sym(api.error_string, "ncclGetErrorString");
    sym(api.all_reduce, "ncclAllReduce");
    sym(api.all_gather, "ncclAllGather");
    sym(api.reduce_scatter, "ncclReduceScatter");
    sym(api.broadcast, "ncclBroadcast");
    if (!ok) api.get_version = nullptr;
  });
  return api;
}

const NcclApi& nccl_or_throw() {
  const NcclApi& a = nccl();
  if (!a.error.empty()) throw Error("{}", a.error);
  return a;
}


class NcclCommunicator final : public Communicator {
 public:
  // A new communicator from a unique id (init) or from a parent (split).
  NcclCommunicator(int rank, int size, int device, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_(device), timeout_(timeout) {
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaMalloc(&scalar_, sizeof(float)), "cudaMalloc");
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) {
      // A healthy communicator is finalized (non-blocking: polled, within the timeout) and
      // destroyed; one whose last operation failed, or that does not finalize, is aborted.
      cudaSetDevice(device_);
      ncclResult_t st = ncclSuccess;
      api_.async_error(comm_, &st);
      bool clean = st == ncclSuccess && api_.finalize(comm_) != ncclSystemError;
      const auto deadline = Clock::now() + timeout_;
      while (clean) {
        api_.async_error(comm_, &st);
        if (st == ncclSuccess) break;
        if (st != ncclInProgress || Clock::now() > deadline) clean = false;
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (clean) {
        api_.destroy(comm_);
      } else {
        api_.abort(comm_);
      }
    }
    if (scalar_ != nullptr) cudaFree(scalar_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  void init(const ncclUniqueId& id) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    check(api_.init_rank_config(&comm_, size_, id, rank_, &config), "joining the ranks");
    wait_ready("joining the ranks");
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(std::span<float> data) override {
    if (data.empty()) return;
    run("all-reduce", [&] {
      return api_.all_reduce(data.data(), data.data(), data.size(), ncclFloat32, ncclSum, comm_, stream_);
    });
  }
  void all_gather(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size() * static_cast<std::size_t>(size_), "all_gather: output size");
    if (in.empty()) return;
    run("all-gather", [&] { return api_.all_gather(in.data(), out.data(), in.size(), ncclFloat32, comm_, stream_); });
  }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    const auto w = static_cast<std::size_t>(size_);
    if (in.size() % w != 0 || out.size() != in.size() / w) {
      throw Error("reduce_scatter: {} elements do not split into {} shards of {}", in.size(), w, out.size());
    }
    if (in.empty()) return;
    run("reduce-scatter", [&] {
      return api_.reduce_scatter(in.data(), out.data(), out.size(), ncclFloat32, ncclSum, comm_, stream_);
    });
  }
  void broadcast(std::span<float> data, int root) override { broadcast_bytes(std::as_writable_bytes(data), root); }
  void broadcast_bytes(std::span<std::byte> data, int root) override {
    if (data.empty()) return;
    run("broadcast", [&] { return api_.broadcast(data.data(), data.data(), data.size(), ncclUint8, root, comm_, stream_); });
  }
  void barrier(std::chrono::milliseconds timeout) override {
    const auto saved = timeout_;
    if (timeout.count() > 0) timeout_ = timeout;
    try {
      run("barrier", [&] { return api_.all_reduce(scalar_, scalar_, 1, ncclFloat32, ncclSum, comm_, stream_); });
    } catch (...) {
      timeout_ = saved;
      throw;
    }
    timeout_ = saved;
  }
  std::unique_ptr<Communicator> split(const std::string& name) override { return split_nccl(name); }

  // Any element type, device pointers (DeviceCollectives).
  void all_gather_typed(const void* in, void* out, std::size_t count, ncclDataType_t type) {
    if (count == 0) return;
    run("all-gather", [&] { return api_.all_gather(in, out, count, type, comm_, stream_); });
  }
  void reduce_scatter_typed(const void* in, void* out, std::size_t count, ncclDataType_t type) {
    if (count == 0) return;
    run("reduce-scatter", [&] { return api_.reduce_scatter(in, out, count, type, ncclSum, comm_, stream_); });
  }

  std::unique_ptr<NcclCommunicator> split_nccl(const std::string& name) {
    auto child = std::make_unique<NcclCommunicator>(rank_, size_, device_, timeout_);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    const std::string what = fmt::format("opening channel '{}'", name);
    check(api_.split(comm_, 0, rank_, &child->comm_, &config), what.c_str());
    // Non-blocking: the split completes on the parent (and the child appears) asynchronously.
    wait_ready(what.c_str());
    const auto deadline = Clock::now() + timeout_;
    // NCCL's thread fills the pointer in.
    while (std::atomic_ref<ncclComm_t>(child->comm_).load() == nullptr) {
      if (Clock::now() > deadline) timed_out(what.c_str());
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    child->wait_ready(what.c_str());
    return child;
  }

 private:
  void check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    throw Error("rank {} of {} (GPU {}): NCCL {} failed: {}", rank_, size_, device_, what, api_.error_string(r));
  }
  // Non-blocking mode: an operation may still be in progress when its call returns.
  void wait_ready(const char* what) {
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      ncclResult_t st = ncclSuccess;
      api_.async_error(comm_, &st);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) check(st, what);
      if (Clock::now() > deadline) timed_out(what);
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  template <typename F>
  void run(const char* what, F&& enqueue) {
    if (comm_ == nullptr) throw Error("rank {} of {}: NCCL {}: the communicator was aborted after an earlier failure", rank_, size_, what);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    check(enqueue(), what);
    wait_ready(what);
    // The kernels are queued; wait for the stream, watching for a peer that never arrives.
    const auto deadline = Clock::now() + timeout_;
    int polls = 0;
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) cuda_check(e, what);
      ncclResult_t st = ncclSuccess;
      api_.async_error(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress) check(st, what);
      if (Clock::now() > deadline) timed_out(what);
      // Back off from a spin to 50 us sleeps, so a waiting thread does not hold a core.
      if (++polls > 64) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      } else {
        std::this_thread::yield();
      }
    }
  }
  [[noreturn]] void timed_out(const char* what) {
    api_.abort(comm_);
    comm_ = nullptr;
    throw Error("rank {} of {} (GPU {}): NCCL {} did not finish within {} s (a rank has probably died or stalled; see "
                "its error; ZINF_COMM_TIMEOUT sets the limit)",
                rank_, size_, device_, what, timeout_.count() / 1000.0);
  }

  const NcclApi& api_ = nccl_or_throw();
  int rank_, size_, device_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  float* scalar_ = nullptr;
};

ncclDataType_t nccl_type(kernels::cpu::DType t) {
  switch (t) {
    case kernels::cpu::DType::kF32: return ncclFloat32;
    case kernels::cpu::DType::kBF16: return ncclBfloat16;
    case kernels::cpu::DType::kF16: return ncclFloat16;
  }
  throw Error("NCCL: unknown element type");
}

class NcclDeviceCollectives final : public DeviceCollectives {
 public:
  explicit NcclDeviceCollectives(std::unique_ptr<NcclCommunicator> c) : c_(std::move(c)) {}
  int rank() const override { return c_->rank(); }
  int size() const override { return c_->size(); }
  void all_gather(const void* in, void* out, std::size_t count, kernels::cpu::DType dtype) override {
    c_->all_gather_typed(in, out, count, nccl_type(dtype));
  }
  void reduce_scatter_sum(const void* in, void* out, std::size_t count, kernels::cpu::DType dtype) override {
    c_->reduce_scatter_typed(in, out, count, nccl_type(dtype));
  }
  std::unique_ptr<DeviceCollectives> split(const std::string& name) override {
    return std::make_unique<NcclDeviceCollectives>(c_->split_nccl(name));
  }

 private:
  std::unique_ptr<NcclCommunicator> c_;
};

std::unique_ptr<NcclCommunicator> join_nccl(Communicator& bootstrap, int device, const NcclOptions& options);

}  // namespace

bool nccl_usable(std::string* why) {
  const NcclApi& a = nccl();
  if (!a.error.empty()) {
    if (why) *why = a.error;
    return false;
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    if (why) *why = e != cudaSuccess ? fmt::format("no usable GPU: {}", cudaGetErrorString(e)) : "no GPU visible";
    cudaGetLastError();
    return false;
  }
  return true;
}

std::string nccl_version() {
  const NcclApi& a = nccl();
  if (!a.error.empty()) return "";
  int v = 0;
  if (a.get_version(&v) != ncclSuccess) return "";
  // Since 2.9: major * 10000 + minor * 100 + patch.
  return fmt::format("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100);
}

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, const NcclOptions& options) {
  return join_nccl(bootstrap, device, options);
}

std::unique_ptr<DeviceCollectives> make_nccl_collectives(Communicator& bootstrap, int device, const NcclOptions& options) {
  return std::make_unique<NcclDeviceCollectives>(join_nccl(bootstrap, device, options));
}

namespace {
std::unique_ptr<NcclCommunicator> join_nccl(Communicator& bootstrap, int device, const NcclOptions& options) {
  // Every rank checks what it can, then the ranks agree before any of them calls into NCCL: a
  // rank that cannot take part makes all of them fail at once, each naming the ranks and why.
  std::string why;
  bool ok = nccl_usable(&why);
  if (ok) {
    int count = 0;
    cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device < 0 || device >= count) {
      ok = false;
      why = fmt::format("GPU {} does not exist ({} visible); give each local rank its own GPU (LOCAL_RANK < {})",
                        device, count, count);
    }
  }
  ncclUniqueId id{};
  if (ok && bootstrap.rank() == 0) {
    const ncclResult_t r = nccl().get_unique_id(&id);
    if (r != ncclSuccess) {
      ok = false;
      why = fmt::format("creating the job's NCCL unique id failed: {}", nccl().error_string(r));
    }
  }
  const int w = bootstrap.size();
  std::vector<float> all(static_cast<std::size_t>(w));
  const float mine = ok ? 1.0f : 0.0f;
  bootstrap.all_gather(std::span<const float>(&mine, 1), all);
  std::string bad;
  for (int r = 0; r < w; ++r) {
    if (all[static_cast<std::size_t>(r)] == 0.0f) { if (!bad.empty()) bad += ", "; bad += std::to_string(r); }
  }
  if (!bad.empty()) {
    throw Error("rank {}: NCCL ranks cannot start: rank(s) {} cannot use NCCL{}", bootstrap.rank(), bad,
                ok ? " (see their errors)" : fmt::format("; here: {}", why));
  }
  bootstrap.broadcast_bytes(std::as_writable_bytes(std::span<char>(id.internal, sizeof(id.internal))), 0);
  auto c = std::make_unique<NcclCommunicator>(bootstrap.rank(), bootstrap.size(), device, options.timeout);
  c->init(id);
  return c;
}
}  // namespace

DeviceFloats::DeviceFloats(std::size_t count) : count_(count) {
  if (count > 0) cuda_check(cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(float)), "cudaMalloc");
}
DeviceFloats::~DeviceFloats() {
  if (data_ != nullptr) cudaFree(data_);
}
void DeviceFloats::upload(const float* host, std::size_t count, std::size_t offset) {
  ZINF_ASSERT(offset + count <= count_, "DeviceFloats::upload out of range");
  cuda_check(cudaMemcpy(data_ + offset, host, count * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
}
void DeviceFloats::download(float* host, std::size_t count, std::size_t offset) const {
  ZINF_ASSERT(offset + count <= count_, "DeviceFloats::download out of range");
  cuda_check(cudaMemcpy(host, data_ + offset, count * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
}

}  // namespace zinf::runtime
