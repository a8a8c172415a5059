#pragma once
// The compute backend: device memory, streams and events, and the ops of a Llama-family decoder,
// each with its forward and backward. The model (model.hpp) is written against this interface
// only; the CPU backend (oneDNN + plain C++) is the reference executor, the CUDA backend the fast
// one.
//
// Conventions for every op:
//  - pointers are device memory of this backend; activations and their gradients are fp32
//    row-major; weights are a Weight (pointer + fp32 or bf16). With bf16 weights, matrix products
//    round their activation operand to bf16 and accumulate in fp32 (mixed precision).
//  - n = rows (batch x sequence), shapes in the comments as (rows, columns).
//  - weight gradients are fp32 and accumulated (+=), so micro-batches and tied weights add up;
//    activation gradients are written unless the op says "added". A null weight gradient is a
//    frozen weight (LoRA's base): its product is skipped.
//  - ops run in order on the compute stream; a host pointer result (the loss) syncs.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "zinf/kernels/cpu_optim.hpp"  // DType
#include "zinf/kernels/cuda_scratch.hpp"

namespace zinf::runtime {

using kernels::cpu::DType;

struct Weight {
  const void* data = nullptr;  // null = absent (a bias the model does not have)
  DType dtype = DType::kF32;
  explicit operator bool() const { return data != nullptr; }
};

// Grouped-query causal attention over b sequences of t tokens. q, k and v sit side by side in each
// row of one (n, (heads + 2 kv_heads) * head_dim) tensor, as the fused projection writes them.
struct AttentionShape {
  std::int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0.0f;  // 1/sqrt(head_dim)
  // Mixed precision: a backend may run the products with bf16 operands and fp32 accumulation (the
  // CUDA backend's flash attention). The CPU backend computes attention in fp32 either way.
  bool bf16_products = false;
  std::int64_t rows() const { return batch * seq; }
  std::int64_t q_dim() const { return heads * head_dim; }
  std::int64_t qkv_dim() const { return (heads + 2 * kv_heads) * head_dim; }
};

enum class Stream { kCompute, kHostToDevice, kDeviceToHost, kCollective };

// The shape of one training step, for a backend's bound on the scratch its ops take.
using StepShape = kernels::cuda_scratch::StepShape;

// A general fp32 matrix product (LoRA's small products): C (m, n) = alpha * op(A) op(B), plus C
// when accumulate. Row-major with row strides: A is (m, k), or (k, m) when trans_a; B is (k, n),
// or (n, k) when trans_b; C's rows are ldc apart, so C may be a column block of a wider matrix.
struct Matmul {
  std::int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  std::int64_t lda = 0;
  bool trans_a = false;
  const float* b = nullptr;
  std::int64_t ldb = 0;
  bool trans_b = false;
  float* c = nullptr;
  std::int64_t ldc = 0;
  float alpha = 1.0f;
  bool accumulate = false;
};

// Where the time goes per op (filled while profiling is on).
struct OpProfile {
  struct Entry {
    std::int64_t calls = 0;
    double seconds = 0.0;
    double flops = 0.0;  // matrix products only
  };
  std::map<std::string, Entry> ops;
  void clear() { ops.clear(); }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;      // "cpu", "cuda"
  virtual std::string describe() const = 0;  // one line: threads, library versions, device

  // ---- memory (aligned to 4 KiB); allocate throws zinf::Error when the device is out of memory
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* p, std::size_t bytes) noexcept = 0;
  virtual void upload(void* dst, const void* host_src, std::size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, std::size_t bytes) = 0;
  virtual void fill_zero(void* dst, std::size_t bytes) = 0;
  // Asynchronous copies on `stream` (the copy engines' streams kHostToDevice / kDeviceToHost). They
  // overlap compute only from page-locked host memory; order them against other streams with
  // record/wait, and wait for them on the host with Event::synchronize. The CPU backend copies at
  // once.
  virtual void copy_to_device_async(void* dst, const void* host_src, std::size_t bytes, Stream stream) = 0;
  virtual void copy_to_host_async(void* host_dst, const void* src, std::size_t bytes, Stream stream) = 0;
  // out (one double, device memory) = sum of x[i]^2 over count elements (fp32, or bf16), on the
  // compute stream, in a fixed order (the same result run to run). Non-finite inputs give a
  // non-finite sum.
  virtual void sum_squares(double* out, const void* x, std::int64_t count, DType dtype = DType::kF32) = 0;
  // dst (count bf16) = src rounded to nearest even, on the compute stream.
  virtual void round_to_bf16(std::uint16_t* dst, const float* src, std::int64_t count) = 0;
  // One Adam/AdamW step over t.n elements of this backend's memory, on the compute stream, with the
  // CPU optimizer's arithmetic (kernels::cpu::adam_step: the fp32 state agrees bit for bit, and bf16
  // parameters are rounded as its exact path rounds them). t.state_dtype fp32; t.grad_dtype fp32 or
  // bf16; t.param_out null or t.out_dtype bf16 / fp32. Throws zinf::Error for other combinations.
  virtual void adam_step(const kernels::cpu::AdamConfig& config, const kernels::cpu::AdamTensors& t) = 0;

  // Device memory this backend holds now, the most it has held, and its limit (0: none); 0 for
  // host backends, whose memory is the host's.
  virtual std::size_t memory_in_use() const { return 0; }
  virtual std::size_t memory_peak() const { return 0; }
  virtual std::size_t memory_limit() const { return 0; }
  // An upper bound on the scratch the ops of one training step of this shape take inside the
  // backend (beyond the buffers callers allocate), fixed workspaces included; 0 for host backends.
  virtual std::size_t scratch_bound(const StepShape&) const { return 0; }

  // ---- streams and events (the CPU backend completes every op before returning: no-ops there)
  class Event {
   public:
    virtual ~Event() = default;
    // Blocks the calling thread (without spinning) until the work recorded before the event is done.
    virtual void synchronize() const {}
    // Whether that work is done, without waiting.
    virtual bool ready() const { return true; }
  };
  virtual std::unique_ptr<Event> record(Stream stream) = 0;
  virtual void wait(Stream stream, const Event& event) = 0;
  virtual void synchronize() = 0;

  // ---- ops
  // out (n, h) = table (v, h)[tokens]; dtable (v, h) += dout scattered by token.
  virtual void embedding_forward(float* out, Weight table, const std::int32_t* tokens, std::int64_t n,
                                 std::int64_t h) = 0;
  virtual void embedding_backward(float* dtable, const float* dout, const std::int32_t* tokens, std::int64_t n,
                                  std::int64_t h) = 0;

  // y (n, h) = x / rms(x) * w; rstd (n) saved for backward. Backward: dx (n, h) added.
  virtual void rmsnorm_forward(float* y, float* rstd, const float* x, Weight w, std::int64_t n, std::int64_t h,
                               float eps) = 0;
  virtual void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, Weight w, const float* rstd,
                                std::int64_t n, std::int64_t h) = 0;

  // y (n, out) = x (n, in) w^T (+ bias), w (out, in) as torch.nn.Linear stores it.
  virtual void linear_forward(float* y, const float* x, Weight w, Weight bias, std::int64_t n, std::int64_t in,
                              std::int64_t out) = 0;
  // dx (n, in) = dy w (written); dw (out, in) += dy^T x; dbias (out) += column sums of dy (when non-null).
  virtual void linear_backward(float* dx, float* dw, float* dbias, const float* dy, const float* x, Weight w,
                               std::int64_t n, std::int64_t in, std::int64_t out) = 0;

  // Rotary embedding in place on `heads` heads starting at column col0 of rows of stride ld; row i
  // is position i % seq. cos, sin: (seq, head_dim / 2). Backward rotates gradients back.
  virtual void rope_forward(float* x, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq,
                            std::int64_t heads, std::int64_t head_dim, const float* cos, const float* sin) = 0;
  virtual void rope_backward(float* dx, std::int64_t ld, std::int64_t col0, std::int64_t n, std::int64_t seq,
                             std::int64_t heads, std::int64_t head_dim, const float* cos, const float* sin) = 0;

  // out (n, heads*head_dim) = softmax(q k^T * scale, causal) v per head, kv head = head / (heads /
  // kv_heads); lse (batch, heads, seq) saved for backward. Backward writes dqkv (n, qkv_dim).
  virtual void attention_forward(float* out, float* lse, const float* qkv, const AttentionShape& s) = 0;
  virtual void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                                  const float* lse, const AttentionShape& s) = 0;

  // gu (n, 2i) = gate | up; out (n, i) = silu(gate) * up. Backward writes dgu (n, 2i).
  virtual void swiglu_forward(float* out, const float* gu, std::int64_t n, std::int64_t i) = 0;
  virtual void swiglu_backward(float* dgu, const float* dout, const float* gu, std::int64_t n, std::int64_t i) = 0;

  // y (count) += x (count)
  virtual void add(float* y, const float* x, std::int64_t count) = 0;

  // See Matmul (fp32 operands, fp32 accumulation, full fp32 products).
  virtual void matmul(const Matmul& g) = 0;
  // y (count) = x * keep / (1 - p) (+ y when accumulate), keep = kernels::dropout_keep(seed, i, p):
  // the same seed gives the same mask, so backward regenerates the forward's (0 <= p < 1).
  virtual void dropout(float* y, const float* x, std::int64_t count, float p, std::uint64_t seed, bool accumulate) = 0;

  // LM head fused with cross-entropy, in chunks over the vocabulary (the (n, vocab) logits never
  // exist whole). targets (n): a token id, or < 0 to ignore the row. Forward writes lse (n) and
  // loss (n) (0 for ignored rows). Backward: the gradient of sum_r scale * loss[r]; dh (n, h)
  // written, dw (vocab, h) added.
  virtual void head_loss_forward(float* lse, float* loss, const float* h, Weight w, const std::int32_t* targets,
                                 std::int64_t n, std::int64_t hidden, std::int64_t vocab) = 0;
  virtual void head_loss_backward(float* dh, float* dw, const float* h, Weight w, const std::int32_t* targets,
                                  const float* lse, float scale, std::int64_t n, std::int64_t hidden,
                                  std::int64_t vocab) = 0;
  // logits (n, vocab) = h w^T, whole (evaluation and tests).
  virtual void head_logits(float* logits, const float* h, Weight w, std::int64_t n, std::int64_t hidden,
                           std::int64_t vocab) = 0;

  // ---- profiling: per-op wall time while enabled (a GPU backend waits for each op to finish, so
  // the step runs slower while profiling)
  void set_profiling(bool on) { profiling_ = on; }
  bool profiling() const { return profiling_; }
  OpProfile& profile() { return profile_; }

 protected:
  // Times one op into the profile when profiling is on.
  class OpTimer {
   public:
    OpTimer(Backend& b, const char* op, double flops = 0.0) : b_(b), op_(op), flops_(flops) {
      if (!b_.profiling_) return;
      b_.profile_fence();
      start_ = std::chrono::steady_clock::now();
    }
    ~OpTimer() {
      if (!b_.profiling_) return;
      b_.profile_fence();
      auto& e = b_.profile_.ops[op_];
      e.calls += 1;
      e.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      e.flops += flops_;
    }
    OpTimer(const OpTimer&) = delete;
    OpTimer& operator=(const OpTimer&) = delete;

   private:
    Backend& b_;
    const char* op_;
    double flops_;
    std::chrono::steady_clock::time_point start_{};
  };
  // Waits for queued work (profiling only): a no-op where ops complete before returning.
  virtual void profile_fence() {}

 private:
  bool profiling_ = false;
  OpProfile profile_;
};

// Device memory of a backend, owned (RAII).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend& backend, std::size_t bytes)
      : backend_(&backend), data_(bytes ? backend.allocate(bytes) : nullptr), bytes_(bytes) {}
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : backend_(o.backend_), data_(o.data_), bytes_(o.bytes_) {
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      backend_ = o.backend_;
      data_ = o.data_;
      bytes_ = o.bytes_;
      o.data_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const noexcept { return data_; }
  float* f32() const noexcept { return static_cast<float*>(data_); }
  std::size_t bytes() const noexcept { return bytes_; }
  void reset() noexcept {
    if (data_ != nullptr) backend_->deallocate(data_, bytes_);
    data_ = nullptr;
    bytes_ = 0;
  }

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// The CPU backend. It uses every core the process may run on: oneTBB for its own kernels, oneDNN's
// OpenMP pool for matrix products (OMP_NUM_THREADS limits that one).
struct CpuBackendOptions {
  std::size_t attention_scratch_bytes = 64u << 20;  // score blocks per attention chunk
  std::size_t head_chunk_bytes = 64u << 20;         // logits per vocabulary chunk
};
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options = {});

// The CUDA backend on GPU `device`: kernels/cuda for the element-wise ops, attention and the loss,
// cuBLASLt for the matrix products (fp32 products in full fp32, bf16 ones with fp32 accumulation).
// Ops queue on the compute stream; upload, download and the loss sync. Throws zinf::Error when
// zinf was built without CUDA, or the GPU is missing or unusable, saying which.
struct CudaBackendOptions {
  int device = 0;
  std::size_t head_chunk_bytes = kernels::cuda_scratch::kHeadChunkBytes;  // logits per vocabulary chunk
  // Caps every allocation of this backend (--gpu-memory-limit; 0: none). Going past it is an error
  // naming what asked and how much is in use. The CUDA context itself is not counted.
  std::size_t memory_limit = 0;
};
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options = {});

}  // namespace zinf::runtime
