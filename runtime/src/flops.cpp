// Model FLOPs per token: see flops.hpp.
#include "zinf/runtime/flops.hpp"

#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {
namespace {

// Parameters that take part in matrix products: the embedding lookup is not a product; a tied
// embedding is also the head's product.
double product_parameters(const ModelConfig& c) {
  const double params = static_cast<double>(make_layout(c).parameter_count());
  const double emb = static_cast<double>(c.vocab_size * c.hidden_size);
  return params - emb + (c.tie_word_embeddings ? emb : 0.0);
}

double attention_flops_per_token(const ModelConfig& c, std::int64_t seq) {
  return 12.0 * static_cast<double>(c.num_layers * seq * c.q_dim());
}

}  // namespace

double training_flops_per_token(const ModelConfig& c, std::int64_t seq) {
  return 6.0 * product_parameters(c) + attention_flops_per_token(c, seq);
}

double lora_training_flops_per_token(const ModelConfig& c, std::int64_t seq, const LoraLayout& lora) {
  return 4.0 * product_parameters(c) + attention_flops_per_token(c, seq) + 6.0 * static_cast<double>(lora.parameter_count());
}

}  // namespace zinf::runtime
