#pragma once
// GPU ranks: a Communicator over NCCL. Its collectives take device pointers (memory on the rank's
// GPU) and return when the result is there, like the Gloo communicator's. NCCL is loaded at run
// time (libnccl.so.2, or ZINF_NCCL_LIBRARY), so CPU-only hosts run zinf without it.
//
// Every operation runs in NCCL's non-blocking mode and is watched: a rank that died or stalled
// makes the others' collectives fail after the timeout (the communicator is aborted), never hang.

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/runtime/comm.hpp"

namespace zinf::runtime {

struct NcclOptions {
  std::chrono::milliseconds timeout = default_comm_timeout();
};

// Whether NCCL and a GPU can be used here; `why` says what is missing when not.
bool nccl_usable(std::string* why = nullptr);

// NCCL's version ("2.28.3"), or "" when it cannot be loaded.
std::string nccl_version();

// Joins the ranks of `bootstrap` (any communicator among the same ranks, e.g. Gloo over TCP) into
// an NCCL communicator on CUDA device `device` (this thread's current device afterwards). The
// NCCL unique id travels over `bootstrap`. Collective. Throws zinf::Error naming what is missing
// (no CUDA build, no GPU, no NCCL library) or what failed.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, const NcclOptions& options = {});

// Collectives on device memory of any element type: the trainer's GPU pipeline with several
// GPUs (stage-3 all-gathers of bf16 or fp32 parameter shards, reduce-scatters of gradients). Each
// call returns when its result is in place, and is watched like the Communicator's (a peer that
// never arrives is an error after the timeout). One thread at a time per object: split() gives
// another thread a channel of its own.
class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // out (count x size() elements) = every rank's `in` (count elements), in rank order. In place
  // when in == out + rank() * count (in elements).
  virtual void all_gather(const void* in, void* out, std::size_t count, kernels::cpu::DType dtype) = 0;
  // out (count elements) = the sum over ranks of their in[rank() * count, (rank() + 1) * count).
  virtual void reduce_scatter_sum(const void* in, void* out, std::size_t count, kernels::cpu::DType dtype) = 0;
  virtual std::unique_ptr<DeviceCollectives> split(const std::string& name) = 0;
};

// As make_nccl_communicator(), for device collectives of any element type.
std::unique_ptr<DeviceCollectives> make_nccl_collectives(Communicator& bootstrap, int device,
                                                         const NcclOptions& options = {});

// Device memory for tests and benchmarks (cudaMalloc / cudaFree), with copies to and from the host.
class DeviceFloats {
 public:
  DeviceFloats() = default;
  explicit DeviceFloats(std::size_t count);
  ~DeviceFloats();
  DeviceFloats(DeviceFloats&& o) noexcept : data_(o.data_), count_(o.count_) { o.data_ = nullptr, o.count_ = 0; }
  DeviceFloats& operator=(DeviceFloats&& o) noexcept {  // the old memory goes with `o`
    std::swap(data_, o.data_);
    std::swap(count_, o.count_);
    return *this;
  }
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
  float* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return count_; }
  std::span<float> span() const noexcept { return {data_, count_}; }
  void upload(const float* host, std::size_t count, std::size_t offset = 0);
  void download(float* host, std::size_t count, std::size_t offset = 0) const;

 private:
  float* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace zinf::runtime
