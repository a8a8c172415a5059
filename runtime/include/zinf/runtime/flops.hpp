#pragma once
// Model FLOPs per token of a training step, as the metrics, `zinf plan` and `zinf bench` count
// them (the convention of the PaLM paper's MFU: matrix products and attention, no
// recomputation).

#include <cstdint>

#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

// Forward and backward, no recomputation: 6 per parameter in the matrix products plus
// attention's 12 * layers * seq * q_dim.
double training_flops_per_token(const ModelConfig& config, std::int64_t seq);
// The same for LoRA on a frozen base: the base's products forward and for the input gradients
// only (no weight gradients: 4 per parameter instead of 6), attention's, and the adapters' 6 per
// parameter.
double lora_training_flops_per_token(const ModelConfig& config, std::int64_t seq, const LoraLayout& lora);

}  // namespace zinf::runtime
