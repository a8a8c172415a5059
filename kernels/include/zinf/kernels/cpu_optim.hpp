#pragma once
// CPU optimizers for the host step of ZeRO offload: Adam/AdamW, Adagrad and Lion with PyTorch's
// semantics and state names, fused with what the host step needs around them:
//   read the gradient (fp32, bf16 or fp16) -> multiply by the unscale x clip coefficient ->
//   update the fp32 master parameter and the optimizer state (fp32, or bf16 to halve its bytes) ->
//   write the updated parameter as bf16/fp16 into the buffer that goes to the GPU,
// in one pass over memory. grad_stats() is the other pass: the sum of squares of a gradient shard
// (for clipping) and whether it holds inf/NaN (fp16 overflow), cheap enough to run as gradients
// arrive.
//
// Every kernel exists for AVX-512, AVX2+FMA+F16C and scalar code; one dispatcher picks the best
// the CPU has (or ZINF_CPU_ISA=scalar|avx2|avx512). The three agree bit for bit: the scalar code
// performs the same operations in the same order (with fused multiply-adds where the vector code
// uses them). One exception: on CPUs with AVX512-BF16, bf16 results use vcvtneps2bf16, which
// turns fp32 subnormals (|x| < 2^-126) into zero where the other paths round them; Exec::native_bf16
// = false gives the exact path everywhere. The parallel entry points split the range into fixed chunks over a oneTBB task arena
// whose size the caller chooses, so results never depend on the thread count.

#include <oneapi/tbb/task_arena.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "zinf/kernels/adam_scalars.hpp"

namespace zinf::kernels::cpu {

enum class Isa : std::uint8_t { kScalar, kAvx2, kAvx512 };
enum class DType : std::uint8_t { kF32, kBF16, kF16 };

const char* isa_name(Isa isa);
const char* dtype_name(DType dtype);
std::size_t dtype_bytes(DType dtype);
// Whether this CPU (and OS) can run `isa`.
bool isa_supported(Isa isa);
// The ISA the dispatcher uses: ZINF_CPU_ISA when set (zinf::Error if it names an unknown ISA or
// one this CPU lacks), else the best supported.
Isa active_isa();
// "scalar", "avx2", "avx512" -> Isa; throws zinf::Error listing the choices.
Isa parse_isa(const std::string& name);

// ---------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam / AdamW, and DeepSpeed's cpu_adam options).

// Hyperparameters are doubles, as Python floats are: 1 - beta2 and the bias corrections are
// formed in double and rounded to float once, exactly as PyTorch does (rounding beta2 = 0.999 to
// float first would shift 1 - beta2 by 1.3e-5 relative).
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adam_w_mode = true;       // decoupled weight decay (AdamW); false = L2 added to the gradient
  bool bias_correction = true;
  std::int64_t step = 1;         // the step being taken, 1-based (PyTorch's state['step'] after += 1)
  float grad_scale = 1.0f;       // gradients are multiplied by this first (1/loss_scale x clip coef)
};

// The float scalars of one Adam step (adam_scalars.hpp), formed from the config.
// Throws zinf::Error for step < 1.
AdamScalars adam_scalars(const AdamConfig& config);

// One contiguous shard; each pointer holds n elements of its dtype. Pointers may alias nothing,
// with one exception: param_out may be grad itself when both are 16-bit of the same width (each
// element is read before it is written; the trainer lands bf16 gradients in the parameter shard).
struct AdamTensors {
  float* param = nullptr;             // (n) fp32 master weights, updated in place
  const void* grad = nullptr;         // (n) grad_dtype
  DType grad_dtype = DType::kF32;
  void* exp_avg = nullptr;            // (n) state_dtype
  void* exp_avg_sq = nullptr;         // (n) state_dtype
  DType state_dtype = DType::kF32;    // kF32 or kBF16
  void* param_out = nullptr;          // (n) out_dtype, or null: the updated parameter for the GPU
  DType out_dtype = DType::kBF16;     // kBF16 or kF16 (kF32 copies)
  std::size_t n = 0;
};

// ---------------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad: lr_decay, weight_decay as L2, initial accumulator in `sum`).

struct AdagradConfig {
  double lr = 1e-2;
  double lr_decay = 0.0;
  double eps = 1e-10;
  double weight_decay = 0.0;
  std::int64_t step = 1;
  float grad_scale = 1.0f;
};

struct AdagradTensors {
  float* param = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::kF32;
  void* sum = nullptr;  // state_dtype
  DType state_dtype = DType::kF32;
  void* param_out = nullptr;
  DType out_dtype = DType::kBF16;
  std::size_t n = 0;
};

// ---------------------------------------------------------------------------------------------
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; DeepSpeed's Lion):
//   p *= 1 - lr*wd;  p -= lr * sign(beta1*m + (1-beta1)*g);  m = beta2*m + (1-beta2)*g

struct LionConfig {
  double lr = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double weight_decay = 0.0;
  float grad_scale = 1.0f;
};

struct LionTensors {
  float* param = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::kF32;
  void* exp_avg = nullptr;
  DType state_dtype = DType::kF32;
  void* param_out = nullptr;
  DType out_dtype = DType::kBF16;
  std::size_t n = 0;
};

// ---------------------------------------------------------------------------------------------

struct GradStats {
  double sum_sq = 0.0;           // sum of squares of the (unscaled) gradient, accumulated in fp64
  std::size_t nonfinite = 0;     // count of inf/NaN elements
};

// Execution: the ISA (default: active_isa()) and, for the parallel forms, the arena and chunk.
struct Exec {
  Isa isa;
  tbb::task_arena* arena = nullptr;  // null = the calling thread only
  std::size_t chunk = 1u << 16;      // elements per task (256 KiB of fp32 per stream)
  bool native_bf16 = true;           // AVX512-BF16 conversions where the CPU has them (false: emulate)
  Exec();
  explicit Exec(Isa i, tbb::task_arena* a = nullptr) : isa(i), arena(a) {}
};

// Throw zinf::Error for an unsupported dtype combination, a null pointer with n > 0, or a
// forced ISA this CPU lacks.
void adam_step(const AdamConfig& config, const AdamTensors& t, const Exec& exec = Exec());
void adagrad_step(const AdagradConfig& config, const AdagradTensors& t, const Exec& exec = Exec());
void lion_step(const LionConfig& config, const LionTensors& t, const Exec& exec = Exec());
GradStats grad_stats(const void* grad, DType dtype, std::size_t n, const Exec& exec = Exec());

// Converts n fp32 values to bf16/fp16 (round to nearest even) or back; the same code the kernels use.
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n, const Exec& exec = Exec());

// STREAM's triad a = b + s * c (n floats), with the kernels' vector code and chunking: the
// bandwidth reference of `zinf bench adam`. Copy is convert(f32 -> f32).
void stream_triad(float* a, const float* b, const float* c, float s, std::size_t n, const Exec& exec = Exec());

}  // namespace zinf::kernels::cpu
