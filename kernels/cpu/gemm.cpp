// Batched GEMM through oneDNN's matmul (https://oneapi-src.github.io/oneDNN/dev_guide_matmul.html).
// Primitives are created once per shape, stride and dtype combination and cached: creating one
// costs far more than running a small product.
#include "zinf/kernels/cpu_gemm.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "zinf/common/error.hpp"

namespace zinf::kernels::cpu {
namespace {

using Dims = dnnl::memory::dims;
using Key = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, int, std::int64_t, std::int64_t, bool,
                       std::int64_t, std::int64_t, bool, std::int64_t, std::int64_t, float, bool>;

struct Primitive {
  dnnl::memory::desc a, b, c;
  dnnl::matmul matmul;
};

struct Context {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mutex;  // guards the cache; execution is serialised too (one caller at a time)
  std::map<Key, std::unique_ptr<Primitive>> cache;
  int native_bf16 = -1;  // -1: not yet probed
};

Context& context() {
  static Context ctx;
  return ctx;
}

dnnl::memory::desc view(std::int64_t batch, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                        std::int64_t stride, bool trans, dnnl::memory::data_type dt) {
  // Logical (batch, rows, cols); stored row-major as (rows, cols), or as (cols, rows) when trans.
  const Dims dims{batch, rows, cols};
  const Dims strides = trans ? Dims{stride, 1, ld} : Dims{stride, ld, 1};
  return dnnl::memory::desc(dims, dt, strides);
}

bool is_amx(const dnnl::matmul::primitive_desc& pd) {
  return std::string(pd.impl_info_str()).find("amx") != std::string::npos;
}

// ZINF_ONEDNN_AMX_TAILS=1 lets AMX run every shape again, to re-check a newer oneDNN.
bool amx_tails_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("ZINF_ONEDNN_AMX_TAILS");
    return v != nullptr && std::string(v) == "1";
  }();
  return allowed;
}

// Creates the primitive, or returns null when oneDNN has no implementation (bf16 on an old CPU).
std::unique_ptr<Primitive> create(const Gemm& g, DType dtype, Context& ctx) {
  const auto dt = dtype == DType::kBF16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  const std::int64_t sa = g.batch > 1 ? g.stride_a : g.m * g.k;
  const std::int64_t sb = g.batch > 1 ? g.stride_b : g.k * g.n;
  const std::int64_t sc = g.batch > 1 ? g.stride_c : g.m * g.n;
  const auto a_md = view(g.batch, g.m, g.k, g.lda, sa, g.trans_a, dt);
  const auto b_md = view(g.batch, g.k, g.n, g.ldb, sb, g.trans_b, dt);
  const auto c_md = view(g.batch, g.m, g.n, g.ldc, sc, false, dnnl::memory::data_type::f32);
  dnnl::primitive_attr attr;
  if (g.alpha != 1.0f) attr.set_output_scales(0, {g.alpha});
  if (g.accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  try {
    const dnnl::matmul::desc desc(a_md, b_md, c_md);
    dnnl::matmul::primitive_desc pd(desc, attr, ctx.engine);
    if (dtype == DType::kBF16 && g.n % 16 != 0 && !amx_tails_allowed()) {
      // oneDNN 2.6's AMX bf16 matmul writes wrong, run-to-run different values when N is not a
      // multiple of 16 (N = 50 fails, seen on a Sapphire Rapids host; CpuGemm.DenseModelShapes
      // covers it). Take the next implementation that does not use AMX; widen when none does.
      while (is_amx(pd)) {
        if (!pd.next_impl()) return nullptr;
      }
    }
    return std::make_unique<Primitive>(Primitive{a_md, b_md, c_md, dnnl::matmul(pd)});
  } catch (const dnnl::error& e) {
    if (e.status == dnnl_unimplemented) return nullptr;
    throw Error("oneDNN could not create a matmul ({}x{}x{}, batch {}, {}): {}", g.m, g.n, g.k, g.batch,
                dtype_name(dtype), e.what());
  }
}

Primitive* lookup(const Gemm& g, DType dtype, Context& ctx) {
  const Key key{g.batch, g.m, g.n, g.k, static_cast<int>(dtype), g.lda, g.batch > 1 ? g.stride_a : 0, g.trans_a,
                g.ldb, g.batch > 1 ? g.stride_b : 0, g.trans_b, g.ldc, g.batch > 1 ? g.stride_c : 0, g.alpha,
                g.accumulate};
  auto it = ctx.cache.find(key);
  if (it == ctx.cache.end()) it = ctx.cache.emplace(key, create(g, dtype, ctx)).first;
  return it->second.get();
}

void run(Primitive& prim, const Gemm& g, const void* a, const void* b, Context& ctx) {
  dnnl::memory a_mem(prim.a, ctx.engine, const_cast<void*>(a));
  dnnl::memory b_mem(prim.b, ctx.engine, const_cast<void*>(b));
  dnnl::memory c_mem(prim.c, ctx.engine, g.c);
  prim.matmul.execute(ctx.stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  ctx.stream.wait();
}

// Extent in elements of a strided (batch, rows, cols) operand, for widening bf16 to fp32.
std::int64_t extent(std::int64_t batch, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::int64_t stride,
                    bool trans) {
  const std::int64_t r = trans ? cols : rows;
  const std::int64_t c = trans ? rows : cols;
  return (batch - 1) * stride + (r - 1) * ld + c;
}

void check(const Gemm& g) {
  if (g.ab_dtype != DType::kF32 && g.ab_dtype != DType::kBF16) {
    throw Error("gemm: operands must be fp32 or bf16, not {}", dtype_name(g.ab_dtype));
  }
  if (g.batch < 0 || g.m < 0 || g.n < 0 || g.k < 0) throw Error("gemm: negative dimension");
  const auto need = [](std::int64_t ld, std::int64_t cols, const char* what) {
    if (ld < cols) throw Error("gemm: {} = {} is smaller than its row of {} elements", what, ld, cols);
  };
  need(g.lda, g.trans_a ? g.m : g.k, "lda");
  need(g.ldb, g.trans_b ? g.k : g.n, "ldb");
  need(g.ldc, g.n, "ldc");
  if ((g.m > 0 && g.n > 0 && g.c == nullptr) || (g.m * g.n * g.k > 0 && (g.a == nullptr || g.b == nullptr))) {
    throw Error("gemm: null operand for a {}x{}x{} product", g.m, g.n, g.k);
  }
}

}  // namespace

bool gemm_native_bf16() {
  Context& ctx = context();
  std::lock_guard lock(ctx.mutex);
  if (ctx.native_bf16 < 0) {
    Gemm probe;
    probe.m = probe.n = probe.k = 16;
    probe.lda = probe.ldb = probe.ldc = 16;
    ctx.native_bf16 = lookup(probe, DType::kBF16, ctx) != nullptr ? 1 : 0;
  }
  return ctx.native_bf16 == 1;
}

std::string gemm_library() {
  const dnnl_version_t* v = dnnl_version();
  const char* runtime = v->cpu_runtime == DNNL_RUNTIME_OMP   ? "OpenMP"
                        : v->cpu_runtime == DNNL_RUNTIME_TBB ? "oneTBB"
                        : v->cpu_runtime == DNNL_RUNTIME_SEQ ? "sequential"
                                                             : "threadpool";
  return fmt::format("oneDNN {}.{}.{} ({} threads)", v->major, v->minor, v->patch, runtime);
}

void gemm(const Gemm& g) {
  check(g);
  if (g.batch == 0 || g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    // An empty sum: C = 0, or unchanged when accumulating.
    if (!g.accumulate) {
      for (std::int64_t i = 0; i < g.batch; ++i) {
        for (std::int64_t r = 0; r < g.m; ++r) {
          float* row = g.c + i * g.stride_c + r * g.ldc;
          std::fill(row, row + g.n, 0.0f);
        }
      }
    }
    return;
  }
  Context& ctx = context();
  const bool native = g.ab_dtype == DType::kF32 || gemm_native_bf16();
  std::lock_guard lock(ctx.mutex);
  if (native) {
    Primitive* prim = lookup(g, g.ab_dtype, ctx);
    ZINF_ASSERT(prim != nullptr || g.ab_dtype == DType::kBF16, "oneDNN has no fp32 matmul for {}x{}x{}", g.m,
                g.n, g.k);
    if (prim != nullptr) {
      run(*prim, g, g.a, g.b, ctx);
      return;
    }
  }
  // No bf16 kernel on this CPU, or none trusted for this shape: widen both operands (exact) and run
  // in fp32.
  const std::int64_t ea = extent(g.batch, g.m, g.k, g.lda, g.stride_a, g.trans_a);
  const std::int64_t eb = extent(g.batch, g.k, g.n, g.ldb, g.stride_b, g.trans_b);
  std::vector<float> wa(static_cast<std::size_t>(ea)), wb(static_cast<std::size_t>(eb));
  convert(g.a, DType::kBF16, wa.data(), DType::kF32, wa.size());
  convert(g.b, DType::kBF16, wb.data(), DType::kF32, wb.size());
  Primitive* prim = lookup(g, DType::kF32, ctx);
  ZINF_ASSERT(prim != nullptr);
  run(*prim, g, wa.data(), wb.data(), ctx);
}

}  // namespace zinf::kernels::cpu
