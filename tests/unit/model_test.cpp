// The model's config parsing, parameter layout, initialisation, weights load/save and input
// checks on the CPU backend (the numerics against PyTorch are in model_reference_test.cpp).
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "io_test_util.hpp"
#include "zinf/io/safetensors.hpp"
#include "zinf/kernels/half.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/weights.hpp"

namespace zinf::runtime {
namespace {

using io::testing::ScratchDir;
using nlohmann::json;

json tiny(const char* arch = "LlamaForCausalLM") {
  return {{"architectures", {arch}}, {"hidden_size", 32}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
          {"num_key_value_heads", 2}, {"intermediate_size", 48}, {"vocab_size", 50}, {"max_position_embeddings", 16}};
}

std::vector<float> unit_f32(Backend& be, const UnitStorage& s, std::size_t u, std::int64_t numel) {
  std::vector<float> out(static_cast<std::size_t>(numel));
  if (s.dtype() == DType::kF32) {
    be.download(out.data(), s.view().units[u], out.size() * 4);
  } else {
    std::vector<std::uint16_t> raw(out.size());
    be.download(raw.data(), s.view().units[u], raw.size() * 2);
    for (std::size_t i = 0; i < raw.size(); ++i) out[i] = kernels::bf16_to_f32(raw[i]);
  }
  return out;
}

TEST(ModelConfig, ParameterCountsMatchPublishedModels) {
  // TinyLlama-1.1B, Llama-2-7B, Qwen2-0.5B (tied, q/k/v bias): Hugging Face's num_parameters().
  const json tinyllama = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 2048}, {"num_hidden_layers", 22},
                          {"num_attention_heads", 32}, {"num_key_value_heads", 4}, {"intermediate_size", 5632},
                          {"vocab_size", 32000}, {"max_position_embeddings", 2048}};
  EXPECT_EQ(make_layout(parse_model_config(tinyllama, "t")).parameter_count(), 1100048384);
  const json llama2 = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 4096}, {"num_hidden_layers", 32},
                       {"num_attention_heads", 32}, {"intermediate_size", 11008}, {"vocab_size", 32000}};
  EXPECT_EQ(make_layout(parse_model_config(llama2, "t")).parameter_count(), 6738415616);
  const json qwen2 = {{"architectures", {"Qwen2ForCausalLM"}}, {"hidden_size", 896}, {"num_hidden_layers", 24},
                      {"num_attention_heads", 14}, {"num_key_value_heads", 2}, {"intermediate_size", 4864},
                      {"vocab_size", 151936}, {"tie_word_embeddings", true}, {"use_sliding_window", false},
                      {"sliding_window", 32768}};
  const ModelConfig q = parse_model_config(qwen2, "t");
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.sliding_window.has_value());
  EXPECT_EQ(make_layout(q).parameter_count(), 494032768);
}

TEST(ModelConfig, LayoutGroupsFusedTensorsAndAligns) {
  const ModelConfig c = parse_model_config(tiny(), "t");
  const ModelLayout l = make_layout(c);
  ASSERT_EQ(l.units.size(), 4u);  // embedding, 2 layers, head
  EXPECT_EQ(l.units[1].name, "layer.0");
  for (const UnitLayout& u : l.units) EXPECT_EQ(u.numel % kUnitAlign, 0);
  const UnitLayout& layer = l.units[1];
  // q, k, v weights back to back (one fused projection), gate and up likewise.
  const auto off = [&](const std::string& n) {
    for (const TensorSpec& t : layer.tensors) {
      if (t.name == "model.layers.0." + n) return t.offset;
    }
    return std::int64_t{-1};
  };
  EXPECT_EQ(off("self_attn.k_proj.weight"), off("self_attn.q_proj.weight") + c.q_dim() * c.hidden_size);
  EXPECT_EQ(off("self_attn.v_proj.weight"), off("self_attn.k_proj.weight") + c.kv_dim() * c.hidden_size);
  EXPECT_EQ(off("mlp.up_proj.weight"), off("mlp.gate_proj.weight") + c.intermediate_size * c.hidden_size);
  EXPECT_EQ(off("self_attn.q_proj.weight") % kUnitAlign, 0);
}

TEST(ModelConfig, BadConfigsNameTheField) {
  auto with = [](const char* key, json value) {
    json j = tiny();
    j[key] = std::move(value);
    return j;
  };
  EXPECT_IO_ERROR(parse_model_config(with("architectures", {"GPT2LMHeadModel"}), "c.json"),
                    "architecture 'GPT2LMHeadModel' is not supported");
  json no_hidden = tiny();
  no_hidden.erase("hidden_size");
  EXPECT_IO_ERROR(parse_model_config(no_hidden, "c.json"), "c.json: \"hidden_size\" is missing");
  EXPECT_IO_ERROR(parse_model_config(with("num_key_value_heads", 3), "c.json"), "not a multiple of num_key_value_heads 3");
  EXPECT_IO_ERROR(parse_model_config(with("hidden_size", -1), "c.json"), "\"hidden_size\" must be a positive integer");
  EXPECT_IO_ERROR(parse_model_config(with("hidden_act", "gelu"), "c.json"), "hidden_act \"gelu\" is not supported");
  EXPECT_IO_ERROR(parse_model_config(with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}), "c.json"),
                    "rope_scaling type 'yarn' is not supported");
  EXPECT_IO_ERROR(parse_model_config(with("rope_scaling", {{"rope_type", "linear"}}), "c.json"),
                    "needs a positive \"factor\"");
  EXPECT_IO_ERROR(parse_model_config(with("attention_dropout", 0.1), "c.json"), "attention_dropout 0.1");
  EXPECT_IO_ERROR(parse_model_config(with("head_dim", 7), "c.json"), "head_dim 7 must be even");
  EXPECT_IO_ERROR(load_model_config("/nonexistent/config.json"), "cannot read model config '/nonexistent/config.json'");
  // model_type alone is enough; unknown harmless fields only warn.
  json by_type = tiny();
  by_type.erase("architectures");
  by_type["model_type"] = "mistral";
  by_type["some_future_field"] = 1;
  EXPECT_EQ(parse_model_config(by_type, "c.json").arch, Arch::kMistral);
}

TEST(ModelConfig, ConfigJsonRoundTrips) {
  json j = tiny();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  j["tie_word_embeddings"] = true;
  const ModelConfig a = parse_model_config(j, "a");
  const ModelConfig b = parse_model_config(model_config_json(a), "b");
  EXPECT_EQ(make_layout(a).parameter_count(), make_layout(b).parameter_count());
  EXPECT_EQ(b.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(b.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_TRUE(b.tie_word_embeddings);
}

TEST(Model, ActivationBytesForAgreesWithWhatSetBatchAllocates) {
  // The GPU memory plan uses activation_bytes_for before any batch exists.
  auto be = make_cpu_backend();
  auto gqa = tiny();
  gqa["num_key_value_heads"] = 1;
  gqa["intermediate_size"] = 40;
  for (const auto& [name, doc] : {std::pair{"tiny", tiny()}, std::pair{"gqa", gqa}}) {
    const ModelConfig c = parse_model_config(doc, name);
    for (const bool checkpoint : {true, false}) {
      for (const auto& [batch, seq] : {std::pair{1, 8}, std::pair{3, 5}}) {
        Model m(c, *be, ModelOptions{DType::kF32, checkpoint, {}});
        std::vector<std::int32_t> tokens(static_cast<std::size_t>(batch * seq), 1), targets(tokens.size(), 2);
        m.set_batch(tokens, targets, batch, seq);
        EXPECT_EQ(m.activation_bytes(), Model::activation_bytes_for(c, batch, seq, ModelOptions{DType::kF32, checkpoint, {}}))
            << name << " checkpoint " << checkpoint << " batch " << batch << " seq " << seq;
      }
    }
  }
}

TEST(Model, InitialisationIsDeterministicAndFollowsTheScheme) {
  const ModelConfig c = parse_model_config(tiny(), "t");
  const ModelLayout l = make_layout(c);
  auto be = make_cpu_backend();
  UnitStorage a(*be, l, DType::kF32), b(*be, l, DType::kF32), other(*be, l, DType::kF32), half(*be, l, DType::kBF16);
  init_parameters(c, l, 7, *be, a.view());
  init_parameters(c, l, 7, *be, b.view());
  init_parameters(c, l, 8, *be, other.view());
  init_parameters(c, l, 7, *be, half.view());
  for (std::size_t u = 0; u < l.units.size(); ++u) {
    const auto va = unit_f32(*be, a, u, l.units[u].numel), vb = unit_f32(*be, b, u, l.units[u].numel);
    const auto vo = unit_f32(*be, other, u, l.units[u].numel), vh = unit_f32(*be, half, u, l.units[u].numel);
    EXPECT_EQ(va, vb);
    EXPECT_NE(va, vo);
    for (std::size_t i = 0; i < va.size(); ++i) {
      ASSERT_EQ(vh[i], kernels::bf16_to_f32(kernels::f32_to_bf16(va[i]))) << "bf16 units hold the rounded fp32 draw";
    }
  }
  // Embedding ~ normal(0, 0.02); norms 1.
  const auto emb = unit_f32(*be, a, 0, l.units[0].numel);
  double sum = 0, sq = 0;
  const std::int64_t n = c.vocab_size * c.hidden_size;
  for (std::int64_t i = 0; i < n; ++i) sum += emb[i], sq += emb[i] * emb[i];
  EXPECT_NEAR(sum / n, 0.0, 0.003);
  EXPECT_NEAR(std::sqrt(sq / n), 0.02, 0.002);
  const auto head = unit_f32(*be, a, 3, l.units[3].numel);
  EXPECT_EQ(head[0], 1.0f);
}

TEST(Model, SaveAndLoadRoundTrip) {
  ScratchDir dir;
  const ModelConfig c = parse_model_config(tiny(), "t");
  const ModelLayout l = make_layout(c);
  auto be = make_cpu_backend();
  UnitStorage src(*be, l, DType::kF32), back(*be, l, DType::kF32), back_bf16(*be, l, DType::kBF16);
  init_parameters(c, l, 3, *be, src.view());
  const std::string out = dir.path() + "/model";
  const auto files = save_weights(out, c, l, *be, src.view(), DType::kF32, 16 << 10);
  EXPECT_GT(files.size(), 3u) << "sharded at 16 KiB";
  EXPECT_EQ(load_model_config(out + "/config.json").num_layers, 2);
  load_weights(out, c, l, *be, back.view());
  load_weights(out, c, l, *be, back_bf16.view());
  for (std::size_t u = 0; u < l.units.size(); ++u) {
    EXPECT_EQ(unit_f32(*be, src, u, l.units[u].numel), unit_f32(*be, back, u, l.units[u].numel));
    EXPECT_EQ(unit_f32(*be, back_bf16, u, l.units[u].numel), unit_f32(*be, back_bf16, u, l.units[u].numel));
  }
  // bf16 file: exactly the rounded values.
  save_weights(out, c, l, *be, src.view(), DType::kBF16);
  UnitStorage round(*be, l, DType::kF32);
  load_weights(out + "/model.safetensors", c, l, *be, round.view());
  const auto a = unit_f32(*be, src, 1, l.units[1].numel), r = unit_f32(*be, round, 1, l.units[1].numel);
  for (std::size_t i = 0; i < a.size(); ++i) ASSERT_EQ(r[i], kernels::bf16_to_f32(kernels::f32_to_bf16(a[i])));
}

TEST(Model, MismatchedWeightsAreClearErrors) {
  ScratchDir dir;
  const ModelConfig c = parse_model_config(tiny(), "t");
  const ModelLayout l = make_layout(c);
  auto be = make_cpu_backend();
  UnitStorage p(*be, l, DType::kF32);
  save_weights(dir.path() + "/m", c, l, *be, p.view(), DType::kBF16);
  // A model with more layers, more heads' worth of kv, or a bigger vocabulary.
  json more = tiny();
  more["num_hidden_layers"] = 3;
  const ModelConfig c3 = parse_model_config(more, "t");
  EXPECT_IO_ERROR(load_weights(dir.path() + "/m", c3, make_layout(c3), *be, UnitStorage(*be, make_layout(c3), DType::kF32).view()),
                    "tensors are missing: model.layers.2.");
  json fewer = tiny();
  fewer["num_hidden_layers"] = 1;
  const ModelConfig c1 = parse_model_config(fewer, "t");
  EXPECT_IO_ERROR(load_weights(dir.path() + "/m", c1, make_layout(c1), *be, UnitStorage(*be, make_layout(c1), DType::kF32).view()),
                    "have no place in the model: model.layers.1.");
  json wide = tiny();
  wide["vocab_size"] = 64;
  const ModelConfig cv = parse_model_config(wide, "t");
  EXPECT_IO_ERROR(load_weights(dir.path() + "/m", cv, make_layout(cv), *be, UnitStorage(*be, make_layout(cv), DType::kF32).view()),
                    "model.embed_tokens.weight: file [50, 32] vs model [64, 32]");
  // A tensor of an integer dtype where a weight belongs.
  io::StWriteTensor t;
  t.name = "model.norm.weight";
  t.dtype = io::StDType::kI32;
  t.shape = {32};
  t.fill = [](std::byte* d) { std::memset(d, 0, 128); };
  io::write_safetensors(dir.path() + "/int.safetensors", {t});
  EXPECT_IO_ERROR(load_weights(dir.path() + "/int.safetensors", c, l, *be, p.view()), "is I32; zinf loads F32, BF16 and F16 weights");
}

TEST(Model, BadBatchesAreClearErrors) {
  json j = tiny();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = 8;
  const ModelConfig c = parse_model_config(j, "c.json");
  auto be = make_cpu_backend();
  Model m(c, *be);
  std::vector<std::int32_t> tok(2 * 4, 1), tgt(2 * 4, 2);
  m.set_batch(tok, tgt, 2, 4);
  tok[3] = 50;
  EXPECT_IO_ERROR(m.set_batch(tok, tgt, 2, 4), "token id 50 at position 3 is outside the vocabulary (vocab_size 50)");
  tok[3] = 1;
  std::vector<std::int32_t> none(8, -100);
  EXPECT_IO_ERROR(m.set_batch(tok, none, 2, 4), "no target token");
  EXPECT_IO_ERROR(m.set_batch(tok, tgt, 2, 3), "needs 6 tokens and targets, got 8");
  std::vector<std::int32_t> long_tok(10, 1), long_tgt(10, 1);
  EXPECT_IO_ERROR(m.set_batch(long_tok, long_tgt, 1, 10), "exceeds the sliding window 8");
  json k = tiny();
  const ModelConfig c2 = parse_model_config(k, "c.json");
  Model m2(c2, *be);
  std::vector<std::int32_t> t17(17, 1);
  EXPECT_IO_ERROR(m2.set_batch(t17, t17, 1, 17), "exceeds the model's max_position_embeddings 16");
}

TEST(Model, TrainingReducesTheLoss) {
  // 30 plain SGD steps on one batch from a fresh initialisation: the loss falls, in fp32 and bf16.
  const ModelConfig c = parse_model_config(tiny(), "t");
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    auto be = make_cpu_backend();
    Model m(c, *be, ModelOptions{dtype, true, {}});
    UnitStorage p(*be, m.layout(), DType::kF32), g(*be, m.layout(), DType::kF32), run(*be, m.layout(), dtype);
    init_parameters(c, m.layout(), 1, *be, p.view());
    std::vector<std::int32_t> tok(32), tgt(32);
    for (int i = 0; i < 32; ++i) tok[i] = (i * 7) % 50, tgt[i] = (i * 7 + 7) % 50;
    m.set_batch(tok, tgt, 2, 16);
    float first = 0, last = 0;
    std::string trace;
    for (int step = 0; step < 30; ++step) {
      for (std::size_t u = 0; u < m.unit_count(); ++u) {
        kernels::cpu::convert(p.view().units[u], DType::kF32, run.view().units[u], dtype,
                              static_cast<std::size_t>(m.layout().units[u].numel));
      }
      g.zero();
      last = m.forward(run.view());
      trace += fmt::format(" {:.3f}", last);
      if (step == 0) first = last;
      m.backward(run.view(), g.view());
      for (std::size_t u = 0; u < m.unit_count(); ++u) {
        auto* w = static_cast<float*>(p.view().units[u]);
        const auto* d = static_cast<const float*>(g.view().units[u]);
        for (std::int64_t i = 0; i < m.layout().units[u].numel; ++i) w[i] -= 0.2f * d[i];
      }
    }
    EXPECT_NEAR(first, std::log(50.0f), 0.1f) << "a fresh model predicts uniformly";
    EXPECT_LT(last, 0.25f * first) << kernels::cpu::dtype_name(dtype) << " losses:" << trace;
  }
}

}  // namespace
}  // namespace zinf::runtime
