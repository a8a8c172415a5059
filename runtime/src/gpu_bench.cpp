// `zinf bench pcie` and `zinf bench gemm` on the GPU: see gpu_bench.hpp.
#include "zinf/runtime/gpu_bench.hpp"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/offload/host_memory.hpp"
#include "zinf/runtime/backend.hpp"

namespace zinf::runtime {
namespace {

using Clock = std::chrono::steady_clock;


std::string gpu_name(int device) {
  const auto q = kernels::query_gpus();
  if (q.gpus.empty()) throw Error("no usable GPU: {}", q.problem);
  for (const auto& g : q.gpus) {
    if (g.index == device) return g.name;
  }
  throw Error("GPU {} does not exist: this machine has {} (--device 0..{})", device, q.gpus.size(), q.gpus.size() - 1);
}

struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(std::size_t bytes) { cuda_check(cudaMalloc(&p, bytes), "cudaMalloc"); }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};
struct PinnedBuf {
  void* p = nullptr;
  explicit PinnedBuf(std::size_t bytes) {
    cuda_check(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc");
    std::memset(p, 1, bytes);
  }
  ~PinnedBuf() {
    if (p) cudaFreeHost(p);
  }
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
};
struct Streams {
  cudaStream_t up = nullptr, down = nullptr;
  Streams() {
    cuda_check(cudaStreamCreateWithFlags(&up, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaStreamCreateWithFlags(&down, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~Streams() {
    if (up) cudaStreamDestroy(up);
    if (down) cudaStreamDestroy(down);
  }
  Streams(const Streams&) = delete;
  Streams& operator=(const Streams&) = delete;
};

// Best GB/s over `repeat` rounds of `copies` calls of `issue` followed by `sync`.
double best_gbps(int repeat, int copies, double bytes_per_copy, const std::function<void()>& issue,
                 const std::function<void()>& sync) {
  issue();  // warm-up
  sync();
  double best = 0;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = Clock::now();
    for (int c = 0; c < copies; ++c) issue();
    sync();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, bytes_per_copy * copies / s / 1e9);
  }
  return best;
}

}  // namespace

double PcieResult::best(const std::string& path, const std::string& memory, const std::string& direction) const {
  double b = 0;
  for (const auto& r : rows) {
    if (r.path == path && r.memory == memory && r.direction == direction) b = std::max(b, r.gbps);
  }
  return b;
}

PcieResult bench_pcie(const PcieOptions& o) {
  PcieResult res;
  res.gpu = gpu_name(o.device);
  cuda_check(cudaSetDevice(o.device), "cudaSetDevice");
  std::vector<std::uint64_t> sizes = o.sizes;
  if (sizes.empty()) {
    for (std::uint64_t s = 64u << 10; s <= (256u << 20); s *= 4) sizes.push_back(s);
  }
  for (const std::uint64_t n : sizes) {
    if (n == 0) throw Error("pcie bench: a transfer size of 0 bytes (give sizes of at least one byte)");
  }
  const std::uint64_t largest = *std::max_element(sizes.begin(), sizes.end());

  // The reference: cudaMemcpyAsync between cudaHostAlloc'd (or malloc'd) memory and the GPU, on
  // streams of its own.
  PinnedBuf h_up(largest), h_down(largest);
  std::vector<char> p_up(largest, 1), p_down(largest);
  DevBuf d_up(largest), d_down(largest);
  Streams st;
  // zinf's path: HostMemory's pinned buffers and the backend's copy streams.
  auto backend = make_cuda_backend(CudaBackendOptions{.device = o.device});
  offload::HostMemory host(0, offload::PinMode::kCudaHost);
  auto z_up = host.allocate(offload::Purpose::kStaging, largest, "pcie bench upload");
  auto z_down = host.allocate(offload::Purpose::kStaging, largest, "pcie bench download");
  std::memset(z_up.data(), 1, largest);
  struct Free {
    Backend& b;
    std::size_t n;
    void* a = nullptr;
    void* c = nullptr;
    ~Free() {
      if (a) b.deallocate(a, n);
      if (c) b.deallocate(c, n);
    }
  } free_device{*backend, largest};
  free_device.a = backend->allocate(largest);
  free_device.c = backend->allocate(largest);
  void* zd_up = free_device.a;
  void* zd_down = free_device.c;

  for (const std::uint64_t n : sizes) {
    const int copies = static_cast<int>(std::max<std::uint64_t>(3, o.bytes_per_point / n));
    const double b = static_cast<double>(n);
    const auto add = [&](const char* path, const char* mem, const char* dir, double gbps) {
      res.rows.push_back({path, mem, dir, n, gbps});
    };
    const auto sync_up = [&] { cuda_check(cudaStreamSynchronize(st.up), "cudaStreamSynchronize"); };
    const auto sync_down = [&] { cuda_check(cudaStreamSynchronize(st.down), "cudaStreamSynchronize"); };
    const auto sync_both = [&] {
      sync_up();
      sync_down();
    };
    for (const bool pinned : {true, false}) {
      const void* src_up = pinned ? h_up.p : static_cast<const void*>(p_up.data());
      void* dst_down = pinned ? h_down.p : static_cast<void*>(p_down.data());
      const char* mem = pinned ? "pinned" : "pageable";
      const auto up = [&] { cuda_check(cudaMemcpyAsync(d_up.p, src_up, n, cudaMemcpyHostToDevice, st.up), "cudaMemcpyAsync H2D"); };
      const auto down = [&] {
        cuda_check(cudaMemcpyAsync(dst_down, d_down.p, n, cudaMemcpyDeviceToHost, st.down), "cudaMemcpyAsync D2H");
      };
      add("cuda", mem, "h2d", best_gbps(o.repeat, copies, b, up, sync_up));
      add("cuda", mem, "d2h", best_gbps(o.repeat, copies, b, down, sync_down));
      add("cuda", mem, "both", best_gbps(o.repeat, copies, 2 * b, [&] { up(); down(); }, sync_both));
    }
    const auto zup = [&] { backend->copy_to_device_async(zd_up, z_up.data(), n, Stream::kHostToDevice); };
    const auto zdown = [&] { backend->copy_to_host_async(z_down.data(), zd_down, n, Stream::kDeviceToHost); };
    const auto zsync = [&] { backend->synchronize(); };
    add("zinf", "pinned", "h2d", best_gbps(o.repeat, copies, b, zup, zsync));
    add("zinf", "pinned", "d2h", best_gbps(o.repeat, copies, b, zdown, zsync));
    add("zinf", "pinned", "both", best_gbps(o.repeat, copies, 2 * b, [&] { zup(); zdown(); }, zsync));
  }
  return res;
}

GemmResult bench_gemm(int device, std::vector<GemmRow> shapes, int repeat) {
  GemmResult res;
  res.gpu = gpu_name(device);
  cuda_check(cudaSetDevice(device), "cudaSetDevice");
  if (shapes.empty()) {
    shapes = {{4096, 4096, 4096, 0},  {8192, 8192, 8192, 0},  {16384, 16384, 16384, 0},
              {8192, 6144, 4096, 0},  {8192, 28672, 4096, 0}, {8192, 4096, 14336, 0}};
  }
  std::size_t max_a = 0, max_b = 0, max_c = 0;
  for (const auto& s : shapes) {
    if (s.m <= 0 || s.n <= 0 || s.k <= 0) throw Error("GEMM shape {}x{}x{}: every size must be positive", s.m, s.n, s.k);
    max_a = std::max<std::size_t>(max_a, static_cast<std::size_t>(s.m * s.k));
    max_b = std::max<std::size_t>(max_b, static_cast<std::size_t>(s.k * s.n));
    max_c = std::max<std::size_t>(max_c, static_cast<std::size_t>(s.m * s.n));
  }
  DevBuf a(max_a * 2), b(max_b * 2), c(max_c * 2);
  // Small non-zero values: the tensor cores' speed does not depend on them, but zeros could.
  cuda_check(cudaMemset(a.p, 0x3c, max_a * 2), "cudaMemset");
  cuda_check(cudaMemset(b.p, 0x3c, max_b * 2), "cudaMemset");
  const std::size_t ws_bytes = 64u << 20;
  DevBuf ws(ws_bytes);
  cublasLtHandle_t lt = nullptr;
  cuda_check(cublasLtCreate(&lt), "cublasLtCreate");
  std::unique_ptr<cublasLtContext, decltype(&cublasLtDestroy)> lt_guard(lt, &cublasLtDestroy);
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  std::unique_ptr<CUstream_st, decltype(&cudaStreamDestroy)> stream_guard(stream, &cudaStreamDestroy);
  for (auto s : shapes) {
    // Column-major C (m x n) = A (m x k) B (k x n).
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    struct Guard {
      cublasLtMatmulDesc_t& op;
      cublasLtMatrixLayout_t &la, &lb, &lc;
      cublasLtMatmulPreference_t& pref;
      ~Guard() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (la) cublasLtMatrixLayoutDestroy(la);
        if (lb) cublasLtMatrixLayoutDestroy(lb);
        if (lc) cublasLtMatrixLayoutDestroy(lc);
        if (op) cublasLtMatmulDescDestroy(op);
      }
    } guard{op, la, lb, lc, pref};
    cuda_check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
    cuda_check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.m, s.k, s.m), "layout");
    cuda_check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.k, s.n, s.k), "layout");
    cuda_check(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, s.m, s.n, s.m), "layout");
    cuda_check(cublasLtMatmulPreferenceCreate(&pref), "preference");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)),
          "preference");
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    cuda_check(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &heur, &found), "heuristic");
    if (found == 0) throw Error("cuBLASLt has no bf16 algorithm for {}x{}x{}", s.m, s.n, s.k);
    const float alpha = 1.0f, beta = 0.0f;
    const auto run = [&] {
      cuda_check(cublasLtMatmul(lt, op, &alpha, a.p, la, b.p, lb, &beta, c.p, lc, c.p, lc, &heur.algo, ws.p, ws_bytes, stream),
            "matmul");
    };
    run();
    cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k);
    const int iters = static_cast<int>(std::clamp(2e13 / flops, 3.0, 200.0));  // about 20 TFLOP per timing
    double best = 0;
    for (int r = 0; r < repeat; ++r) {
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) run();
      cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
      best = std::max(best, flops * iters / sec / 1e12);
    }
    s.tflops = best;
    res.rows.push_back(s);
    res.peak_tflops = std::max(res.peak_tflops, best);
  }
  return res;
}

}  // namespace zinf::runtime
