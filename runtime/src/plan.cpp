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
#include "plan_memory.hpp"

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

namespace {

// The step-time model's inputs from the memory plan.
struct StepFacts {
  double compute_s = 0, host_elems = 0, h2d = 0, d2h = 0, adam_s = 0;
};

// The step's parts: compute, PCIe, the host's optimizer and copies, NVMe, collectives.
StepFacts step_parts(const PlanInputs& in, const MachineRates& rates, const PlannedRun& r, Plan& p) {
  const ModelConfig& c = in.model;
  const config::ZeroConfig& z = in.ds.zero;
  const bool gpu = r.gpu, lora = r.lora, stage3 = r.stage3, nccl = r.nccl;
  const std::uint64_t W = r.W, E = r.E, S = r.S, gpu_share = r.gpu_share, pb = r.pb, gbytes = r.gbytes;
  const std::uint64_t lora_numel = r.lora_numel, nvme_state = r.nvme_state, nvme_params = r.nvme_params;
  const std::optional<LoraLayout>& lora_layout = r.lora_layout;
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
  return {compute_s, host_elems, h2d, d2h, adam_s};
}

// The step's predicted time from its parts: what overlaps on this path, and what bounds it.
void predict_step(const PlanInputs& in, const MachineRates& rates, const PlannedRun& r, const StepFacts& f, Plan& p) {
  const bool gpu = r.gpu, lora = r.lora, stage3 = r.stage3;
  const std::uint64_t W = r.W, E = r.E, gpu_share = r.gpu_share, pb = r.pb;
  const double compute_s = f.compute_s, host_elems = f.host_elems, h2d = f.h2d, d2h = f.d2h, adam_s = f.adam_s;
  const config::DeepSpeedConfig& ds = in.ds;
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
                                  r.lora_layout->adapters.size(), r.lora_layout->parameter_count()));
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
}

}  // namespace

Plan make_plan(const PlanInputs& in, const MachineRates& rates) {
  if (in.gpus < 1) throw Error("--gpus must be at least 1, not {}", in.gpus);
  if (in.micro_batch < 1 || in.seq_len < 1 || in.grad_accum < 1) {
    throw Error("micro-batch, sequence length and gradient accumulation must be at least 1");
  }
  if (in.device != "cuda" && in.device != "cpu") throw Error("--device must be cuda or cpu, not '{}'", in.device);
  Plan p;
  p.rates = rates;
  const PlannedRun r = plan_memory(in, p);
  const StepFacts f = step_parts(in, rates, r, p);
  predict_step(in, rates, r, f, p);
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
