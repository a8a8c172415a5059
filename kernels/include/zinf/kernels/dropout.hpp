#pragma once
// The dropout mask shared by the CPU and CUDA kernels and the PyTorch reference
// (tests/reference/gen_lora_reference.py): element i of a mask keyed by `seed` is kept when a
// counter-based hash of (seed, i) is at least p. No state: the backward pass regenerates the
// forward's mask from the same seed, and the result does not depend on the thread count.

#include <cstdint>

#if defined(__CUDACC__)
#define ZINF_HD __host__ __device__ __forceinline__
#else
#define ZINF_HD inline
#endif

namespace zinf::kernels {

// splitmix64's finaliser.
ZINF_HD std::uint64_t dropout_mix(std::uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A uniform draw in [0, 1) with 24 bits: the finaliser of seed + (i + 1) * golden.
ZINF_HD float dropout_uniform(std::uint64_t seed, std::uint64_t i) {
  return static_cast<float>(dropout_mix(seed + (i + 1) * 0x9E3779B97F4A7C15ull) >> 40) * (1.0f / 16777216.0f);
}

// The seed of mask `stream` (one per LoRA adapter) under a micro-batch's seed.
ZINF_HD std::uint64_t dropout_stream(std::uint64_t seed, std::uint64_t stream) {
  return dropout_mix(seed + (stream + 1) * 0xD1B54A32D192ED03ull);
}

ZINF_HD bool dropout_keep(std::uint64_t seed, std::uint64_t i, float p) { return dropout_uniform(seed, i) >= p; }

}  // namespace zinf::kernels

#undef ZINF_HD
