#pragma once
// Model weights in and out of parameter units: deterministic initialisation, and Hugging Face
// safetensors checkpoints (single file or sharded), with Hugging Face tensor names so a checkpoint
// goes straight into transformers and back.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "zinf/runtime/model.hpp"

namespace zinf::runtime {

// The usual scheme (transformers' _init_weights): linear and embedding weights ~ normal(0,
// initializer_range), biases 0, norm weights 1. Element i of a tensor draws from a counter-based
// generator keyed by (seed, tensor name, i), so the values do not depend on the unit layout, the
// thread count or the dtype (bf16 units get the fp32 draw rounded).
void init_parameters(const ModelConfig& config, const ModelLayout& layout, std::uint64_t seed, Backend& backend,
                     const UnitBuffers& params);
// The same for one unit, as fp32 in host memory (out: the unit's numel elements, padding zero), so a
// large model is initialised a unit at a time.
void init_unit(const ModelConfig& config, const UnitLayout& unit, std::uint64_t seed, std::span<float> out);

// Loads every tensor of the layout from a checkpoint (a .safetensors file, an index, or a directory
// holding either), converting F32/BF16/F16 to the units' dtype. Throws zinf::Error listing missing
// tensors, tensors the model has no place for, and shape mismatches (name, file shape, model shape).
// lm_head.weight is ignored when the embeddings are tied, as transformers does.
void load_weights(const std::string& path, const ModelConfig& config, const ModelLayout& layout, Backend& backend,
                  const UnitBuffers& params);

// Writes `dir`/config.json and the weights as `file_dtype` (fp32 or bf16), sharded when larger
// than max_shard_bytes (0: one file). A crash leaves the previous checkpoint in `dir` (or
// `dir`.old) whole. Returns the files written.
std::vector<std::string> save_weights(const std::string& dir, const ModelConfig& config, const ModelLayout& layout,
                                      Backend& backend, const UnitBuffers& params, DType file_dtype,
                                      std::uint64_t max_shard_bytes = 0);

}  // namespace zinf::runtime
