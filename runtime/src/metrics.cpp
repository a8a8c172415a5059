// training_metrics.csv: see metrics.hpp.
#include "metrics.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string_view>

#include <fmt/format.h>

#include <spdlog/spdlog.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/runtime/backend.hpp"
#include "zinf/runtime/coordinator.hpp"
#include "gpu_memory_plan.hpp"
#include "gradient_path.hpp"

namespace zinf::runtime {
namespace {

namespace fs = std::filesystem;

// The columns, in file order: name and how a row writes it.
struct Column {
  std::string_view name;
  std::string (*cell)(const StepMetrics&);
};
constexpr Column kColumns[] = {
    {"step", [](const StepMetrics& m) { return fmt::format("{}", m.step); }},
    {"epoch", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.epoch); }},
    {"loss", [](const StepMetrics& m) { return fmt::format("{:.6f}", m.loss); }},
    {"eval_loss", [](const StepMetrics& m) { return std::isnan(m.eval_loss) ? std::string() : fmt::format("{:.6f}", m.eval_loss); }},
    {"lr", [](const StepMetrics& m) { return fmt::format("{:.9g}", m.lr); }},
    {"grad_norm", [](const StepMetrics& m) { return fmt::format("{:.6f}", m.grad_norm); }},
    {"loss_scale", [](const StepMetrics& m) { return fmt::format("{:g}", m.loss_scale); }},
    {"skipped", [](const StepMetrics& m) { return std::string(m.skipped ? "1" : "0"); }},
    {"tokens", [](const StepMetrics& m) { return fmt::format("{}", m.tokens); }},
    {"tokens_per_s", [](const StepMetrics& m) { return fmt::format("{:.1f}", m.tokens_per_s); }},
    {"tflops", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.tflops); }},
    {"step_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.step_s); }},
    {"data_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.phases.data); }},
    {"forward_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.phases.forward); }},
    {"backward_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.phases.backward); }},
    {"optimizer_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.phases.optimizer); }},
    {"offload_io_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.phases.offload_io); }},
    {"gpu_mem_bytes", [](const StepMetrics& m) { return fmt::format("{}", m.gpu_mem_bytes); }},
    {"host_mem_bytes", [](const StepMetrics& m) { return fmt::format("{}", m.host_mem_bytes); }},
    {"nvme_bytes", [](const StepMetrics& m) { return fmt::format("{}", m.nvme_bytes); }},
    {"live_params_hwm", [](const StepMetrics& m) { return fmt::format("{}", m.live_params_hwm); }},
    {"prefetch_hits", [](const StepMetrics& m) { return fmt::format("{}", m.prefetch_hits); }},
    {"prefetch_misses", [](const StepMetrics& m) { return fmt::format("{}", m.prefetch_misses); }},
    {"param_wait_s", [](const StepMetrics& m) { return fmt::format("{:.4f}", m.param_wait_s); }},
};

}  // namespace

std::string MetricsCsv::header() {
  std::string h;
  for (const Column& c : kColumns) {
    if (!h.empty()) h += ',';
    h += c.name;
  }
  return h;
}

std::string MetricsCsv::row(const StepMetrics& m) {
  std::string r;
  for (const Column& c : kColumns) {
    if (&c != &kColumns[0]) r += ',';
    r += c.cell(m);
  }
  return r;
}

MetricsCsv::MetricsCsv(const std::string& path, std::int64_t keep_through) : path_(path) {
  bool fresh = keep_through < 0 || !fs::exists(path);
  if (!fresh) {
    std::ifstream in(path);
    std::string line, kept;
    bool header_line = true;
    while (std::getline(in, line)) {
      if (header_line) {
        kept += line + "\n";
        header_line = false;
        continue;
      }
      if (in.eof()) break;  // no newline: a line torn by a crash
      char* end = nullptr;
      const long long step = std::strtoll(line.c_str(), &end, 10);
      if (end != line.c_str() && *end == ',' && step <= keep_through) kept += line + "\n";
    }
    if (header_line) {
      fresh = true;
    } else {
      write_file_atomic(path, kept);
    }
  }
  out_.open(path, fresh ? std::ios::trunc : std::ios::app);
  if (!out_) throw Error("cannot write '{}': {}", path, errno_text(errno));
  if (fresh) out_ << header() << "\n";
}

void MetricsCsv::write(const StepMetrics& m) {
  out_ << row(m) << "\n";
  out_.flush();
  if (!out_) throw Error("writing '{}' failed: {} (disk full?)", path_, errno_text(errno));
}

// ---- RunReport

RunReport::RunReport(const Sources& s) : s_(s) {}

std::uint64_t RunReport::nvme_bytes() const {
  return s_.offload->store().nvme_state_elements() * 12 + s_.offload->store().nvme_param_elements() * 2;
}

void RunReport::open(bool resumed, std::int64_t step, const Sampler& sampler, double loss_scale) {
  const TrainOptions& o = *s_.options;
  const RunMode& m = *s_.mode;
  start_ = std::chrono::steady_clock::now();
  first_step_ = step;
  if (s_.rank == 0) {
    fs::create_directories(o.output_dir);
    write_file_atomic((fs::path(o.output_dir) / "deepspeed_config_auto.json").string(), o.ds_resolved.dump(2) + "\n");
    csv_.emplace((fs::path(o.output_dir) / "training_metrics.csv").string(), resumed ? step : -1);
  }
  spdlog::info("model {}: {} parameters, {} layers, hidden {}, vocab {}; {} training", o.model_source,
               s_.layout->parameter_count(), o.model.num_layers, o.model.hidden_size, o.model.vocab_size,
               m.param_dtype == kernels::cpu::DType::kBF16 ? "bf16 mixed-precision"
               : o.ds.fp16.enabled ? fmt::format("fp16 (fp16 weights, fp32 products; loss scale {})", loss_scale)
                                   : std::string("fp32"));
  spdlog::info("data {}: {} tokens, {} training and {} held-out samples of {} tokens", o.data->name(), o.data->size(),
               sampler.train_samples(), sampler.eval_samples(), o.seq_len);
  spdlog::info("{} steps of {} x {} micro-batches on {} rank(s) ({} tokens per step); {}", s_.total_steps, o.ds.batch.micro,
               o.ds.batch.gas, s_.world, s_.tokens_per_step, s_.offload->store().describe());
  const auto& z = o.ds.zero;
  if (m.stage3) {
    spdlog::info("ZeRO stage 3 over {} rank(s): parameters gathered per use, at most {} live (+ the unit in use), "
                 "prefetch {} ahead, reuse distance {}, {} elements persistent; gradients reduced in buckets of {}",
                 s_.world, z.max_live_parameters, z.prefetch_bucket_size, z.max_reuse_distance,
                 s_.coord->take_stats().persistent_elements, z.reduce_bucket_size);
  } else {
    spdlog::info("ZeRO stage {} over {} rank(s){}", z.stage, s_.world,
                 m.partition_grads ? fmt::format("; gradients reduced in buckets of {}", z.reduce_bucket_size) : "");
  }
}

void RunReport::step(StepMetrics row, bool last) {
  const TrainOptions& o = *s_.options;
  // The parameter coordinator's counters for the step (stages 0-2: every parameter is gathered
  // all the time), folded into the run's totals.
  CoordinatorStats cs;
  if (s_.coord != nullptr) {
    cs = s_.coord->take_stats();
  } else {
    cs.live_high_water = s_.layout->total_numel();
    cs.persistent_elements = s_.layout->total_numel();
  }
  run_params_.add(cs);
  row.tokens_per_s = static_cast<double>(s_.tokens_per_step) / row.step_s;
  row.tflops = s_.flops_per_token * row.tokens_per_s / 1e12;
  row.gpu_mem_bytes = s_.backend->memory_peak();
  row.host_mem_bytes = s_.offload->memory().used();
  row.nvme_bytes = nvme_bytes();
  row.live_params_hwm = cs.live_high_water;
  row.prefetch_hits = cs.hits;
  row.prefetch_misses = cs.misses;
  row.param_wait_s = cs.wait_seconds;
  if (csv_) csv_->write(row);
  if (s_.rank != 0) return;
  if (o.on_progress) {
    StepProgress p;
    p.step = row.step;
    p.total_steps = s_.total_steps;
    p.loss = row.loss;
    p.eval_loss = row.eval_loss;
    p.lr = row.lr;
    p.tokens_per_s = row.tokens_per_s;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    p.eta_s = elapsed / static_cast<double>(row.step - first_step_) * static_cast<double>(s_.total_steps - row.step);
    const auto every = o.ds.steps_per_print.value_or(0);
    p.milestone = !std::isnan(row.eval_loss) || (every > 0 && row.step % every == 0);
    p.last = last;
    o.on_progress(p);
  }
  if (o.ds.wall_clock_breakdown) {
    const PhaseTimes& t = row.phases;
    spdlog::info("step {}: data {:.3f}s forward {:.3f}s backward {:.3f}s optimizer {:.3f}s (offload I/O wait {:.3f}s) "
                 "grad norm {:.4f}",
                 row.step, t.data, t.forward, t.backward, t.optimizer, t.offload_io, row.grad_norm);
  }
}

void RunReport::summary(const TrainResult& r, std::int64_t first_step, std::uint64_t tokens_seen, const Sampler& sampler) {
  if (s_.rank != 0) return;
  const TrainOptions& o = *s_.options;
  RunSummary s;
  s.result = &r;
  s.model_source = o.model_source;
  s.model = model_config_json(o.model);
  s.parameters = s_.layout->parameter_count();
  s.param_dtype = kernels::cpu::dtype_name(s_.mode->param_dtype);
  s.data_source = o.data->name();
  s.data_tokens = o.data->size();
  s.seq_len = o.seq_len;
  s.train_samples = sampler.train_samples();
  s.eval_samples = sampler.eval_samples();
  s.steps_this_run = r.steps - first_step;
  s.tokens_seen = tokens_seen;
  s.tokens_this_run = static_cast<double>(s.steps_this_run) * static_cast<double>(s_.tokens_per_step);
  s.flops_per_token = s_.flops_per_token;
  s.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  s.gpu_peak_bytes = s_.backend->memory_peak();
  s.host_pinned_bytes = s_.offload->memory().used();
  s.nvme_bytes = nvme_bytes();
  s.zero = &o.ds.zero;
  s.world = s_.world;
  s.buckets_reduced = s_.path->buckets_reduced();
  s.params = run_params_;
  for (const auto& u : s_.layout->units) s.largest_unit = std::max(s.largest_unit, u.numel);
  s.backend = s_.backend->name();
  s.mode = s_.mode;
  s.deepspeed_config = &o.ds_resolved;
  if (s_.gpu_plan != nullptr) {
    s.gpu_memory = {{"limit_bytes", s_.backend->memory_limit()},
                    {"planned_bytes", s_.gpu_plan->total()},
                    {"peak_bytes", s_.backend->memory_peak()},
                    {"planned", s_.gpu_plan->to_json()}};
  }
  s_.path->describe(s.path_sections);
  const config::Json j = run_summary(s);
  write_file_atomic((fs::path(o.output_dir) / "summary.json").string(), j.dump(2) + "\n");
}

config::Json run_summary(const RunSummary& s) {
  using config::Json;
  const TrainResult& r = *s.result;
  const auto nullable = [](double v) { return std::isnan(v) ? Json(nullptr) : Json(v); };
  Json j;
  j["model"] = {{"source", s.model_source}, {"config", s.model}, {"parameters", s.parameters}, {"param_dtype", s.param_dtype}};
  j["data"] = {{"source", s.data_source}, {"tokens", s.data_tokens}, {"seq_len", s.seq_len},
               {"train_samples", s.train_samples}, {"eval_samples", s.eval_samples}};
  j["steps"] = r.steps;
  j["steps_this_run"] = s.steps_this_run;
  j["stopped_early"] = r.stopped_early;
  j["tokens_seen"] = s.tokens_seen;
  j["first_loss"] = r.first_loss;
  j["final_loss"] = r.final_loss;
  j["final_eval_loss"] = nullable(r.final_eval_loss);
  j["best_eval_loss"] = nullable(r.best_eval_loss);
  const double wall = s.wall_seconds;
  j["throughput"] = {{"tokens_per_s", wall > 0 ? s.tokens_this_run / wall : 0.0},
                     {"model_tflops", wall > 0 ? s.tokens_this_run * s.flops_per_token / wall / 1e12 : 0.0}};
  j["peak_memory_bytes"] = {{"gpu", s.gpu_peak_bytes}, {"host_pinned", s.host_pinned_bytes}, {"nvme", s.nvme_bytes}};
  const config::ZeroConfig& z = *s.zero;
  const CoordinatorStats& ps = s.params;
  j["zero"] = {{"stage", z.stage},
               {"world_size", s.world},
               {"reduce_bucket_size", z.reduce_bucket_size},
               {"gradient_buckets_reduced", s.buckets_reduced},
               {"max_live_parameters", z.max_live_parameters},
               {"prefetch_bucket_size", z.prefetch_bucket_size},
               {"max_reuse_distance", z.max_reuse_distance},
               {"param_persistence_threshold", z.param_persistence_threshold},
               {"live_params_high_water", ps.live_high_water},
               {"prefetch_ahead_high_water", ps.ahead_high_water},
               {"persistent_params", ps.persistent_elements},
               {"gpu_resident_params", ps.adopted_elements},
               {"largest_unit", s.largest_unit},
               {"prefetch_hits", ps.hits},
               {"prefetch_misses", ps.misses},
               {"param_gathers", ps.gathers},
               {"param_gathered_elements", ps.gathered_elements},
               {"param_wait_seconds", ps.wait_seconds}};
  j["wall_seconds"] = wall;
  j["backend"] = s.backend;
  if (!s.gpu_memory.is_null()) j["gpu_memory"] = s.gpu_memory;
  // The overlapped GPU step (docs/gpu.md), and the dtype its gradients travel in.
  const RunMode& m = *s.mode;
  j["gpu_pipeline"] = {{"enabled", m.pipeline},
                       {"gradient_dtype", m.pipeline ? kernels::cpu::dtype_name(m.grad_dtype) : "fp32"},
                       {"gradients_in_parameter_shards", m.grads_in_params},
                       {"gpu_optimizer_units", m.gpu_units},
                       {"gpu_optimizer_elements", m.gpu_elements},
                       {"gpus", m.pipeline ? m.world : 1},
                       {"gpu_collectives", m.nccl ? "nccl" : "none"}};
  for (const auto& [key, value] : s.path_sections.items()) j[key] = value;
  j["last_checkpoint"] = r.last_checkpoint;
  j["deepspeed_config"] = *s.deepspeed_config;
  return j;
}

}  // namespace zinf::runtime
