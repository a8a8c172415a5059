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

}  // namespace zinf::runtime
