// Communicators: Gloo over TCP for CPU ranks (connected through the rendezvous store,
// rendezvous.cpp), and a one-rank stand-in.
#include "zinf/runtime/comm.hpp"

#include <signal.h>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "rendezvous.hpp"

namespace zinf::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// Gloo writes to its sockets with writev: a write to a peer that has gone (its process died)
// would raise SIGPIPE, whose default action ends this process without a word. Ignored (unless
// the program installed a handler of its own), the write fails with EPIPE and Gloo throws, so the
// collective reports the lost peer.
void ignore_sigpipe() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old{};
    if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
      struct sigaction ign{};
      ign.sa_handler = SIG_IGN;
      sigemptyset(&ign.sa_mask);
      ::sigaction(SIGPIPE, &ign, nullptr);
    }
  });
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(int rank, int size, Rendezvous rendezvous, std::chrono::milliseconds timeout)
      : keep_alive_(std::move(rendezvous.keep_alive)), store_(rendezvous.store), timeout_(timeout) {
    const std::string& bind = rendezvous.bind;
    gloo::rendezvous::Store& store = *store_;
    ignore_sigpipe();
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = bind;
      device_ = gloo::transport::tcp::CreateDevice(attr);
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: cannot open a TCP transport on '{}': {}", rank, size, bind, e.what());
    }
    connect(rank, size, store);
  }
  // A channel of its own over the parent's transport and rendezvous store (split()).
  GlooCommunicator(const GlooCommunicator& parent, const std::string& name)
      : keep_alive_(parent.keep_alive_), device_(parent.device_), timeout_(parent.timeout_) {
    auto prefixed = std::make_shared<gloo::rendezvous::PrefixStore>(
        fmt::format("split-{}-{}", parent.splits_, name), *parent.store_);
    store_ = prefixed.get();
    split_store_ = prefixed;
    connect(parent.rank(), parent.size(), *prefixed);
  }

  std::unique_ptr<Communicator> split(const std::string& name) override {
    ++splits_;
    try {
      return std::make_unique<GlooCommunicator>(*this, name);
    } catch (const Error& e) {
      throw Error("opening communication channel '{}': {}", name, e.what());
    }
  }
  int rank() const override { return context_->rank; }
  int size() const override { return context_->size; }

  void all_reduce_sum(std::span<float> data) override {
    if (data.empty()) return;
    run("all-reduce", [&] {
      gloo::AllreduceOptions o(context_);
      o.setOutput(data.data(), data.size());
      o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      o.setTag(next_tag());
      gloo::allreduce(o);
    });
  }
  void all_gather(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size() * static_cast<std::size_t>(size()), "all_gather: output size");
    if (in.empty()) return;
    run("all-gather", [&] {
      gloo::AllgatherOptions o(context_);
      o.setInput(const_cast<float*>(in.data()), in.size());
      o.setOutput(out.data(), out.size());
      o.setTag(next_tag());
      gloo::allgather(o);
    });
  }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    const auto w = static_cast<std::size_t>(size());
    if (in.size() % w != 0 || out.size() != in.size() / w) {
      throw Error("reduce_scatter: {} elements do not split into {} shards of {}", in.size(), w, out.size());
    }
    if (in.empty()) return;
    if (w == 1) {
      std::copy(in.begin(), in.end(), out.begin());
      return;
    }
    // A ring: W - 1 steps, each rank sending one shard-sized chunk to the next rank and adding the
    // one it receives from the previous rank; after the last step rank r holds the sum of shard r.
    // Every byte crosses the wire (W - 1) / W times, as in NCCL's reduce-scatter. Each shard's
    // sum runs in a fixed rank order, so the result does not depend on timing.
    run("reduce-scatter", [&] {
      const std::size_t n = out.size();
      const std::size_t bytes = n * sizeof(float);
      const int r = rank(), ranks = size();
      // One chunk of running sum travels the ring: step k sends the chunk summed so far (the
      // input's own chunk at k = 0) and adds the received one to the next input chunk. Only two
      // chunks of scratch; the last sum lands in `out`.
      acc_.resize(n);
      recv_.resize(n);
      const std::uint32_t tag = next_tag();
      const auto slot = static_cast<std::uint64_t>(gloo::Slot::build(kReduceScatterSlotPrefix, tag));
      // Gloo only reads from a send buffer; its interface takes a mutable pointer.
      auto in_buf = context_->createUnboundBuffer(const_cast<float*>(in.data()), in.size() * sizeof(float));
      auto acc_buf = context_->createUnboundBuffer(acc_.data(), bytes);
      auto recv_buf = context_->createUnboundBuffer(recv_.data(), bytes);
      const int next = (r + 1) % ranks, prev = (r + ranks - 1) % ranks;
      for (int k = 0; k < ranks - 1; ++k) {
        const auto send_idx = static_cast<std::size_t>(((r - 1 - k) % ranks + ranks) % ranks);
        const auto recv_idx = static_cast<std::size_t>(((r - 2 - k) % ranks + ranks) % ranks);
        const std::uint64_t s = slot + static_cast<std::uint64_t>(k);
        if (k == 0) {
          in_buf->send(next, s, send_idx * bytes, bytes);
        } else {
          acc_buf->send(next, s, 0, bytes);
        }
        recv_buf->recv(prev, s, 0, bytes);
        recv_buf->waitRecv(timeout_);
        (k == 0 ? in_buf : acc_buf)->waitSend(timeout_);
        float* dst = k == ranks - 2 ? out.data() : acc_.data();
        const float* mine = in.data() + recv_idx * n;
        for (std::size_t i = 0; i < n; ++i) dst[i] = mine[i] + recv_[i];
      }
    });
  }
  void broadcast(std::span<float> data, int root) override {
    broadcast_bytes(std::as_writable_bytes(data), root);
  }
  void broadcast_bytes(std::span<std::byte> data, int root) override {
    if (data.empty()) return;
    run("broadcast", [&] {
      gloo::BroadcastOptions o(context_);
      o.setOutput(reinterpret_cast<std::uint8_t*>(data.data()), data.size());
      o.setRoot(root);
      o.setTag(next_tag());
      gloo::broadcast(o);
    });
  }
  void barrier(std::chrono::milliseconds timeout) override {
    run("barrier", [&] {
      gloo::BarrierOptions o(context_);
      o.setTag(next_tag());
      if (timeout.count() > 0) o.setTimeout(timeout);
      gloo::barrier(o);
    });
  }

 private:
  template <typename F>
  void run(const char* what, F&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: {} failed: {} (a rank has probably died or stalled; see its error)", rank(), size(),
                  what, e.what());
    }
  }
  std::uint32_t next_tag() { return tag_++; }
  void connect(int rank, int size, gloo::rendezvous::Store& store) {
    try {
      auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
      ctx->setTimeout(timeout_);
      ctx->connectFullMesh(store, device_);
      context_ = ctx;
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error("rank {} of {}: connecting the ranks failed: {}", rank, size, e.what());
    }
  }
  // Not one of Gloo's own prefixes (types.h), so its slots never meet a Gloo collective's.
  static constexpr std::uint8_t kReduceScatterSlotPrefix = 0x7a;

  std::shared_ptr<void> keep_alive_;
  gloo::rendezvous::Store* store_ = nullptr;
  std::shared_ptr<gloo::rendezvous::Store> split_store_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
  std::chrono::milliseconds timeout_;
  std::vector<float> acc_, recv_;
  std::uint32_t tag_ = 0;
  int splits_ = 0;
};

class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(std::span<float>) override {}
  void all_gather(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size());
    std::copy(in.begin(), in.end(), out.begin());
  }
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out) override {
    ZINF_ASSERT(out.size() == in.size());
    std::copy(in.begin(), in.end(), out.begin());
  }
  void broadcast(std::span<float>, int) override {}
  void broadcast_bytes(std::span<std::byte>, int) override {}
  void barrier(std::chrono::milliseconds) override {}
  std::unique_ptr<Communicator> split(const std::string&) override { return std::make_unique<SingleCommunicator>(); }
};

}  // namespace

std::unique_ptr<Communicator> make_gloo_communicator(const RankInfo& info, const GlooOptions& options) {
  if (info.world_size == 1) return make_single_communicator();
  return std::make_unique<GlooCommunicator>(info.rank, info.world_size, tcp_rendezvous(info, options), options.timeout);
}

std::unique_ptr<Communicator> make_gloo_communicator_in_process(int rank, int size, const std::string& store_id,
                                                               const GlooOptions& options) {
  return std::make_unique<GlooCommunicator>(rank, size, in_process_rendezvous(store_id), options.timeout);
}

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

}  // namespace zinf::runtime
