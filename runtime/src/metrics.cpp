// training_metrics.csv: see metrics.hpp.
#include "metrics.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string_view>

#include <fmt/format.h>

#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"

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
  j["last_checkpoint"] = r.last_checkpoint;
  j["deepspeed_config"] = *s.deepspeed_config;
  return j;
}

}  // namespace zinf::runtime
