// zinf plan (runtime/src/plan.cpp): its bytes per tier against the trainer's own GPU plan and the
// memory the recorded runs in bench/results/raw measured; its verdicts; rates from bench reports.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "zinf/common/error.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/runtime/plan.hpp"

namespace zinf::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json read_json(const fs::path& p) {
  std::ifstream in(p);
  EXPECT_TRUE(in.good()) << p;
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

config::DeepSpeedConfig ds_from(const json& j, std::int64_t world) {
  config::ParseOptions po;
  po.world_size = world;
  const auto parsed = config::parse_config(config::Json::parse(j.dump()), po);
  EXPECT_EQ(parsed.diagnostics.count(config::Severity::kError), 0u) << parsed.diagnostics.format();
  return parsed.config;
}

PlanInputs inputs_from_summary(const json& s) {
  PlanInputs in;
  const std::int64_t world = s.contains("zero") ? s["zero"].value("world_size", 1) : 1;
  in.model = parse_model_config(s["model"]["config"], "summary");
  in.ds = ds_from(s["deepspeed_config"], world);
  in.device = s.value("backend", "cuda");
  in.gpus = static_cast<int>(world);
  in.micro_batch = in.ds.batch.micro_batch_per_gpu.value_or(1);
  in.grad_accum = in.ds.batch.gradient_accumulation_steps.value_or(1);
  in.seq_len = s["data"]["seq_len"].get<std::int64_t>();
  return in;
}

// The source tree (recorded runs, model configs): ZINF_SOURCE_DIR in the environment (a bundle run
// elsewhere), else where this test was built from.
fs::path source_dir() {
  const char* env = std::getenv("ZINF_SOURCE_DIR");
  return env != nullptr && *env != '\0' ? fs::path(env) : fs::path(ZINF_SOURCE_DIR);
}

const TierPlan& tier(const Plan& p, const std::string& name) {
  for (const auto& t : p.tiers) {
    if (t.name == name) return t;
  }
  throw Error("no tier {}", name);
}

// Recorded runs: the CUDA issue's 3.1B shape on one H200, with half of the optimizer state on the
// GPU, on 2 and 4 GPUs; a CPU run; and bench/plan_validation.sh's five runs before and after the
// pipeline's gradient buffers were counted as the pools keep them (one GPU: kGradBuffersInFlight
// per size, not one more; several: kReductionsInFlight + 1 padded buffers, not two more).
// `same_plan`: the run's trainer planned its GPU memory with today's formulas.
struct RecordedRun {
  const char* dir;
  bool same_plan;
};
const RecordedRun kRecordedRuns[] = {
    {"gpu-final-2026-12-01/zinf-noclip", false},
    {"gpu-final-2026-12-01/zinf-ratio0.5", false},
    {"gpu-scaling-2026-11-22/x4/scale/zinf-g1", false},
    {"gpu-scaling-2026-11-22/x4/scale/zinf-g2", false},
    {"gpu-scaling-2026-11-22/x4/scale/zinf-g4", false},
    {"gpu-scaling-2026-11-22/x2/scale/zinf-g2", false},
    {"train-2026-11-21/h200-host", true},
    {"plan-validation-2026-12-01/run-3b-noclip", false},
    {"plan-validation-2026-12-01/run-3b-clip", false},
    {"plan-validation-2026-12-01/run-3b-bf16grads", false},
    {"plan-validation-2026-12-01/run-3b-ratio0.5", false},
    {"plan-validation-2026-12-01/run-8b-cap24", false},
    {"plan-validation-2026-12-02/run-3b-noclip", true},
    {"plan-validation-2026-12-02/run-3b-clip", true},
    {"plan-validation-2026-12-02/run-3b-bf16grads", true},
    {"plan-validation-2026-12-02/run-3b-ratio0.5", true},
    {"plan-validation-2026-12-02/run-8b-cap24", true},
    {"gpu-grad-accum-2026-12-02/pipe/m4-g1", true},
    {"gpu-grad-accum-2026-12-02/pipe/m2-g2", true},
    {"gpu-grad-accum-2026-12-02/pipe/m4-g4", true},
    {"gpu-grad-accum-2026-12-02/pipe/m4-g4-clip", true},
};

TEST(Plan, MemoryPerTierMatchesTheRecordedRuns) {
  const fs::path raw = source_dir() / "bench" / "results" / "raw";
  if (!fs::exists(raw)) GTEST_SKIP() << raw << " is missing: set ZINF_SOURCE_DIR to a zinf checkout";
  int gpu_runs = 0;
  for (const auto& [run, same_plan] : kRecordedRuns) {
    SCOPED_TRACE(run);
    const json s = read_json(raw / run / "summary.json");
    const PlanInputs in = inputs_from_summary(s);
    const Plan p = make_plan(in, MachineRates{});
    // Host: the partition store's pinned memory, per rank, within 10% of what the run measured.
    const double host = static_cast<double>(tier(p, "host_pinned").total()) / in.gpus;
    const double host_measured = s["peak_memory_bytes"]["host_pinned"].get<double>();
    EXPECT_NEAR(host / host_measured, 1.0, 0.10);
    if (in.device != "cuda") continue;
    ++gpu_runs;
    const double gpu = static_cast<double>(tier(p, "gpu").total());
    const double planned = s["gpu_memory"]["planned_bytes"].get<double>();
    const double peak = s["gpu_memory"]["peak_bytes"].get<double>();
    // GPU: the trainer's own plan (what --gpu-memory-limit enforces), or less where the trainer
    // then counted a gradient buffer per size too many ...
    if (same_plan) {
      EXPECT_NEAR(gpu / planned, 1.0, 0.005);
    } else {
      EXPECT_LT(gpu, planned);
    }
    // ... an upper bound of the measured peak, within 10% of it.
    EXPECT_GE(gpu, peak);
    EXPECT_LE(gpu / peak, 1.10);
    EXPECT_TRUE(p.pipeline);
  }
  EXPECT_EQ(gpu_runs, 20);
}

double median_step_seconds(const fs::path& csv, int warmup) {
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);
  int col = -1, i = 0;
  std::stringstream hs(line);
  for (std::string h; std::getline(hs, h, ','); ++i) {
    if (h == "step_s") col = i;
  }
  EXPECT_GE(col, 0) << csv;
  std::vector<double> v;
  for (int row = 0; std::getline(in, line); ++row) {
    if (row < warmup) continue;
    std::stringstream ls(line);
    std::string cell;
    for (int c = 0; std::getline(ls, cell, ',') && c <= col; ++c) {
      if (c == col) v.push_back(std::stod(cell));
    }
  }
  EXPECT_FALSE(v.empty()) << csv;
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// bench/plan_validation.sh on an H200: `zinf bench all` and five training runs in one invocation.
// The plan made from each run's config with that report's rates predicts its median step time
// within 25% (the bar; they were within 5%, and within 11% in the day before's invocation), and
// names the bound the run's breakdown shows.
void check_step_times(const fs::path& dir, std::initializer_list<std::pair<const char*, const char*>> runs) {
  const MachineRates rates = MachineRates::from_report((dir / "bench" / "report.json").string());
  EXPECT_EQ(rates.source.at("h2d_GBps").rfind("measured", 0), 0u);
  EXPECT_EQ(rates.source.at("adam_params_per_s").rfind("measured", 0), 0u);
  EXPECT_EQ(rates.source.at("gpu_model_tflops").rfind("measured", 0), 0u);
  for (const auto& [run, bound] : runs) {
    SCOPED_TRACE(run);
    const json s = read_json(dir / run / "summary.json");
    const Plan p = make_plan(inputs_from_summary(s), rates);
    const double measured = median_step_seconds(dir / run / "training_metrics.csv", 2);
    EXPECT_NEAR(p.predicted_s / measured, 1.0, 0.25) << p.text();
    EXPECT_EQ(p.bound, bound) << p.text();
    EXPECT_LE(p.lower_s, p.predicted_s);
    EXPECT_GE(p.upper_s, p.predicted_s);
  }
}

TEST(Plan, PredictsTheStepTimeOfRunsOnTheMeasuredMachine) {
  const fs::path raw = source_dir() / "bench" / "results" / "raw";
  if (!fs::exists(raw)) GTEST_SKIP() << raw << " is missing: set ZINF_SOURCE_DIR to a zinf checkout";
  for (const char* day : {"plan-validation-2026-12-01", "plan-validation-2026-12-02"}) {
    SCOPED_TRACE(day);
    check_step_times(raw / day, {{"run-3b-noclip", "host"},
                                 {"run-3b-clip", "host"},
                                 {"run-3b-bf16grads", "host"},
                                 {"run-3b-ratio0.5", "compute"},
                                 {"run-8b-cap24", "host"}});
  }
}

// bench/gpu_grad_accum.sh on an H200: the 3.1B shape through the pipeline with 1, 2 and 4
// micro-batches per step (with and without clipping), and `zinf bench all`, in one invocation
// (within 11%).
TEST(Plan, PredictsTheStepTimeWithGradientAccumulation) {
  const fs::path dir = source_dir() / "bench" / "results" / "raw" / "gpu-grad-accum-2026-12-02";
  if (!fs::exists(dir)) GTEST_SKIP() << dir << " is missing: set ZINF_SOURCE_DIR to a zinf checkout";
  check_step_times(dir, {{"pipe/m4-g1", "host"}, {"pipe/m2-g2", "host"}, {"pipe/m4-g4", "host"}, {"pipe/m4-g4-clip", "host"}});
}

// The 2- and 4-GPU runs of bench/gpu_scaling.sh (the 3.1B shape, one to four H200s of one host,
// each script's one-GPU run on the same host), planned with the rates of the one-GPU H200's report
// (the multi-GPU machines' own reports were never recorded: no such machine was lent since).
// Those hosts have 32 and 64 cores, not 16, and run the one-GPU step 16% faster, so the absolute
// figure is only held to the bar (25%); what the plan adds for several GPUs (the collectives, the
// smaller optimizer shard, the host traffic per rank) is held tighter: its ratio of the W-GPU step
// to the one-GPU step is within 10% of the ratio each host measured.
TEST(Plan, PredictsTheStepTimeOfTheMultiGpuRuns) {
  const fs::path raw = source_dir() / "bench" / "results" / "raw";
  if (!fs::exists(raw)) GTEST_SKIP() << raw << " is missing: set ZINF_SOURCE_DIR to a zinf checkout";
  const MachineRates rates =
      MachineRates::from_report((raw / "plan-validation-2026-12-02" / "bench" / "report.json").string());
  int checked = 0;
  for (const auto& [host, gpus] : {std::pair{"x2", 2}, std::pair{"x4", 4}}) {
    const fs::path dir = raw / "gpu-scaling-2026-11-22" / host / "scale";
    double plan_1 = 0.0, measured_1 = 0.0;
    for (int w = 1; w <= gpus; w *= 2) {
      SCOPED_TRACE(fmt::format("{} GPU(s) on the {} host", w, host));
      const fs::path run = dir / fmt::format("zinf-g{}", w);
      const json s = read_json(run / "summary.json");
      const PlanInputs in = inputs_from_summary(s);
      ASSERT_EQ(in.gpus, w);
      const Plan p = make_plan(in, rates);
      const double measured = median_step_seconds(run / "training_metrics.csv", 2);
      EXPECT_NEAR(p.predicted_s / measured, 1.0, 0.25) << p.text();
      EXPECT_EQ(p.bound, "host") << p.text();
      if (w == 1) {
        plan_1 = p.predicted_s;
        measured_1 = measured;
      } else {
        EXPECT_NEAR((p.predicted_s / plan_1) / (measured / measured_1), 1.0, 0.10) << p.text();
      }
      ++checked;
    }
  }
  EXPECT_EQ(checked, 5);
}

// bench/plan_validation_cpu.sh on the 2-core development machine: `zinf bench all` (its CPU step)
// and the embedded default trained for 12 steps on the CPU backend, in one invocation.
TEST(Plan, PredictsTheStepTimeOfACpuRun) {
  const fs::path dir = source_dir() / "bench" / "results" / "raw" / "plan-validation-cpu-2026-12-02";
  if (!fs::exists(dir)) GTEST_SKIP() << dir << " is missing: set ZINF_SOURCE_DIR to a zinf checkout";
  const MachineRates rates = MachineRates::from_report((dir / "bench" / "report.json").string());
  EXPECT_EQ(rates.source.at("cpu_model_tflops").rfind("measured", 0), 0u);
  const json s = read_json(dir / "run-cpu-embedded" / "summary.json");
  const PlanInputs in = inputs_from_summary(s);
  EXPECT_EQ(in.device, "cpu");
  const Plan p = make_plan(in, rates);
  EXPECT_FALSE(p.pipeline);
  EXPECT_EQ(p.bound, "compute") << p.text();
  const double measured = median_step_seconds(dir / "run-cpu-embedded" / "training_metrics.csv", 2);
  EXPECT_NEAR(p.predicted_s / measured, 1.0, 0.25) << p.text();
  EXPECT_EQ(tier(p, "gpu").total(), 0u);
}

PlanInputs bench_3b(const std::string& preset_json_overrides = "{}") {
  PlanInputs in;
  in.model = load_model_config((source_dir() / "configs" / "models" / "bench-3.1b.json").string());
  json ds = {{"train_micro_batch_size_per_gpu", 4},
             {"gradient_accumulation_steps", 1},
             {"gradient_clipping", 0.0},
             {"bf16", {{"enabled", true}}},
             {"zero_optimization",
              {{"stage", 3},
               {"offload_optimizer", {{"device", "cpu"}, {"pin_memory", true}}},
               {"offload_param", {{"device", "cpu"}, {"pin_memory", true}}},
               {"stage3_max_live_parameters", 1e9}}}};
  ds.merge_patch(json::parse(preset_json_overrides));
  in.ds = ds_from(ds, 1);
  in.micro_batch = 4;
  in.seq_len = 2048;
  return in;
}

TEST(Plan, TiersFollowTheOffloadSettings) {
  if (!fs::exists(source_dir() / "configs")) GTEST_SKIP() << "no zinf checkout at " << source_dir() << ": set ZINF_SOURCE_DIR";
  const Plan host = make_plan(bench_3b(), MachineRates{});
  const double E = 3141172224.0;  // bench-3.1b: no padding at one rank
  // fp32 master + m + v, bf16 parameters, fp32 gradient shards: 18 bytes per parameter.
  EXPECT_NEAR(static_cast<double>(tier(host, "host_pinned").total()), 18 * E, 0.01 * E);
  EXPECT_EQ(tier(host, "nvme").total(), 0u);
  EXPECT_EQ(tier(host, "nvme").verdict(), "unused");

  // Half the state on NVMe: 6 bytes per parameter there, 6 fewer pinned (plus staging buffers).
  const Plan nvme = make_plan(bench_3b(R"({"zero_optimization": {"sub_group_size": 1e8,
      "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme", "ratio": 0.5, "buffer_count": 4}}})"),
                              MachineRates{});
  EXPECT_NEAR(static_cast<double>(tier(nvme, "nvme").total()), 6 * E, 0.01 * E);
  // Staging: buffer_count slices of the largest NVMe part (half a layer, under sub_group_size).
  const double staging = 4.0 * static_cast<double>(113252352 / 2 / 2048 * 2048) * 14;
  EXPECT_NEAR(static_cast<double>(tier(nvme, "host_pinned").total()), 12 * E + staging, 0.01 * E);
  bool has_nvme_part = false;
  for (const auto& part : nvme.parts) has_nvme_part = has_nvme_part || (part.name == "nvme" && part.seconds > 0);
  EXPECT_TRUE(has_nvme_part);

  // pin_memory false: the same bytes, in the pageable tier.
  const Plan pageable = make_plan(bench_3b(R"({"zero_optimization": {"offload_optimizer": {"pin_memory": false},
      "offload_param": {"pin_memory": false}}})"),
                                  MachineRates{});
  EXPECT_EQ(tier(pageable, "host_pinned").total(), 0u);
  EXPECT_EQ(tier(pageable, "host_pageable").total(), tier(host, "host_pinned").total());

  // bf16 gradients land in the bf16 parameter shards: no gradient shards (14 bytes per parameter).
  const Plan bf16 = make_plan(bench_3b(R"({"communication_data_type": "bf16"})"), MachineRates{});
  EXPECT_NEAR(static_cast<double>(tier(bf16, "host_pinned").total()), 14 * E, 0.01 * E);

  // ratio 0.5 with device cpu: about half the parameters' state stepped on the GPU. The host keeps
  // room for all of the state (a resume may change the ratio), but not those units' gradient shards.
  const Plan share = make_plan(bench_3b(R"({"zero_optimization": {"offload_optimizer": {"ratio": 0.5}}})"), MachineRates{});
  EXPECT_GT(tier(share, "gpu").total(), tier(host, "gpu").total() + static_cast<std::uint64_t>(0.4 * E * 14));
  const double saved = static_cast<double>(tier(host, "host_pinned").total() - tier(share, "host_pinned").total());
  EXPECT_NEAR(saved, 0.5 * E * 4, 0.05 * E * 4);
}

TEST(Plan, VerdictsAndBoundsFollowTheCapacitiesAndRates) {
  if (!fs::exists(source_dir() / "configs")) GTEST_SKIP() << "no zinf checkout at " << source_dir() << ": set ZINF_SOURCE_DIR";
  PlanInputs in = bench_3b();
  in.gpu_mem = 8ull << 30;     // the GPU plan is about 10.7 GiB
  in.host_mem = 512ull << 30;  // the host plan is about 53 GiB
  Plan p = make_plan(in, MachineRates{});
  EXPECT_EQ(tier(p, "gpu").verdict(), "does not fit");
  EXPECT_EQ(tier(p, "host_pinned").verdict(), "fits");
  EXPECT_FALSE(p.fits());
  EXPECT_NE(p.text().find("DOES NOT FIT"), std::string::npos);
  EXPECT_EQ(p.to_json()["tiers"]["gpu"]["fits"], "does not fit");
  in.gpu_mem = 24ull << 30;
  p = make_plan(in, MachineRates{});
  EXPECT_TRUE(p.fits());

  // A slow host makes the host the bound; a slow GPU makes compute the bound.
  MachineRates slow_host;
  slow_host.adam_params_per_s = 1e9;
  slow_host.gpu_model_tflops = 1000;
  p = make_plan(in, slow_host);
  EXPECT_EQ(p.bound, "host");
  EXPECT_DOUBLE_EQ(p.predicted_s, p.lower_s);  // the pipeline, unclipped: the longest part
  EXPECT_GT(p.upper_s, p.lower_s);
  MachineRates slow_gpu;
  slow_gpu.adam_params_per_s = 1e11;
  slow_gpu.host_mem_GBps = 1000;
  slow_gpu.h2d_GBps = slow_gpu.d2h_GBps = slow_gpu.both_GBps = 1000;
  slow_gpu.gpu_model_tflops = 10;
  p = make_plan(in, slow_gpu);
  EXPECT_EQ(p.bound, "compute");

  // Gradient accumulation stays in the pipeline, with fp32 gradients even where
  // communication_data_type asks for bf16: the same page-locked shards as without it, the
  // uploaded sums on the GPU on top, twice the compute, and the sums' trips down and back up.
  const Plan one = make_plan(bench_3b(), MachineRates{});
  PlanInputs gas = bench_3b(R"({"gradient_accumulation_steps": 2, "communication_data_type": "bf16"})");
  gas.grad_accum = 2;
  p = make_plan(gas, MachineRates{});
  EXPECT_TRUE(p.pipeline);
  EXPECT_EQ(tier(p, "host_pinned").total(), tier(one, "host_pinned").total());
  EXPECT_GT(tier(p, "gpu").total(), tier(one, "gpu").total());
  const auto part = [](const Plan& pl, const std::string& name) {
    for (const auto& x : pl.parts) {
      if (x.name == name) return x.seconds;
    }
    return -1.0;
  };
  EXPECT_NEAR(part(p, "compute"), 2 * part(one, "compute"), 1e-9);
  EXPECT_GT(part(p, "pcie"), 2 * part(one, "pcie"));  // the uploads twice, the sum's trip on top
  EXPECT_NEAR(part(p, "host"), part(one, "host"), 0.5 * part(one, "host"));  // one optimizer step
  EXPECT_GE(p.predicted_s, p.lower_s);
  EXPECT_LE(p.predicted_s, p.upper_s);
  EXPECT_NE(p.text().find("gradient accumulation (2 micro-batches)"), std::string::npos) << p.text();
  // Several GPUs with accumulation, and fp16, take the synchronous path: the parts add up.
  gas.gpus = 2;
  gas.ds = ds_from(json::parse(R"({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                    "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}})"), 2);
  p = make_plan(gas, MachineRates{});
  EXPECT_FALSE(p.pipeline);
  EXPECT_DOUBLE_EQ(p.predicted_s, p.upper_s);
  PlanInputs f16 = bench_3b(R"({"bf16": {"enabled": false}, "fp16": {"enabled": true}})");
  p = make_plan(f16, MachineRates{});
  EXPECT_FALSE(p.pipeline);
  EXPECT_DOUBLE_EQ(p.predicted_s, p.upper_s);

  // Bad inputs are errors that say what is wrong.
  in.gpus = 0;
  EXPECT_THROW(make_plan(in, MachineRates{}), Error);
}

TEST(Plan, RatesComeFromABenchReportAndSayWhere) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("zinf-plan-test-{}", ::getpid());
  fs::create_directories(dir);
  const fs::path report = dir / "report.json";
  std::ofstream(report) << R"({"pcie": {"status": "ok", "best": {"zinf": {"pinned": {"h2d": 53.5, "d2h": 54.0, "both": 99.0}}}},
    "mem": {"status": "ok", "triad_GBps": 150.0},
    "adam": {"status": "ok", "kernels": [{"kernel": "host_step_adamw_bf16", "isa": "avx512", "params_per_s": 5.1e9},
                                         {"kernel": "host_step_adamw_bf16", "isa": "avx2", "params_per_s": 4.0e9}]},
    "io": {"status": "ok", "best": {"read_GBps": 2.4, "write_GBps": 3.5}},
    "gemm": {"status": "ok", "peak_tflops": 780.0},
    "comm": {"status": "ok", "ranks": 2, "backend": "nccl", "all_gather": {"bus_GBps": 310.0},
             "reduce_scatter": {"bus_GBps": 290.0}},
    "step": {"status": "skipped: no GPU"}})";
  const MachineRates r = MachineRates::from_report(report.string());
  EXPECT_DOUBLE_EQ(r.h2d_GBps, 53.5);
  EXPECT_DOUBLE_EQ(r.both_GBps, 99.0);
  EXPECT_DOUBLE_EQ(r.host_mem_GBps, 150.0);
  EXPECT_DOUBLE_EQ(r.adam_params_per_s, 5.1e9);  // the best ISA
  EXPECT_DOUBLE_EQ(r.nvme_write_GBps, 3.5);
  EXPECT_NEAR(r.gpu_model_tflops, 0.39 * 780, 1e-9);  // no step measured: from the GEMM peak
  EXPECT_NE(r.source.at("h2d_GBps").find("measured"), std::string::npos);
  EXPECT_DOUBLE_EQ(r.nvlink_GBps, 290.0);  // the slower of the pipeline's two collectives
  EXPECT_EQ(r.source.at("cpu_model_tflops"), "default");

  std::ofstream(dir / "bad.json") << "{not json";
  try {
    (void)MachineRates::from_report((dir / "bad.json").string());
    ADD_FAILURE() << "a broken report was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not JSON"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "empty.json") << R"({"something": 1})";
  EXPECT_THROW((void)MachineRates::from_report((dir / "empty.json").string()), Error);
  EXPECT_THROW((void)MachineRates::from_report((dir / "missing.json").string()), Error);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace zinf::runtime
