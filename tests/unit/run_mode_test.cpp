// The run's mode decisions, as a table: every combination of ZeRO stage x ranks x gradient
// accumulation x precision x LoRA x device x communication dtype x offload_optimizer.ratio. The
// expected row is the trainer's rule written out once here (the expressions of trainer.cpp as of
// the reshaping of runtime/): decide_run_mode(), which the trainer and `zinf plan` both call, and
// zinf plan's bytes must follow it in every row.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <optional>
#include <string>
#include <vector>

#include "zinf/common/error.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/plan.hpp"
#include "zinf/runtime/run_mode.hpp"

namespace zinf::runtime {
namespace {

using config::Json;

struct Row {
  int stage = 0;
  int world = 1;
  int gas = 1;
  std::string precision;  // bf16, fp16, fp32
  bool lora = false;
  std::string device;     // cpu, cuda
  std::string comm;       // "", fp32, bf16
  double ratio = 1.0;     // offload_optimizer.ratio (device cpu)
  std::string name() const {
    return fmt::format("stage {} x{} gas {} {}{} {} comm '{}' ratio {}", stage, world, gas, precision, lora ? " lora" : "",
                       device, comm, ratio);
  }
};

// What the trainer decides for a row (`units`: the layout's element counts, forward order).
struct Expected {
  bool refused = false;  // LoRA with fp16
  bool stage3 = false, sharded = false, partition_grads = false, pipeline = false, nccl = false;
  bool bf16_params = false, bf16_grads = false, grads_in_params = false;
  std::size_t gpu_units = 0;
  std::vector<std::uint64_t> shard;
};

Expected expected(const Row& r, const std::vector<std::int64_t>& units) {
  Expected e;
  const bool fp16 = r.precision == "fp16";
  if (r.lora && fp16) {
    e.refused = true;
    return e;
  }
  e.stage3 = r.stage == 3;
  e.sharded = r.world > 1 && (r.lora ? e.stage3 : r.stage >= 1);
  e.partition_grads = r.stage >= 2 && !r.lora;
  e.pipeline = r.device == "cuda" && e.partition_grads && (r.world == 1 || e.stage3) && (r.gas == 1 || r.world == 1) &&
               !fp16 && !r.lora;
  e.nccl = e.pipeline && r.world > 1;
  e.bf16_params = r.precision == "bf16" || r.lora;
  e.bf16_grads = e.pipeline && r.comm == "bf16" && r.gas == 1;
  if (r.ratio < 1.0 && !r.lora && e.pipeline && e.stage3 && r.world == 1) {
    double total = 0, got = 0;
    for (const auto n : units) total += static_cast<double>(n);
    const double want = (1.0 - r.ratio) * total;
    for (const auto n : units) {
      if (got + static_cast<double>(n) / 2 > want) break;
      got += static_cast<double>(n);
      ++e.gpu_units;
    }
  }
  e.grads_in_params = e.pipeline && e.stage3 && e.bf16_grads && e.bf16_params && e.gpu_units < units.size();
  for (const auto n : units) {
    const auto w = static_cast<std::int64_t>(r.world);
    e.shard.push_back(static_cast<std::uint64_t>(e.sharded ? (n + w - 1) / w : n));
  }
  return e;
}

std::vector<Row> table() {
  std::vector<Row> rows;
  for (int stage : {0, 1, 2, 3})
    for (int world : {1, 2})
      for (int gas : {1, 2})
        for (const char* precision : {"bf16", "fp16", "fp32"})
          for (bool lora : {false, true})
            for (const char* device : {"cpu", "cuda"})
              for (const char* comm : {"", "fp32", "bf16"})
                for (double ratio : {1.0, 0.5}) {
                  if (stage != 3 && ratio < 1.0) continue;  // (partial offload is a stage-3 setting)
                  rows.push_back({stage, world, gas, precision, lora, device, comm, ratio});
                }
  return rows;
}

ModelConfig model() {
  return parse_model_config(Json{{"architectures", {"LlamaForCausalLM"}},
                                 {"hidden_size", 64},
                                 {"num_hidden_layers", 4},
                                 {"num_attention_heads", 4},
                                 {"num_key_value_heads", 2},
                                 {"intermediate_size", 128},
                                 {"vocab_size", 512},
                                 {"max_position_embeddings", 64},
                                 {"rms_norm_eps", 1e-5},
                                 {"tie_word_embeddings", false}},
                            "table model");
}

config::DeepSpeedConfig ds_for(const Row& r) {
  Json j{{"train_micro_batch_size_per_gpu", 1},
         {"gradient_accumulation_steps", r.gas},
         {"bf16", {{"enabled", r.precision == "bf16"}}},
         {"fp16", {{"enabled", r.precision == "fp16"}}},
         {"zero_optimization", {{"stage", r.stage}}}};
  if (r.stage > 0) j["zero_optimization"]["offload_optimizer"] = {{"device", "cpu"}, {"ratio", r.ratio}};
  if (!r.comm.empty()) j["communication_data_type"] = r.comm;
  config::ParseOptions po;
  po.world_size = r.world;
  const auto parsed = config::parse_config(j, po);
  if (!parsed.ok()) throw Error("table config {}: {}", r.name(), parsed.diagnostics.format());
  return parsed.config;
}

std::uint64_t item(const Plan& p, const std::string& tier, const std::string& what) {
  for (const auto& t : p.tiers) {
    if (t.name != tier) continue;
    for (const auto& i : t.items) {
      if (i.what == what) return i.bytes;
    }
  }
  return 0;
}

TEST(RunMode, EveryRowIsDecidedAsTheTrainerDid) {
  const ModelConfig m = model();
  std::vector<std::int64_t> units;
  for (const auto& u : make_layout(m).units) units.push_back(u.numel);
  for (const Row& r : table()) {
    SCOPED_TRACE(r.name());
    const Expected e = expected(r, units);
    RunModeInputs in = RunModeInputs::from_config(ds_for(r));
    in.world = r.world;
    in.lora = r.lora;
    in.device = r.device;
    in.units = units;
    if (e.refused) {
      EXPECT_THROW(decide_run_mode(in), Error);
      continue;
    }
    const RunMode d = decide_run_mode(in);
    EXPECT_EQ(d.stage3, e.stage3);
    EXPECT_EQ(d.sharded, e.sharded);
    EXPECT_EQ(d.partition_grads, e.partition_grads);
    EXPECT_EQ(d.pipeline, e.pipeline);
    EXPECT_EQ(d.nccl, e.nccl);
    EXPECT_EQ(d.param_dtype == kernels::cpu::DType::kBF16, e.bf16_params);
    EXPECT_EQ(d.grad_dtype == kernels::cpu::DType::kBF16, e.bf16_grads);
    EXPECT_EQ(d.grads_in_params, e.grads_in_params);
    EXPECT_EQ(d.gpu_units, e.gpu_units);
    for (std::size_t u = 0; u < units.size(); ++u) {
      EXPECT_EQ(d.on_gpu[u] != 0, u < e.gpu_units);
      EXPECT_EQ(static_cast<std::uint64_t>(d.shard[u]), e.shard[u]);
      EXPECT_EQ(d.gather_elements(u), e.nccl ? d.shard[u] * r.world : units[u]);
    }
    // On a GPU without the pipeline, the reason is given.
    EXPECT_EQ(d.no_pipeline.empty(), r.device == "cpu" || e.pipeline);
    // Turned off, or with a gradient hook: the synchronous path; where NCCL cannot serve every
    // rank, several GPUs take it too.
    RunModeInputs off = in;
    off.gpu_overlap = false;
    EXPECT_FALSE(decide_run_mode(off).pipeline);
    RunModeInputs hook = in;
    hook.gradient_hook = true;
    EXPECT_FALSE(decide_run_mode(hook).pipeline);
    RunModeInputs no_nccl = in;
    no_nccl.nccl_usable = false;
    EXPECT_EQ(decide_run_mode(no_nccl).pipeline, e.pipeline && r.world == 1);
  }
}

TEST(RunMode, ThePlannerFollowsTheTrainersDecisionsInEveryRow) {
  const ModelConfig m = model();
  std::vector<std::int64_t> units;
  for (const auto& u : make_layout(m).units) units.push_back(u.numel);
  std::size_t rows = 0, pipelines = 0, shares = 0, in_params = 0;
  for (const Row& r : table()) {
    SCOPED_TRACE(r.name());
    const Expected e = expected(r, units);
    PlanInputs in;
    in.model = m;
    in.ds = ds_for(r);
    in.device = r.device;
    in.gpus = r.world;
    in.micro_batch = 1;
    in.seq_len = 16;
    in.grad_accum = r.gas;
    if (r.lora) in.lora.rank = 4;
    if (e.refused) {
      EXPECT_THROW(make_plan(in, MachineRates()), Error);
      continue;
    }
    const Plan p = make_plan(in, MachineRates());
    ++rows;
    EXPECT_EQ(p.pipeline, e.pipeline);
    pipelines += e.pipeline ? 1 : 0;
    // The GPU's share of the optimizer: its units' fp32 state and held gradients.
    std::uint64_t share = 0, share_elems = 0;
    for (std::size_t u = 0; u < e.gpu_units; ++u) share_elems += static_cast<std::uint64_t>(units[u]);
    share = share_elems * (12 + (e.bf16_grads ? 2 : 4));
    EXPECT_EQ(item(p, "gpu", "optimizer share (offload_optimizer.ratio)"), share);
    shares += e.gpu_units > 0 ? 1 : 0;
    // The pipeline's page-locked gradient shards (none when they land in the parameter shards, or
    // for the GPU's units), or the synchronous path's pageable ones.
    std::uint64_t pinned = 0, pageable = 0;
    for (std::size_t u = 0; u < units.size(); ++u) {
      if (r.lora || e.grads_in_params || u < e.gpu_units) continue;
      if (e.pipeline) pinned += e.shard[u] * (e.bf16_grads ? 2 : 4);
      else if (e.sharded || e.partition_grads) pageable += e.shard[u] * 4;
    }
    in_params += e.grads_in_params ? 1 : 0;
    EXPECT_EQ(item(p, "host_pinned", "gradient shards"), pinned * static_cast<std::uint64_t>(r.world));
    EXPECT_EQ(item(p, "host_pageable", "gradient shards (synchronous path)"), pageable * static_cast<std::uint64_t>(r.world));
    // This rank's piece of the state: 12 bytes per element of its shards, in the 4 KiB-aligned
    // pieces the store carves (each unit here is one slice: sub_group_size is larger).
    std::uint64_t state = 0;
    for (const auto s : e.shard) state += (s * 12 + 4095) / 4096 * 4096;
    EXPECT_EQ(item(p, "host_pinned", "optimizer state (fp32 master, m, v)"), r.lora ? 0 : state * static_cast<std::uint64_t>(r.world));
  }
  // The table reaches every branch.
  EXPECT_GT(rows, 0u);
  EXPECT_GT(pipelines, 0u);
  EXPECT_GT(shares, 0u);
  EXPECT_GT(in_params, 0u);
}

}  // namespace
}  // namespace zinf::runtime
