// `zinf plan`: see plan.hpp.
#include "zinf/runtime/plan.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <cmath>
#include <fstream>
#include <sstream>

#include "zinf/common/error.hpp"
#include "zinf/offload/offload.hpp"
#include "zinf/offload/placement.hpp"
#include "zinf/runtime/model.hpp"
#include "zinf/runtime/flops.hpp"
#include "zinf/runtime/run_mode.hpp"
#include "gpu_memory_plan.hpp"

namespace zinf::runtime {
namespace {

using nlohmann::json;
using config::OffloadDevice;

constexpr double kGB = 1e9;

std::string gib(std::uint64_t b) { return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1ull << 30)); }

const json* find(const json& j, std::initializer_list<const char*> path) {
  const json* p = &j;
  for (const char* k : path) {
    if (!p->is_object() || !p->contains(k)) return nullptr;
    p = &(*p)[k];
  }
  return p;
}

double positive(const json* v) { return v != nullptr && v->is_number() && v->get<double>() > 0 ? v->get<double>() : 0.0; }

}  // namespace

MachineRates::MachineRates() {
  for (const char* k : {"h2d_GBps", "d2h_GBps", "both_GBps", "host_mem_GBps", "adam_params_per_s", "nvme_read_GBps",
                        "nvme_write_GBps", "gpu_model_tflops", "gemm_peak_tflops", "nvlink_GBps", "cpu_model_tflops"}) {
    source[k] = "default";
  }
}

nlohmann::json MachineRates::read_report(const std::string& path, const std::string& option) {
  std::ifstream in(path);
  if (!in) throw Error("{} {}: cannot read the file (write one with `zinf bench all --report DIR`: DIR/report.json)", option, path);
  std::stringstream ss;
  ss << in.rdbuf();
  json r;
  try {
    r = json::parse(ss.str());
  } catch (const std::exception& e) {
    throw Error("{} {}: not JSON ({}); give the output of `zinf bench all --json`", option, path, e.what());
  }
  if (!r.is_object()) throw Error("{} {}: not a zinf bench report (a JSON object is expected)", option, path);
  return r;
}

MachineRates MachineRates::from_report(const std::string& path, const std::string& option) {
  return from_report_json(read_report(path, option), path, option);
}

MachineRates MachineRates::from_report_json(const nlohmann::json& r, const std::string& path, const std::string& option) {
  try {
    return rates_of(r, path, option);
  } catch (const json::exception& e) {
    throw Error("{} {}: a figure has the wrong type ({}); give the unedited output of `zinf bench all --json`", option,
                path, e.what());
  }
}

MachineRates MachineRates::rates_of(const nlohmann::json& r, const std::string& path, const std::string& option) {
  MachineRates m;
  int taken = 0;
  const std::string src = fmt::format("measured ({})", path);
  const auto take = [&](double& field, const char* name, double v) {
    if (v > 0) {
      field = v;
      m.source[name] = src;
      ++taken;
    }
  };
  // Sections of `zinf bench all`, or a sub-bench's own JSON (the same keys at the top level).
  const json* pcie = find(r, {"pcie"});
  if (pcie == nullptr && find(r, {"best", "zinf"}) != nullptr) pcie = &r;
  if (pcie != nullptr) {
    take(m.h2d_GBps, "h2d_GBps", positive(find(*pcie, {"best", "zinf", "pinned", "h2d"})));
    take(m.d2h_GBps, "d2h_GBps", positive(find(*pcie, {"best", "zinf", "pinned", "d2h"})));
    take(m.both_GBps, "both_GBps", positive(find(*pcie, {"best", "zinf", "pinned", "both"})));
  }
  double triad = positive(find(r, {"mem", "triad_GBps"}));
  if (triad == 0) triad = positive(find(r, {"adam", "stream_triad_GBps"}));
  if (triad == 0) triad = positive(find(r, {"stream_triad_GBps"}));
  if (triad == 0) triad = positive(find(r, {"triad_GBps"}));
  take(m.host_mem_GBps, "host_mem_GBps", triad);
  const json* kernels = find(r, {"adam", "kernels"});
  if (kernels == nullptr) kernels = find(r, {"kernels"});
  if (kernels != nullptr && kernels->is_array()) {
    // The host step with bf16 gradients in (28 bytes per parameter), or with fp32 ones scaled to it.
    double best = 0;
    for (const auto& k : *kernels) {
      if (!k.is_object()) continue;
      const std::string name = k.value("kernel", "");
      const double pps = k.value("params_per_s", 0.0);
      if (name == "host_step_adamw_bf16") best = std::max(best, pps);
      if (name == "host_step_adamw_fp32") best = std::max(best, pps * 30.0 / 28.0);
    }
    take(m.adam_params_per_s, "adam_params_per_s", best);
  }
  const json* io = find(r, {"io"});
  if (io == nullptr && r.contains("points")) io = &r;
  if (io != nullptr && io->is_object()) {
    take(m.nvme_read_GBps, "nvme_read_GBps", positive(find(*io, {"best", "read_GBps"})));
    take(m.nvme_write_GBps, "nvme_write_GBps", positive(find(*io, {"best", "write_GBps"})));
  }
  double peak = positive(find(r, {"gemm", "peak_tflops"}));
  if (peak == 0) peak = positive(find(r, {"peak_tflops"}));
  take(m.gemm_peak_tflops, "gemm_peak_tflops", peak);
  if (const json* st = find(r, {"step"}); st != nullptr && st->is_object()) {
    const bool cuda = st->value("backend", std::string()).rfind("cuda", 0) == 0;
    take(cuda ? m.gpu_model_tflops : m.cpu_model_tflops, cuda ? "gpu_model_tflops" : "cpu_model_tflops",
         positive(find(*st, {"model_tflops"})));
  }
  if (m.source["gpu_model_tflops"] == "default" && m.gemm_peak_tflops > 0) {
    // zinf's resident step reached 39% of the measured GEMM peak on an H200 (bench/results/gpu.md).
    m.gpu_model_tflops = 0.39 * m.gemm_peak_tflops;
    m.source["gpu_model_tflops"] = src + ", 0.39 x the GEMM peak";
  }
  // NCCL between the GPUs: the slower of all-gather and reduce-scatter (what the pipeline issues).
  if (const json* comm = find(r, {"comm"}); comm != nullptr && comm->is_object() && comm->value("backend", "") == "nccl") {
    const double ag = positive(find(*comm, {"all_gather", "bus_GBps"})), rs = positive(find(*comm, {"reduce_scatter", "bus_GBps"}));
    take(m.nvlink_GBps, "nvlink_GBps", ag > 0 && rs > 0 ? std::min(ag, rs) : 0.0);
  }
  if (taken == 0) {
    throw Error("{} {}: no figure zinf plan can use (expected the output of `zinf bench all --json`, or of "
                "`zinf bench pcie|mem|adam|io|gemm --json`)",
                option, path);
  }
  return m;
}

json MachineRates::to_json() const {
  json j = {{"h2d_GBps", h2d_GBps},
            {"d2h_GBps", d2h_GBps},
            {"both_GBps", both_GBps},
            {"host_mem_GBps", host_mem_GBps},
            {"adam_params_per_s", adam_params_per_s},
            {"nvme_read_GBps", nvme_read_GBps},
            {"nvme_write_GBps", nvme_write_GBps},
            {"gpu_model_tflops", gpu_model_tflops},
            {"gemm_peak_tflops", gemm_peak_tflops},
            {"nvlink_GBps", nvlink_GBps},
            {"cpu_model_tflops", cpu_model_tflops}};
  j["source"] = source;
  return j;
}

std::uint64_t TierPlan::total() const {
  std::uint64_t t = 0;
  for (const auto& i : items) t += i.bytes;
  return t;
}

std::string TierPlan::verdict() const {
  if (total() == 0) return "unused";
  if (capacity == 0) return "unknown";
  return total() <= capacity ? "fits" : "does not fit";
}

bool Plan::fits() const {
  return std::none_of(tiers.begin(), tiers.end(), [](const TierPlan& t) { return t.verdict() == "does not fit"; });
}

Plan make_plan(const PlanInputs& in, const MachineRates& rates) {
  const ModelConfig& c = in.model;
  const config::DeepSpeedConfig& ds = in.ds;
  const config::ZeroConfig& z = ds.zero;
  if (in.gpus < 1) throw Error("--gpus must be at least 1, not {}", in.gpus);
  if (in.micro_batch < 1 || in.seq_len < 1 || in.grad_accum < 1) {
    throw Error("micro-batch, sequence length and gradient accumulation must be at least 1");
  }
  if (in.device != "cuda" && in.device != "cpu") throw Error("--device must be cuda or cpu, not '{}'", in.device);
  Plan p;
  p.rates = rates;
  const bool gpu = in.device == "cuda";
  const std::uint64_t W = static_cast<std::uint64_t>(in.gpus);
  const bool lora = in.lora.enabled();
  std::optional<LoraLayout> lora_layout;
  if (lora) lora_layout.emplace(make_lora_layout(in.model, in.lora));
  const std::uint64_t lora_numel = lora ? static_cast<std::uint64_t>(lora_layout->numel) : 0;
  const ModelLayout layout = make_layout(c);
  const std::size_t U = layout.units.size();
  // The trainer's own decisions (run_mode.hpp): pipeline, NCCL, dtypes, the GPU's share, shards.
  RunModeInputs mi = RunModeInputs::from_config(ds);
  mi.world = in.gpus;
  mi.lora = lora;
  mi.device = in.device;
  mi.grad_accum = in.grad_accum;
  for (const auto& u : layout.units) mi.units.push_back(u.numel);
  const RunMode mode = decide_run_mode(mi);
  const bool stage3 = mode.stage3;
  const bool bf16 = mode.param_dtype == kernels::cpu::DType::kBF16;
  const std::uint64_t pb = bf16 ? 2 : 4;  // compute copy of a parameter (fp16 runs keep fp32 copies)
  std::vector<std::uint64_t> numel(U), shard(U);
  std::uint64_t E = 0, largest = 0;
  for (std::size_t u = 0; u < U; ++u) {
    numel[u] = static_cast<std::uint64_t>(layout.units[u].numel);
    shard[u] = static_cast<std::uint64_t>(mode.shard[u]);
    E += numel[u];
    largest = std::max(largest, numel[u]);
  }
  std::uint64_t S = 0;  // this rank's elements
  for (auto s : shard) S += s;
  p.pipeline = mode.pipeline;
  const bool nccl = mode.nccl;
  const bool bf16_grads = mode.grad_dtype == kernels::cpu::DType::kBF16;
  const std::uint64_t gbytes = bf16_grads ? 2 : 4;
  std::vector<bool> on_gpu(U, false);
  for (std::size_t u = 0; u < U; ++u) on_gpu[u] = mode.on_gpu[u] != 0;
  const std::uint64_t gpu_share = mode.gpu_elements;
  for (const auto& n : mode.notes) {
    if (n.rfind("offload_optimizer.ratio", 0) == 0) p.notes.push_back(n);
  }

  // ---- GPU (per GPU): the trainer's own plan (gpu_memory_plan.cpp), the same function.
  TierPlan g{"gpu", {}, in.gpu_mem};
  if (gpu) {
    GpuMemoryInputs gi;
    gi.model = &c;
    gi.mode = &mode;
    gi.zero = &z;
    gi.micro = in.micro_batch;
    gi.seq = in.seq_len;
    gi.grad_accum = in.grad_accum;
    gi.model_options.param_dtype = mode.param_dtype;
    gi.model_options.checkpoint_activations = true;
    gi.model_options.lora = in.lora;
    gi.lora_numel = lora_numel;
    gi.lora_state_on_gpu = !in.lora_offload_optimizer;
    const GpuMemoryPlan gp = plan_gpu_memory(gi);
    g.items = {{"parameters (live budget + one unit)", gp.params},
               {"gradient buffers", gp.grads},
               {"activations (checkpointed)", gp.activations},
               {"scratch", gp.scratch}};
    if (gp.optimizer > 0) g.items.push_back({"optimizer share (offload_optimizer.ratio)", gp.optimizer});
    if (gp.adapters > 0) {
      g.items.push_back({in.lora_offload_optimizer ? "LoRA adapters and their gradients (fp32)"
                                                   : "LoRA adapters, gradients and Adam moments (fp32)",
                         gp.adapters});
    }
    g.items.push_back({"other", gp.other});
    p.notes.push_back("GPU bytes are zinf's own allocations; the CUDA context and NCCL take about 0.5-1 GiB more");
  }
  p.tiers.push_back(g);

  // ---- Host (all ranks on this machine): the partition store's plan, per rank, times the ranks.
  const bool pin = !((z.offload_optimizer && !z.offload_optimizer->pin_memory) || (z.offload_param && !z.offload_param->pin_memory));
  // The partition store's own placement of this rank's shards (offload/placement.cpp).
  offload::StoreOptions so = offload::store_options(ds);
  so.gpu_units = mode.on_gpu;
  if (lora) {  // the frozen base: bf16 shards only, per offload_param
    so.frozen = true;
    so.nvme_ratio = 0.0;
  }
  std::vector<offload::UnitSpec> specs;
  for (std::size_t u = 0; u < U; ++u) specs.push_back({layout.units[u].name, shard[u]});
  const offload::Placement placed = offload::place_units(specs, so);
  const std::uint64_t host_state = placed.host_state_bytes, host_params = placed.host_param_bytes;
  const std::uint64_t staging = placed.staging_bytes();
  const std::uint64_t nvme_state = placed.nvme_state_elems * 12, nvme_params = placed.nvme_param_elems * 2;
  // Gradients: the pipeline's page-locked shards (none when bf16 gradients land in the bf16
  // parameter shards), or the synchronous path's pageable fp32 shards.
  std::uint64_t pinned_grads = 0, pageable = 0;
  for (std::size_t u = 0; u < U; ++u) {
    pinned_grads += mode.pinned_gradient_bytes(u);
    pageable += mode.pageable_gradient_bytes(u);
  }
  TierPlan hp{"host_pinned", {}, 0};
  TierPlan hpage{"host_pageable", {}, 0};
  std::vector<PlanItem> host = {{"optimizer state (fp32 master, m, v)", host_state * W},
                                {"parameters (bf16)", host_params * W},
                                {"gradient shards", pinned_grads * W},
                                {"NVMe staging buffers", staging * W}};
  (pin ? hp : hpage).items = host;
  if (!gpu) {
    // The CPU backend holds the model, its gradients and activations in ordinary memory.
    ModelOptions mo;
    mo.param_dtype = bf16 ? kernels::cpu::DType::kBF16 : kernels::cpu::DType::kF32;
    mo.checkpoint_activations = true;
    hpage.items.push_back({lora ? "CPU backend: parameters (frozen, no gradients)" : "CPU backend: parameters + gradients",
                           E * (pb + (lora ? 0 : 4)) * W});
    hpage.items.push_back({"CPU backend: activations", Model::activation_bytes_for(c, in.micro_batch, in.seq_len, mo) * W});
  }
  if (pageable > 0) hpage.items.push_back({"gradient shards (synchronous path)", pageable * W});
  if (lora && (in.lora_offload_optimizer || !gpu)) {
    hpage.items.push_back({"LoRA adapters' Adam state (master, m, v) and gradients", lora_numel * 16 * W});
  }
  // One capacity for both host tiers, less what the trainer's preflight keeps free for the
  // process and the OS (offload::host_memory_reserve_bytes: 5% of the memory, at least 4 GiB);
  // the pinned tier is judged against it, the pageable one against what the pinned one leaves.
  if (in.host_mem > 0) {
    const std::uint64_t reserve = std::max<std::uint64_t>(4ull << 30, in.host_mem / 20);
    const std::uint64_t usable = in.host_mem > reserve ? in.host_mem - reserve : 1;
    hp.capacity = usable;
    hpage.capacity = usable > hp.total() ? usable - hp.total() : 1;
    p.notes.push_back(fmt::format("host memory: {} of {} counted usable ({} stays free for the process and the OS, as "
                                  "the trainer's preflight requires)",
                                  gib(usable), gib(in.host_mem), gib(reserve)));
  }
  p.tiers.push_back(hp);
  p.tiers.push_back(hpage);
  TierPlan nv{"nvme", {}, in.nvme};
  if (nvme_state > 0) nv.items.push_back({"optimizer state (offload_optimizer.ratio)", nvme_state * W});
  if (nvme_params > 0) nv.items.push_back({"parameters (offload_param nvme)", nvme_params * W});
  p.tiers.push_back(nv);

  // ---- Step time (per rank; every rank does the same).
  const double tokens = static_cast<double>(in.micro_batch * in.seq_len * in.grad_accum);
  p.tokens_per_step = tokens;
  const double flops = (lora ? lora_training_flops_per_token(c, in.seq_len, *lora_layout) : training_flops_per_token(c, in.seq_len)) * tokens;
  // The measured rate is of full training, whose model FLOPs (6 per parameter) leave out the
  // checkpointed forward's recomputation (2 more: 8/6 of them run). LoRA's model FLOPs (4 per
  // base parameter) leave out the same 2, so 6/4 of them run: 1.125 times the time per FLOP.
  const double compute_s = flops * (lora ? 1.125 : 1.0) / ((gpu ? rates.gpu_model_tflops : rates.cpu_model_tflops) * 1e12);
  p.parts.push_back({"compute", compute_s,
                     fmt::format("{:.1f} model TFLOP at {:.0f} TFLOP/s", flops / 1e12,
                                 gpu ? rates.gpu_model_tflops : rates.cpu_model_tflops)});
  // (LoRA: the host steps the adapters only, and only when their optimizer is offloaded.)
  const double host_elems = lora ? (in.lora_offload_optimizer || !gpu ? static_cast<double>(lora_numel) : 0.0)
                                 : static_cast<double>(S - (W == 1 ? gpu_share : 0));
  double h2d = 0, d2h = 0;
  if (gpu) {
    // Stage 3 gathers each unit for forward, recomputation and backward, except what the live
    // budget still holds at the turn; each rank uploads its own shard (NCCL gathers the rest).
    double gathered = static_cast<double>(E);
    if (stage3) {
      const double live = static_cast<double>(std::max<std::int64_t>(z.max_live_parameters, 0));
      gathered = 3.0 * static_cast<double>(E - gpu_share) - std::min(live, static_cast<double>(E - gpu_share)) * 0.7;
    }
    h2d = gathered * static_cast<double>(pb) / static_cast<double>(nccl ? W : 1) * static_cast<double>(in.grad_accum);
    // The pipeline brings this rank's host shards down once per micro-batch (accumulation: the
    // sum so far, which goes back up to be added, except after the last).
    const double host_shards = static_cast<double>(S) - static_cast<double>(W == 1 ? gpu_share : 0);
    d2h = host_shards * static_cast<double>(gbytes) * static_cast<double>(in.grad_accum);
    if (p.pipeline) h2d += host_shards * 4 * static_cast<double>(in.grad_accum - 1);
    // The synchronous path brings each unit's whole fp32 gradient down every micro-batch.
    if (!p.pipeline) d2h = static_cast<double>(E) * 4 * static_cast<double>(in.grad_accum);
    if (lora) {
      // Stages 0-2 upload the frozen base once; only the adapters move each step (their gradients
      // down and back up to be summed over ranks, or stepped on the host).
      if (!stage3) h2d = 0;
      const bool moves = W > 1 || in.lora_offload_optimizer;
      d2h = moves ? static_cast<double>(lora_numel) * 4 : 0.0;
      h2d += moves ? static_cast<double>(lora_numel) * 4 : 0.0;
    }
    const double pcie_s = std::max({h2d / (rates.h2d_GBps * kGB), d2h / (rates.d2h_GBps * kGB),
                                    (h2d + d2h) / (rates.both_GBps * kGB)});
    p.parts.push_back({"pcie", pcie_s, fmt::format("{:.1f} GB up, {:.1f} GB down", h2d / kGB, d2h / kGB)});
  }
  // The host: the optimizer step of this rank's host elements (all ranks share the cores, so the
  // machine's rate divides among them) plus the copies' trips through host memory.
  const double adam_rate = rates.adam_params_per_s * (gbytes == 4 ? 28.0 / 30.0 : 1.0) / static_cast<double>(W);
  const double adam_s = host_elems / adam_rate;
  const double host_s = adam_s + (h2d + d2h) * static_cast<double>(W) / (rates.host_mem_GBps * kGB);
  p.parts.push_back({"host", host_s,
                     fmt::format("AdamW on {:.2f}G elements at {:.2f} Gparam/s per rank, plus {:.1f} GB of copies "
                                 "through host memory at {:.0f} GB/s",
                                 host_elems / 1e9, adam_rate / 1e9, (h2d + d2h) * static_cast<double>(W) / kGB,
                                 rates.host_mem_GBps)});
  if (nvme_state + nvme_params > 0) {
    // Every step reads and writes the state on NVMe, and reads parameters there (forward and
    // backward), for all ranks on the machine's drive(s).
    const double rd = static_cast<double>(nvme_state * W) + 3.0 * static_cast<double>(nvme_params * W);
    // (A frozen base is read, never written back.)
    const double wr = static_cast<double>(nvme_state * W) + (lora ? 0.0 : static_cast<double>(nvme_params * W));
    const double s = rd / (rates.nvme_read_GBps * kGB) + wr / (rates.nvme_write_GBps * kGB);
    p.parts.push_back({"nvme", s, fmt::format("{:.1f} GB read, {:.1f} GB written", rd / kGB, wr / kGB)});
  }
  if (W > 1) {
    const double wf = static_cast<double>(W - 1) / static_cast<double>(W);
    const double gas = static_cast<double>(in.grad_accum);
    double bytes = nccl || stage3 ? (3.0 * static_cast<double>(E) * static_cast<double>(pb) + static_cast<double>(E) * 4) * wf * gas
                                  : 2.0 * static_cast<double>(E) * 4 * wf * gas;
    if (lora) {
      // The base's gathers at stage 3 (no gradient reduction), and the adapters' all-reduce.
      bytes = (stage3 ? 3.0 * static_cast<double>(E) * static_cast<double>(pb) * wf * gas : 0.0) +
              2.0 * static_cast<double>(lora_numel) * 4 * wf;
    }
    const double bw = nccl ? rates.nvlink_GBps : std::min(rates.host_mem_GBps / 4, 10.0);
    p.parts.push_back({"gpu_collectives", bytes / (bw * kGB),
                       fmt::format("{:.1f} GB per rank over {}", bytes / kGB, nccl ? "NCCL" : "the host (Gloo)")});
  }
  double sum = 0, mx = 0;
  for (const auto& part : p.parts) {
    sum += part.seconds;
    if (part.seconds > mx) {
      mx = part.seconds;
      p.bound = part.name;
    }
  }
  p.lower_s = mx;
  p.upper_s = sum;
  const bool clip = ds.gradient_clipping > 0;
  if (lora) {
    // Nothing to overlap the adapters' small step with; the prefetch overlaps the base's uploads
    // (and NVMe reads) with compute.
    double overlapped = 0, after = 0;
    for (const auto& part : p.parts) {
      if (part.name == "gpu_collectives" || (part.name == "host" && host_elems > 0)) {
        after += part.seconds;  // the adapters' reduction and host step follow backward
      } else {
        overlapped = std::max(overlapped, part.seconds);
      }
    }
    p.predicted_s = overlapped + after;
    p.notes.push_back(fmt::format("LoRA: {} adapters ({} trainable parameters) on a frozen bf16 base: no base "
                                  "gradients or optimizer state; base uploads and NVMe reads overlap compute",
                                  lora_layout->adapters.size(), lora_layout->parameter_count()));
  } else if (p.pipeline && !clip && in.grad_accum == 1) {
    // Gradients land and are stepped during backward, and the next forward follows the step.
    p.predicted_s = mx;
  } else if (p.pipeline && !clip) {
    // Gradient accumulation: the units are stepped as the last micro-batch's gradients land, so
    // the optimizer has that micro-batch's backward and the next step's first forward (one
    // micro-batch's compute) to overlap; the earlier micro-batches run before it.
    const double gas = static_cast<double>(in.grad_accum);
    const double micro = compute_s / gas;
    const double window = adam_s + (h2d + d2h) / gas * static_cast<double>(W) / (rates.host_mem_GBps * kGB);
    const double t = compute_s - micro + std::max(micro, window);
    p.predicted_s = std::max(mx, t);
    if (t > mx) p.bound = window > micro ? "host" : "compute";
    p.notes.push_back(fmt::format("gradient accumulation ({} micro-batches): the gradients' sums go down and back up "
                                  "each micro-batch, and the optimizer overlaps the last one's backward and the next "
                                  "step's first forward",
                                  in.grad_accum));
  } else if (p.pipeline) {
    // Clipping: the step waits for the global norm after backward, so backward (with the
    // gradients' copies) runs alone, then the optimizer overlaps the next forward (with its
    // uploads): forward is a quarter of a checkpointed micro-batch's products.
    const double fwd = 0.25 * compute_s / static_cast<double>(in.grad_accum), bwd = compute_s - fwd;
    const double fwd_up = gpu ? (stage3 ? static_cast<double>(E - gpu_share) : 0.0) * static_cast<double>(pb) : 0.0;
    const double step_s = adam_s + fwd_up / (rates.host_mem_GBps * kGB);
    double nvme_s = 0;
    for (const auto& part : p.parts) {
      if (part.name == "nvme") nvme_s = part.seconds;
    }
    const double tail = std::max({fwd, step_s, nvme_s});
    p.predicted_s = std::max(mx, bwd + tail);
    if (bwd + tail > mx) p.bound = tail == fwd ? "compute" : (tail == nvme_s ? "nvme" : "host");
    p.notes.push_back("gradient clipping: the optimizer waits for the global norm after backward (it then overlaps "
                      "the next forward)");
  } else {
    p.predicted_s = sum;
    p.notes.push_back(gpu ? "the synchronous path (fp16, stages 0-1, several GPUs below stage 3 or with gradient "
                            "accumulation): the parts run one after another"
                          : "the CPU backend: the parts run one after another");
  }
  return p;
}

json Plan::to_json() const {
  json j;
  json ts = json::object();
  for (const auto& t : tiers) {
    json items = json::object();
    for (const auto& i : t.items) items[i.what] = i.bytes;
    ts[t.name] = {{"bytes", t.total()}, {"capacity", t.capacity}, {"fits", t.verdict()}, {"items", items}};
  }
  j["tiers"] = ts;
  j["fits"] = fits();
  json pj = json::object();
  for (const auto& p : parts) pj[p.name] = {{"seconds", p.seconds}, {"detail", p.detail}};
  j["step"] = {{"pipeline", pipeline},
               {"parts", pj},
               {"lower_s", lower_s},
               {"upper_s", upper_s},
               {"predicted_s", predicted_s},
               {"bound", bound},
               {"tokens_per_step_per_rank", tokens_per_step},
               {"tokens_per_s_per_rank", predicted_s > 0 ? tokens_per_step / predicted_s : 0.0}};
  j["rates"] = rates.to_json();
  j["notes"] = notes;
  return j;
}

std::string Plan::text() const {
  std::string s = "memory per tier:\n";
  for (const auto& t : tiers) {
    if (t.total() == 0) {
      s += fmt::format("  {:<14} unused\n", t.name);
      continue;
    }
    s += fmt::format("  {:<14} {:>12}   {}{}\n", t.name, gib(t.total()), t.verdict(),
                     t.capacity > 0 ? fmt::format(" (capacity {})", gib(t.capacity)) : std::string());
    for (const auto& i : t.items) {
      if (i.bytes > 0) s += fmt::format("      {:<40} {:>12}\n", i.what, gib(i.bytes));
    }
  }
  s += fmt::format("overall: {}\n\nstep ({}):\n", fits() ? "fits" : "DOES NOT FIT",
                   pipeline ? "overlapped pipeline" : "synchronous");
  for (const auto& p : parts) s += fmt::format("  {:<16} {:8.3f} s   {}\n", p.name, p.seconds, p.detail);
  s += fmt::format("predicted {:.3f} s per step ({:.0f} tokens/s per rank), bound by {}; bounds {:.3f} s (all "
                   "overlapped) to {:.3f} s (none)\n",
                   predicted_s, predicted_s > 0 ? tokens_per_step / predicted_s : 0.0, bound, lower_s, upper_s);
  // The rates this prediction used that were not measured.
  std::vector<std::string> used;
  for (const auto& part : parts) {
    if (part.name == "compute") used.push_back(tiers[0].total() > 0 ? "gpu_model_tflops" : "cpu_model_tflops");
    if (part.name == "pcie") used.insert(used.end(), {"h2d_GBps", "d2h_GBps", "both_GBps"});
    if (part.name == "host") used.insert(used.end(), {"adam_params_per_s", "host_mem_GBps"});
    if (part.name == "nvme") used.insert(used.end(), {"nvme_read_GBps", "nvme_write_GBps"});
    if (part.name == "gpu_collectives") used.push_back("nvlink_GBps");
  }
  std::string defaults;
  for (const auto& k : used) {
    const auto it = rates.source.find(k);
    if (it != rates.source.end() && it->second == "default") { if (!defaults.empty()) defaults += ", "; defaults += k; }
  }
  if (!defaults.empty()) {
    s += fmt::format("default rates (not measured here; pass --bench REPORT.json from `zinf bench all`): {}\n", defaults);
  }
  for (const auto& n : notes) s += fmt::format("note: {}\n", n);
  return s;
}

}  // namespace zinf::runtime
