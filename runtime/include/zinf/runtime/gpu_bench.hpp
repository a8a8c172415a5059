#pragma once
// GPU measurements for `zinf bench pcie` and `zinf bench gemm` (and so for `zinf bench all`,
// `zinf plan` and `zinf tune`): host <-> GPU copy bandwidth over transfer sizes, through the CUDA
// runtime directly (cudaMemcpyAsync, the reference) and through zinf's own path (HostMemory's
// pinned buffers and the CUDA backend's copy streams, as training uses them); and the bf16 GEMM
// rate of cuBLASLt. Built without CUDA, or without a usable GPU, both throw zinf::Error saying why.

#include <cstdint>
#include <string>
#include <vector>

namespace zinf::runtime {

struct PcieOptions {
  int device = 0;
  std::vector<std::uint64_t> sizes;     // transfer sizes (bytes); empty: 64K .. 256M by powers of 4
  std::uint64_t bytes_per_point = 2ull << 30;  // each point copies about this much (at least 3 copies)
  int repeat = 3;                       // timed rounds per point; the best is kept
};

struct PcieRow {
  std::string path;       // "cuda" (cudaMemcpyAsync on a stream of its own) or "zinf" (backend + HostMemory)
  std::string memory;     // "pinned" or "pageable"
  std::string direction;  // "h2d", "d2h", "both" (both directions at once, two streams)
  std::uint64_t bytes = 0;  // per copy
  double gbps = 0;          // GB/s (1e9 bytes/s); "both" counts the bytes of both directions
};

struct PcieResult {
  std::string gpu;
  std::vector<PcieRow> rows;
  // Best figure of each (path, memory, direction) over sizes.
  double best(const std::string& path, const std::string& memory, const std::string& direction) const;
};

PcieResult bench_pcie(const PcieOptions& options);

struct GemmRow {
  std::int64_t m = 0, n = 0, k = 0;
  double tflops = 0;  // 2 m n k / time, best of the timed runs
};

struct GemmResult {
  std::string gpu;
  std::vector<GemmRow> rows;
  double peak_tflops = 0;  // the best row
};

// bf16 A and B, fp32 accumulation, bf16 C. Empty shapes: square 4096/8192/16384 and the products of
// an 8B Llama layer at 8192 rows.
GemmResult bench_gemm(int device, std::vector<GemmRow> shapes = {}, int repeat = 5);

}  // namespace zinf::runtime
