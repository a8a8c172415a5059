// The CUDA backend (backend.hpp): kernels/cuda for the element-wise ops, attention and the loss;
// cuBLASLt for every matrix product. Everything runs on the compute stream, in order; scratch
// buffers grow to the largest request and are reused.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/cuda_check.hpp"
#include "zinf/common/error.hpp"
#include "zinf/kernels/cuda_ops.hpp"
#include "zinf/runtime/backend.hpp"

namespace zinf::runtime {
namespace {

namespace kc = kernels::cuda;


// Every byte the backend allocates on the GPU, against the optional limit (--gpu-memory-limit).
class MemoryBudget {
 public:
  explicit MemoryBudget(std::size_t limit) : limit_(limit) {}
  void take(std::size_t bytes, const char* what) {
    std::lock_guard lock(mu_);
    if (limit_ > 0 && used_ + bytes > limit_) {
      throw Error("GPU memory limit: {} needs {:.1f} MiB, but zinf already holds {:.2f} of its {:.2f} GiB "
                  "(--gpu-memory-limit): lower the micro-batch or the sequence length, or "
                  "stage3_max_live_parameters, or raise the limit",
                  what, bytes / 1048576.0, used_ / 1073741824.0, limit_ / 1073741824.0);
    }
    used_ += bytes;
    peak_ = std::max(peak_, used_);
  }
  void give(std::size_t bytes) noexcept {
    std::lock_guard lock(mu_);
    used_ -= std::min(bytes, used_);
  }
  std::size_t used() const {
    std::lock_guard lock(mu_);
    return used_;
  }
  std::size_t peak() const {
    std::lock_guard lock(mu_);
    return peak_;
  }
  std::size_t limit() const { return limit_; }

 private:
  mutable std::mutex mu_;
  std::size_t limit_ = 0, used_ = 0, peak_ = 0;
};

// Device memory that grows to the largest request (contents are not kept across growth). Before
// the old buffer is freed the stream that uses it is drained, so no queued work reads freed memory.
class DeviceScratch {
 public:
  DeviceScratch() = default;
  void bind(int device, cudaStream_t stream, MemoryBudget* budget) {
    device_ = device;
    stream_ = stream;
    budget_ = budget;
  }
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (p_ != nullptr) cudaFree(p_);
  }
  void* get(std::size_t bytes) {
    if (bytes > bytes_) {
      cuda_check(cudaSetDevice(device_), "cudaSetDevice");
      if (p_ != nullptr) {
        cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        cudaFree(p_);
        budget_->give(bytes_);
      }
      p_ = nullptr;
      bytes_ = 0;
      budget_->take(bytes, "scratch");
      const cudaError_t e = cudaMalloc(&p_, bytes);
      if (e != cudaSuccess) {
        cudaGetLastError();
        budget_->give(bytes);
        throw Error("CUDA backend: out of GPU memory allocating {:.1f} MiB of scratch", bytes / 1048576.0);
      }
      bytes_ = bytes;
    }
    return p_;
  }
  float* f32(std::int64_t count) { return static_cast<float*>(get(static_cast<std::size_t>(count) * sizeof(float))); }

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  MemoryBudget* budget_ = nullptr;
};

class CudaEvent final : public Backend::Event {
 public:
  // Blocking sync: a host thread waiting on the event sleeps instead of spinning a core.
  CudaEvent() { cuda_check(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming | cudaEventBlockingSync), "cudaEventCreate"); }
  void synchronize() const override { cuda_check(cudaEventSynchronize(e_), "cudaEventSynchronize"); }
  bool ready() const override {
    const cudaError_t e = cudaEventQuery(e_);
    if (e == cudaErrorNotReady) return false;
    cuda_check(e, "cudaEventQuery");
    return true;
  }
  ~CudaEvent() override { cudaEventDestroy(e_); }
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_{};
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& o) : o_(o), budget_(o.memory_limit) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw Error("CUDA backend: no usable GPU ({}); check the driver and CUDA_VISIBLE_DEVICES",
                  e != cudaSuccess ? cudaGetErrorString(e) : "none visible");
    }
    if (o.device < 0 || o.device >= count) throw Error("CUDA backend: GPU {} does not exist ({} visible)", o.device, count);
    cuda_check(cudaSetDevice(o.device), "cudaSetDevice");
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, o.device), "cudaGetDeviceProperties");
    device_name_ = prop.name;
    for (cudaStream_t& s : streams_) cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cublasLtCreate(&lt_), "cublasLtCreate");
    workspace_bytes_ = kernels::cuda_scratch::kWorkspaceBytes;
    budget_.take(workspace_bytes_, "the cuBLASLt workspace");
    cuda_check(cudaMalloc(&workspace_, workspace_bytes_), "cudaMalloc (cuBLASLt workspace)");
    for (DeviceScratch* d : {&bf16_[0], &bf16_[1], &partial_, &attn_, &ce_, &logits_, &sq_}) d->bind(o.device, compute(), &budget_);
  }
  ~CudaBackend() override {
    cudaSetDevice(o_.device);
    cudaDeviceSynchronize();
    for (auto& [key, plan] : plans_) plan.destroy();
    if (workspace_ != nullptr) cudaFree(workspace_);
    if (lt_ != nullptr) cublasLtDestroy(lt_);
    for (cudaStream_t s : streams_) cudaStreamDestroy(s);
  }

  std::string name() const override { return "cuda"; }
  void profile_fence() override { cuda_check(cudaStreamSynchronize(compute()), "cudaStreamSynchronize"); }
  std::string describe() const override {
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    return fmt::format("cuda: GPU {} ({}), CUDA runtime {}.{}, cuBLASLt {}", o_.device, device_name_, rt / 1000,
                       (rt % 1000) / 10, cublasLtGetVersion());
  }

  void* allocate(std::size_t bytes) override {
    current();
    void* p = nullptr;
    budget_.take(bytes, "a buffer");
    const cudaError_t e = cudaMalloc(&p, std::max<std::size_t>(bytes, 1));
    if (e != cudaSuccess) {
      cudaGetLastError();
      budget_.give(bytes);
      std::size_t free_b = 0, total = 0;
      cudaMemGetInfo(&free_b, &total);
      throw Error("CUDA backend: out of GPU memory allocating {:.1f} MiB ({:.1f} of {:.1f} GiB free)", bytes / 1048576.0,
                  free_b / 1073741824.0, total / 1073741824.0);
    }
    return p;
  }
  // Queued work on the compute stream may still read the buffer: drain it first.
  void deallocate(void* p, std::size_t bytes) noexcept override {
    cudaSetDevice(o_.device);
    cudaStreamSynchronize(compute());
    cudaFree(p);
    budget_.give(bytes);
  }
  std::size_t memory_in_use() const override { return budget_.used(); }
  std::size_t memory_peak() const override { return budget_.peak(); }
  std::size_t memory_limit() const override { return budget_.limit(); }
  // The scratch members' largest requests for a step of shape s (see the ops below).
  std::size_t scratch_bound(const StepShape& s) const override {
    return kernels::cuda_scratch::step_scratch_bytes(s, workspace_bytes_, o_.head_chunk_bytes);
  }
  void upload(void* dst, const void* src, std::size_t bytes) override {
    if (bytes == 0) return;
    current();
    copy(dst, src, bytes, cudaMemcpyHostToDevice, "upload");
  }
  void download(void* dst, const void* src, std::size_t bytes) override {
    if (bytes == 0) return;
    current();
    copy(dst, src, bytes, cudaMemcpyDeviceToHost, "download");
  }
  void fill_zero(void* dst, std::size_t bytes) override {
    if (bytes == 0) return;
    current();
    cuda_check(cudaMemsetAsync(dst, 0, bytes, compute()), "memset");
  }
  void copy_to_device_async(void* dst, const void* src, std::size_t bytes, Stream stream) override {
    if (bytes == 0) return;
    current();
    copy_async(dst, src, bytes, cudaMemcpyHostToDevice, streams_[static_cast<int>(stream)], "upload");
  }
  void copy_to_host_async(void* dst, const void* src, std::size_t bytes, Stream stream) override {
    if (bytes == 0) return;
    current();
    copy_async(dst, src, bytes, cudaMemcpyDeviceToHost, streams_[static_cast<int>(stream)], "download");
  }
  void sum_squares(double* out, const void* x, std::int64_t count, DType dtype) override {
    OpTimer t(*this, "sum_squares");
    kc::sum_squares(out, static_cast<double*>(sq_.get(kc::sum_squares_partial_doubles() * sizeof(double))), x,
                    dtype == DType::kBF16, count, compute());
  }
  void adam_step(const kernels::cpu::AdamConfig& config, const kernels::cpu::AdamTensors& t) override {
    if (t.n == 0) return;
    if (t.state_dtype != DType::kF32 || (t.grad_dtype != DType::kF32 && t.grad_dtype != DType::kBF16) ||
        (t.param_out != nullptr && t.out_dtype != DType::kF32 && t.out_dtype != DType::kBF16)) {
      throw Error("CUDA adam_step: state {}, gradient {}, parameters out {}: the GPU step takes fp32 state, fp32 or bf16 "
                  "gradients and bf16 or fp32 parameters",
                  kernels::cpu::dtype_name(t.state_dtype), kernels::cpu::dtype_name(t.grad_dtype),
                  kernels::cpu::dtype_name(t.out_dtype));
    }
    if (t.param == nullptr || t.grad == nullptr || t.exp_avg == nullptr || t.exp_avg_sq == nullptr) {
      throw Error("CUDA adam_step: a null parameter, gradient or moment pointer for {} elements", t.n);
    }
    OpTimer timer(*this, "adam_step");
    current();
    kc::adam_step(kernels::cpu::adam_scalars(config), t.param, static_cast<float*>(t.exp_avg), static_cast<float*>(t.exp_avg_sq),
                  t.grad, t.grad_dtype == DType::kBF16, t.param_out, t.out_dtype == DType::kBF16,
                  static_cast<std::int64_t>(t.n), compute());
  }
  void round_to_bf16(std::uint16_t* dst, const float* src, std::int64_t count) override {
    OpTimer t(*this, "round_to_bf16");
    kc::to_bf16(dst, src, count, compute());
  }

  std::unique_ptr<Event> record(Stream stream) override {
    current();
    auto e = std::make_unique<CudaEvent>();
    cuda_check(cudaEventRecord(e->get(), streams_[static_cast<int>(stream)]), "cudaEventRecord");
    return e;
  }
  void wait(Stream stream, const Event& event) override {
    current();
    cuda_check(cudaStreamWaitEvent(streams_[static_cast<int>(stream)], static_cast<const CudaEvent&>(event).get(), 0),
          "cudaStreamWaitEvent");
  }
  void synchronize() override {
    current();
    for (cudaStream_t s : streams_) cuda_check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  }

  void embedding_forward(float* out, Weight table, const std::int32_t* tokens, std::int64_t n, std::int64_t h) override {
    OpTimer t(*this, "embedding");
    kc::embedding_forward(out, table.data, bf16(table), tokens, n, h, compute());
  }
  void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n,
                          std::int64_t h) override {
    OpTimer t(*this, "embedding.backward");
    kc::embedding_backward(dtable, dout, tokens, n, h, compute());
  }
  void rmsnorm_forward(float* y, float* rstd, const float* x, Weight w, std::int64_t n, std::int64_t h, float eps) override {
    OpTimer t(*this, "rmsnorm");
    kc::rmsnorm_forward(y, rstd, x, w.data, bf16(w), n, h, eps, compute());
  }
  void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, Weight w, const float* rstd,
                        std::int64_t n, std::int64_t h) override {
    OpTimer t(*this, "rmsnorm.backward");
    kc::rmsnorm_backward(dx, dw, partial_.f32(kc::rmsnorm_partial_floats(n, h)), dy, x, w.data, bf16(w), rstd, n, h,
                         compute());
  }

  void linear_forward(float* y, const float* x, Weight w, Weight bias, std::int64_t n, std::int64_t in,
                      std::int64_t out) override {
    OpTimer t(*this, "linear", 2.0 * n * in * out);
    const void* a = operand(x, n * in, w, 0);
    gemm(n, out, in, a, in, false, w.data, in, true, y, out, bf16(w), 1.0f, 0.0f);
    if (bias) kc::bias_add(y, bias.data, bf16(bias), n, out, compute());
  }
  void linear_backward(float* dx, float* dw, float* dbias, const float* dy, const float* x, Weight w, std::int64_t n,
                       std::int64_t in, std::int64_t out) override {
    OpTimer t(*this, "linear.backward", 4.0 * n * in * out);
    const void* dy_op = operand(dy, n * out, w, 0);
    gemm(n, in, out, dy_op, out, false, w.data, in, false, dx, in, bf16(w), 1.0f, 0.0f);
    if (dw != nullptr) gemm(out, in, n, dy_op, out, true, operand(x, n * in, w, 1), in, false, dw, in, bf16(w), 1.0f, 1.0f);
    if (dbias != nullptr) kc::column_sums_add(dbias, partial_.f32(kc::rmsnorm_partial_floats(n, out)), dy, n, out, compute());
  }

  void rope_forward(float* x, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq, std::int64_t heads,
                    std::int64_t hd, const float* cos, const float* sin) override {
    OpTimer t(*this, "rope");
    kc::rope(x + col0, ld, n, seq, heads, hd, cos, sin, false, compute());
  }
  void rope_backward(float* dx, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq,
                     std::int64_t heads, std::int64_t hd, const float* cos, const float* sin) override {
    OpTimer t(*this, "rope.backward");
    kc::rope(dx + col0, ld, n, seq, heads, hd, cos, sin, true, compute());
  }

  void attention_forward(float* out, float* lse, const float* qkv, const AttentionShape& s) override {
    OpTimer t(*this, "attention", 4.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim);
    const kc::AttentionDims d = dims(s);
    kc::attention_forward(out, lse, attn_.f32(kc::attention_scratch_floats(d)), qkv, d, compute());
  }
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                          const AttentionShape& s) override {
    OpTimer t(*this, "attention.backward", 10.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim);
    const kc::AttentionDims d = dims(s);
    kc::attention_backward(dqkv, attn_.f32(kc::attention_scratch_floats(d)), dout, qkv, out, lse, d, compute());
  }

  void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i) override {
    OpTimer t(*this, "swiglu");
    kc::swiglu_forward(out, gu, n, i, compute());
  }
  void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i) override {
    OpTimer t(*this, "swiglu.backward");
    kc::swiglu_backward(dgu, dout, gu, n, i, compute());
  }
  void matmul(const Matmul& m) override {
    OpTimer t(*this, "matmul", 2.0 * m.m * m.n * m.k);
    current();
    gemm(m.m, m.n, m.k, m.a, m.lda, m.trans_a, m.b, m.ldb, m.trans_b, m.c, m.ldc, false, m.alpha,
         m.accumulate ? 1.0f : 0.0f);
  }
  void dropout(float* y, const float* x, std::int64_t count, float p, std::uint64_t seed, bool accumulate) override {
    OpTimer t(*this, "dropout");
    kc::dropout(y, x, count, p, seed, accumulate, compute());
  }
  void add(float* y, const float* x, std::int64_t count) override {
    OpTimer t(*this, "residual");
    kc::add(y, x, count, compute());
  }

  void head_loss_forward(float* lse, float* loss, const float* h, Weight w, const std::int32_t* targets, std::int64_t n,
                         std::int64_t hidden, std::int64_t vocab) override {
    OpTimer t(*this, "head+loss", 2.0 * n * hidden * vocab);
    const std::int64_t vc = vocab_chunk(n, vocab);
    float* ce = ce_.f32(3 * n);
    float *m = ce, *s = ce + n, *tl = ce + 2 * n;
    float* logits = logits_.f32(n * vc);
    const void* a = operand(h, n * hidden, w, 0);
    kc::ce_init(m, s, tl, n, compute());
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const std::int64_t c = std::min(vc, vocab - v0);
      gemm(n, c, hidden, a, hidden, false, row(w, v0, hidden), hidden, true, logits, c, bf16(w), 1.0f, 0.0f);
      kc::ce_chunk_forward(m, s, tl, logits, targets, n, v0, c, compute());
    }
    kc::ce_finish(lse, loss, m, s, tl, targets, n, compute());
  }
  void head_loss_backward(float* dh, float* dw, const float* h, Weight w, const std::int32_t* targets, const float* lse,
                          float scale, std::int64_t n, std::int64_t hidden, std::int64_t vocab) override {
    OpTimer t(*this, "head+loss.backward", 6.0 * n * hidden * vocab);
    const std::int64_t vc = vocab_chunk(n, vocab);
    float* logits = logits_.f32(n * vc);
    const void* a = operand(h, n * hidden, w, 0);
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const std::int64_t c = std::min(vc, vocab - v0);
      gemm(n, c, hidden, a, hidden, false, row(w, v0, hidden), hidden, true, logits, c, bf16(w), 1.0f, 0.0f);
      kc::ce_chunk_backward(logits, lse, targets, scale, n, v0, c, compute());
      const void* dl = operand(logits, n * c, w, 1);
      // dh (n, hidden) (+)= dlogits (n, c) W_c (c, hidden)
      gemm(n, hidden, c, dl, c, false, row(w, v0, hidden), hidden, false, dh, hidden, bf16(w), 1.0f, v0 > 0 ? 1.0f : 0.0f);
      // dW_c (c, hidden) += dlogits^T (c, n) h (n, hidden) (none for a frozen head)
      if (dw != nullptr) gemm(c, hidden, n, dl, c, true, a, hidden, false, dw + v0 * hidden, hidden, bf16(w), 1.0f, 1.0f);
    }
  }
  void head_logits(float* logits, const float* h, Weight w, std::int64_t n, std::int64_t hidden,
                   std::int64_t vocab) override {
    OpTimer t(*this, "head.logits", 2.0 * n * hidden * vocab);
    gemm(n, vocab, hidden, operand(h, n * hidden, w, 0), hidden, false, w.data, hidden, true, logits, vocab, bf16(w),
         1.0f, 0.0f);
  }

 private:
  // A cached cuBLASLt plan for one shape.
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    void destroy() {
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
      if (op) cublasLtMatmulDescDestroy(op);
    }
  };
  using PlanKey = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, bool,
                             bool, bool, bool, std::uint32_t, std::uint32_t, std::uint32_t>;
  // The largest power of two (at most 256) that divides the address: cuBLASLt picks kernels that
  // rely on their operands' alignment, so plans are kept per alignment.
  static std::uint32_t alignment(const void* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    std::uint32_t al = 256;
    while (al > 1 && a % al != 0) al /= 2;
    return al;
  }

  // Every op goes through here: the GPU is selected for the calling thread first.
  cudaStream_t compute() const {
    current();
    return streams_[static_cast<int>(Stream::kCompute)];
  }
  // The CUDA runtime's device is per thread: a call from another thread (the stage-3 prefetcher)
  // selects this backend's GPU first.
  void current() const {
    int d = -1;
    if (cudaGetDevice(&d) != cudaSuccess || d != o_.device) cuda_check(cudaSetDevice(o_.device), "cudaSetDevice");
  }
  static void copy_async(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream,
                         const char* what) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, stream);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error("CUDA: {} of {} bytes ({} -> {}) failed: {} ({})", what, bytes, src, dst, cudaGetErrorName(e),
                  cudaGetErrorString(e));
    }
  }
  void copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, const char* what) {
    copy_async(dst, src, bytes, kind, compute(), what);
    cuda_check(cudaStreamSynchronize(compute()), what);
  }
  static bool bf16(Weight w) { return w.dtype == DType::kBF16; }
  static const void* row(Weight w, std::int64_t r, std::int64_t cols) {
    return static_cast<const char*>(w.data) + static_cast<std::size_t>(r * cols) * (bf16(w) ? 2 : 4);
  }
  static kc::AttentionDims dims(const AttentionShape& s) {
    return {s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, s.scale, s.bf16_products};
  }
  std::int64_t vocab_chunk(std::int64_t n, std::int64_t vocab) const {
    return kernels::cuda_scratch::vocab_chunk(n, vocab, o_.head_chunk_bytes);
  }
  // x, or x rounded to bf16 into slot `slot`, for a product with weights w.
  const void* operand(const float* x, std::int64_t count, Weight w, int slot) {
    if (!bf16(w)) return x;
    auto* dst = static_cast<std::uint16_t*>(bf16_[slot].get(static_cast<std::size_t>(count) * 2));
    kc::to_bf16(dst, x, count, compute());
    return dst;
  }

  // Row-major C (m, n) = alpha op(A) op(B) + beta C, A (m, k) or (k, m) if trans_a, B (k, n) or
  // (n, k) if trans_b; A and B bf16 or fp32 (ab_bf16), C fp32, fp32 accumulation. As cuBLASLt is
  // column-major, this is C^T = op(B)^T op(A)^T.
  void gemm(std::int64_t m, std::int64_t n, std::int64_t k, const void* a, std::int64_t lda, bool trans_a, const void* b,
            std::int64_t ldb, bool trans_b, float* c, std::int64_t ldc, bool ab_bf16, float alpha, float beta) {
    if (m == 0 || n == 0) return;
    // First cuBLASLt operand = B, second = A (column-major), output C.
    const std::uint32_t al_first = alignment(b), al_second = alignment(a), al_c = alignment(c);
    const PlanKey key{m, n, k, lda, ldb, ldc, trans_a, trans_b, ab_bf16, beta != 0.0f, al_first, al_second, al_c};
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      it = plans_.emplace(key, make_plan(m, n, k, lda, trans_a, ldb, trans_b, ldc, ab_bf16, al_first, al_second, al_c)).first;
    }
    const Plan& p = it->second;
    cuda_check(cublasLtMatmul(lt_, p.op, &alpha, b, p.a, a, p.b, &beta, c, p.c, c, p.c, &p.algo, workspace_, workspace_bytes_,
                         compute()),
          "matmul");
  }
  Plan make_plan(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda, bool trans_a, std::int64_t ldb,
                 bool trans_b, std::int64_t ldc, bool ab_bf16, std::uint32_t al_a, std::uint32_t al_b, std::uint32_t al_c) {
    Plan p;
    const cudaDataType_t ab = ab_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    // Column-major: M = n, N = m; first operand = B, second = A.
    const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cuda_check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
    cuda_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)), "transa");
    cuda_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)), "transb");
    // Stored shapes (column-major rows x cols): first operand (n x k) or (k x n); second (k x m) or (m x k).
    cuda_check(cublasLtMatrixLayoutCreate(&p.a, ab, trans_b ? k : n, trans_b ? n : k, ldb), "layout");
    cuda_check(cublasLtMatrixLayoutCreate(&p.b, ab, trans_a ? m : k, trans_a ? k : m, lda), "layout");
    cuda_check(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, n, m, ldc), "layout");
    cublasLtMatmulPreference_t pref = nullptr;
    cuda_check(cublasLtMatmulPreferenceCreate(&pref), "preference");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                               sizeof(workspace_bytes_)),
          "preference");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)), "alignment");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)), "alignment");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)), "alignment");
    cuda_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)), "alignment");
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      p.destroy();
      throw Error("cuBLASLt has no algorithm for a {} x {} x {} {} product (status {})", m, n, k, ab_bf16 ? "bf16" : "fp32",
                  static_cast<int>(st));
    }
    p.algo = result.algo;
    return p;
  }

  CudaBackendOptions o_;
  std::string device_name_;
  cudaStream_t streams_[4] = {};
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  std::map<PlanKey, Plan> plans_;
  MemoryBudget budget_;  // before the scratch: they give back to it
  DeviceScratch bf16_[2], partial_, attn_, ce_, logits_, sq_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

}  // namespace zinf::runtime
