// zinf tune: see tune.hpp.
#include "zinf/runtime/tune.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "zinf/common/error.hpp"
#include "zinf/configs/parse.hpp"

namespace zinf::runtime {

using nlohmann::json;

namespace {

std::string gib(std::uint64_t b) { return fmt::format("{:.1f} GiB", static_cast<double>(b) / (1ull << 30)); }

// The aio block: the io bench's settings (its sweep's best when it swept).
void tune_aio(const json& report, config::Json& cfg, std::vector<std::string>& why) {
  const json io = report.contains("io") && report["io"].is_object() ? report["io"] : json::object();
  const bool io_ok = io.value("status", "") == "ok" && io.contains("best") && io["best"].is_object() &&
                     io["best"].contains("block_size") && io["best"]["block_size"].is_number_unsigned();
  if (io_ok) {
    const json& b = io["best"];
    cfg["aio"] = {{"block_size", b["block_size"]},
                  {"queue_depth", b.value("queue_depth", 8)},
                  {"intra_op_parallelism", b.value("intra_op_parallelism", 1)},
                  {"single_submit", b.value("single_submit", false)},
                  {"overlap_events", b.value("overlap_events", true)}};
    why.push_back(fmt::format("aio: block {}, queue depth {}, {} ring(s) from the io bench ({}{})",
                              b["block_size"].get<std::uint64_t>(), b.value("queue_depth", 8), b.value("intra_op_parallelism", 1),
                              io.contains("best_read") ? "its sweep's best" : "measured, not swept",
                              io.contains("best_read") ? "" : "; `zinf bench all --io-sweep --path DIR` searches the settings"));
  } else {
    why.push_back("aio: kept (the report has no io bench: `zinf bench all --path DIR` measures the drive)");
  }
}

// With a model: the stage-3 prefetch bucket and staging sizes, then the live-parameter budget and
// the GPU's share of the optimizer whose predicted step is fastest while fitting the GPU.
std::optional<Plan> tune_for_model(const TuneRequest& req, config::LoadedDocument& doc, std::vector<std::string>& why) {
  const json& report = req.report;
  const std::string& base = req.base;
  config::Json& cfg = doc.json;
  std::optional<Plan> chosen;
  const ModelConfig& model = *req.model;
  const ModelLayout layout = make_layout(model);
  std::int64_t largest = 0, total = 0;
  for (const auto& u : layout.units) {
    largest = std::max(largest, u.numel);
    total += u.numel;
  }
  const std::int64_t layer = model.num_layers > 0 ? layout.units[layout.layer_unit(0)].numel : largest;
  std::uint64_t gpu_cap = req.gpu_mem;
  if (gpu_cap == 0) gpu_cap = report.value("machine", json::object()).value("gpu_memory_bytes", std::uint64_t{0});
  if (gpu_cap == 0) throw Error("zinf tune --model: give --gpu-mem (the report names no GPU memory)");
  const std::uint64_t gpu_usable = gpu_cap * 92 / 100;  // headroom: the CUDA context, NCCL, fragmentation
  auto& z = cfg["zero_optimization"];
  if (!z.contains("stage") || !z["stage"].is_number_integer() || z["stage"].get<int>() != 3) {
    throw Error("zinf tune --model tunes ZeRO-3 configs: {} has zero_optimization.stage {}", base,
                z.contains("stage") ? z["stage"].dump() : std::string("unset"));
  }
  if (req.seq_len > model.max_position_embeddings) {
    throw Error("--seq-len {} is longer than the model's max_position_embeddings ({})", req.seq_len,
                model.max_position_embeddings);
  }
  // A parameter staging buffer must hold a whole unit; the prefetch bucket keeps one layer coming.
  z["stage3_prefetch_bucket_size"] = layer;
  why.push_back(fmt::format("stage3_prefetch_bucket_size {}: one layer, so the next one is always on its way", layer));
  if (z.contains("offload_param") && z["offload_param"].value("device", "") == "nvme") {
    z["offload_param"]["buffer_size"] = std::max<std::int64_t>(z["offload_param"].value("buffer_size", std::int64_t{100000000}), largest);
    why.push_back(fmt::format("offload_param.buffer_size {}: holds the largest unit", z["offload_param"]["buffer_size"].get<std::int64_t>()));
  }
  if (z.contains("offload_optimizer") && z["offload_optimizer"].value("device", "") == "nvme") {
    z["sub_group_size"] = std::min<std::int64_t>(100000000, largest);
    why.push_back("sub_group_size 1e8 at most: NVMe staging buffers of bounded size");
  }
  // The live-parameter budget, and with one GPU a GPU share of the optimizer state (ratio): the
  // fastest predicted step that fits the GPU, preferring less GPU memory on a tie.
  const std::vector<double> lives = {static_cast<double>(total), 8e9, 4e9, 2e9, 1e9, 5e8, 2.5e8, 2.0 * static_cast<double>(layer)};
  std::vector<double> ratios = {1.0};
  const bool cpu_opt = z.contains("offload_optimizer") && z["offload_optimizer"].value("device", "") == "cpu";
  if (cpu_opt && req.gpus == 1 && req.device == "cuda") ratios = {1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0};
  struct Pick {
    double live = 0, ratio = 1;
    Plan plan;
  };
  const auto search = [&](const config::Json& base_cfg) {
    std::optional<Pick> best;
    config::Json trial = base_cfg;
    for (double ratio : ratios) {
      for (double live : lives) {
        if (live > static_cast<double>(total) && live != lives.front()) continue;
        trial["zero_optimization"]["stage3_max_live_parameters"] = live;
        if (cpu_opt) trial["zero_optimization"]["offload_optimizer"]["ratio"] = ratio;
        Plan p = req.plan(config::LoadedDocument{trial, doc.source, doc.chain}, gpu_usable);
        if (p.tiers[0].verdict() == "does not fit") continue;  // a smaller live budget may fit
        if (!best || p.predicted_s < best->plan.predicted_s * 0.98) best = Pick{live, ratio, p};
        break;  // the largest live budget that fits, for this ratio
      }
    }
    return best;
  };
  const auto host_fits = [](const Plan& p) {
    return p.tiers[1].verdict() != "does not fit" && p.tiers[2].verdict() != "does not fit";
  };
  std::optional<Pick> best = search(cfg);
  if ((!best || !host_fits(best->plan)) && !cfg.contains("communication_data_type")) {
    // bf16 gradients land in the bf16 parameter shards: 4 bytes per parameter less host memory.
    config::Json with_bf16 = cfg;
    with_bf16["communication_data_type"] = "bf16";
    std::optional<Pick> b = search(with_bf16);
    if (b && host_fits(b->plan)) {
      cfg = with_bf16;
      best = b;
      why.push_back("communication_data_type bf16: gradients come down and are stepped as bf16 (DeepSpeed's usual bf16 "
                    "arithmetic), so that the host memory fits");
    }
  }
  if (!best) {
    throw Error("zinf tune: {} does not fit {} of GPU memory with any live budget down to two layers ({} elements); "
                "lower --micro-batch or --seq-len, or use more GPUs",
                model.summary(), gib(gpu_cap), 2 * layer);
  }
  auto& zc = cfg["zero_optimization"];
  zc["stage3_max_live_parameters"] = best->live;
  why.push_back(fmt::format("stage3_max_live_parameters {:.3g}: the largest that fits {} (92% of {})", best->live,
                            gib(gpu_usable), gib(gpu_cap)));
  if (cpu_opt && best->ratio < 1.0) {
    zc["offload_optimizer"]["ratio"] = best->ratio;
    why.push_back(fmt::format("offload_optimizer.ratio {}: {:.0f}% of the optimizer state stepped on the GPU, the fastest "
                              "predicted step that fits",
                              best->ratio, 100 * (1 - best->ratio)));
  }
  chosen = best->plan;
  if (!host_fits(*chosen)) {
    throw Error("zinf tune: {} needs {} of host memory, more than {} usable here, even with bf16 gradients; nothing was "
                "written. Offload the optimizer state to NVMe (--nvme-path DIR), or use a machine with more memory\n\n{}",
                model.summary(), gib(chosen->tiers[1].total() + chosen->tiers[2].total()), gib(chosen->tiers[1].capacity),
                chosen->text());
  }
  return chosen;
}

}  // namespace

TuneResult tune_config(const TuneRequest& req) {
  config::LoadedDocument doc = config::load_document(req.base);
  config::Json& cfg = doc.json;
  if (!cfg.is_object() || !cfg.contains("zero_optimization") || !cfg["zero_optimization"].is_object()) {
    throw Error("--base {}: has no zero_optimization section to tune", req.base);
  }
  std::vector<std::string> why;
  tune_aio(req.report, cfg, why);
  if (!req.nvme_path.empty()) {
    auto& z = cfg["zero_optimization"];
    if (z.contains("offload_optimizer") && z["offload_optimizer"].value("device", "") == "nvme") z["offload_optimizer"]["nvme_path"] = req.nvme_path;
    if (z.contains("offload_param") && z["offload_param"].value("device", "") == "nvme") z["offload_param"]["nvme_path"] = req.nvme_path;
  }

  std::optional<Plan> chosen;
  if (req.model) {
    chosen = tune_for_model(req, doc, why);
  } else {
    why.push_back("stage-3 budgets kept: give --model (and --gpu-mem) to size them for a model");
  }
  if (req.max_grad_norm) {
    cfg["gradient_clipping"] = *req.max_grad_norm;
    why.push_back(fmt::format("gradient_clipping {} (--max-grad-norm)", *req.max_grad_norm));
  }
  // Checked before it is returned: the tuned config must parse like any other.
  config::ParseOptions popts;
  popts.allow_auto = true;
  const auto parsed = config::parse_config(cfg, popts);
  config::throw_if_errors(parsed.diagnostics, "the tuned config (a zinf bug: please report it)");
  return {cfg, why, chosen};
}

}  // namespace zinf::runtime
