// `zinf plan`: will a run fit this machine, per memory tier, and how fast will a step be.
// See runtime/include/zinf/runtime/plan.hpp and docs/plan.md.
#include <fmt/format.h>
#include <unistd.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/fs.hpp"
#include "zinf/configs/presets.hpp"
#include "zinf/kernels/device_info.hpp"
#include "zinf/offload/host_memory.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/plan.hpp"
#include "zinf/runtime/tune.hpp"

namespace zinf::tools {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct PlanOptions {
  std::string model;
  std::string deepspeed = "deepspeed_zero3_cpuoffload";
  std::string device = "cuda";
  int gpus = 1;
  std::string gpu_mem, host_mem, nvme;
  std::int64_t seq_len = 2048;
  std::string bench;
  bool fp32 = false;
  bool suggest = false;
  bool json_out = false;
  config::TrainingArgs args;
  std::int64_t lora_rank = 0;
  std::string lora_targets = "q_proj,v_proj";
  bool lora_offload_optimizer = false;
};

// A machine's capacity: like parse_size, but a bare number of less than a MiB is taken for a
// forgotten unit ("--gpu-mem 24" meant 24G), not for bytes.
std::uint64_t parse_capacity(const std::string& text, const std::string& option) {
  const std::uint64_t b = parse_size(text, option);
  if (b < (1u << 20) && !text.empty() && std::isdigit(static_cast<unsigned char>(text.back()))) {
    throw CLI::ValidationError(option, fmt::format("'{}' has no unit: did you mean {}G? (capacities take K, M, G or T)",
                                                   text, text));
  }
  return b;
}

// The plan for one config (file or preset), with "auto" filled from the arguments.
runtime::Plan plan_for(const PlanOptions& o, const runtime::ModelConfig& model, const config::LoadedDocument& doc,
                       const runtime::MachineRates& rates) {
  config::TrainingArgs args = o.args;
  args.hidden_size = model.hidden_size;
  args.world_size = o.gpus;
  if (!args.bf16 && !args.fp16 && !o.fp32) args.bf16 = true;
  const ResolvedConfig rc = resolve_and_parse(doc, args);
  runtime::PlanInputs in;
  in.model = model;
  in.ds = rc.parsed.config;
  in.device = o.device;
  in.gpus = o.gpus;
  if (o.lora_rank > 0) {
    in.lora.rank = o.lora_rank;
    in.lora.targets = runtime::parse_lora_targets(o.lora_targets);
    in.lora_offload_optimizer = o.lora_offload_optimizer;
  }
  const config::BatchConfig& batch = rc.parsed.config.batch;
  if (!batch.resolved) throw Error("{}: the batch sizes could not be derived (give --micro-batch)", doc.source);
  in.micro_batch = batch.micro;
  in.grad_accum = batch.gas;
  in.seq_len = o.seq_len;
  in.gpu_mem = o.gpu_mem.empty() ? 0 : parse_capacity(o.gpu_mem, "--gpu-mem");
  in.host_mem = o.host_mem.empty() ? offload::total_memory_bytes() : parse_capacity(o.host_mem, "--host-mem");
  in.nvme = o.nvme.empty() ? 0 : parse_capacity(o.nvme, "--nvme");
  return runtime::make_plan(in, rates);
}

int run_plan(const PlanOptions& o) {
  std::error_code ec;
  const std::string model_source = fs::is_directory(o.model, ec) ? (fs::path(o.model) / "config.json").string() : o.model;
  const runtime::ModelConfig model = runtime::load_model_config(model_source);
  if (o.seq_len > model.max_position_embeddings) {
    throw Error("--seq-len {} is longer than the model's max_position_embeddings ({})", o.seq_len,
                model.max_position_embeddings);
  }
  const runtime::MachineRates rates = o.bench.empty() ? runtime::MachineRates{} : runtime::MachineRates::from_report(o.bench);
  if (!o.suggest) {
    const runtime::Plan p = plan_for(o, model, config::load_document(o.deepspeed), rates);
    if (o.json_out) {
      json j = p.to_json();
      j["model"] = {{"source", model_source}, {"summary", model.summary()}};
      j["deepspeed"] = o.deepspeed;
      j["gpus"] = o.gpus;
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << fmt::format("zinf plan: {} ({}), config {}, {} {}(s), seq {}\n\n", model_source, model.summary(),
                               o.deepspeed, o.gpus, o.device == "cuda" ? "GPU" : "CPU rank", o.seq_len)
                << p.text();
    }
    return p.fits() ? 0 : 3;
  }
  // --suggest: every built-in preset, fastest predicted first; the first that fits is the pick.
  // Fitting must be judged: the GPU's memory is this machine's GPU's unless given.
  PlanOptions so = o;
  if (so.device == "cuda" && so.gpu_mem.empty()) {
    const auto q = kernels::query_gpus();
    if (q.gpus.empty()) {
      throw Error("zinf plan --suggest: give --gpu-mem (the memory of the GPU to plan for); this machine has no usable GPU "
                  "to take it from ({})",
                  q.problem);
    }
    so.gpu_mem = std::to_string(q.gpus.front().total_memory);
  }
  struct Candidate {
    std::string name;
    runtime::Plan plan;
    std::string error;
  };
  std::vector<Candidate> cands;
  for (const auto& pr : config::presets()) {
    Candidate c{std::string(pr.name), {}, {}};
    try {
      c.plan = plan_for(so, model, config::load_document(c.name), rates);
    } catch (const Error& e) {
      c.error = e.what();
    }
    cands.push_back(std::move(c));
  }
  std::stable_sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& b) {
    const bool fa = a.error.empty() && a.plan.fits(), fb = b.error.empty() && b.plan.fits();
    if (fa != fb) return fa;
    return a.plan.predicted_s < b.plan.predicted_s;
  });
  const Candidate* pick = !cands.empty() && cands.front().error.empty() && cands.front().plan.fits() ? &cands.front() : nullptr;
  if (o.json_out) {
    json all = json::array();
    for (const auto& c : cands) {
      json j = c.error.empty() ? c.plan.to_json() : json{{"error", c.error}};
      j["preset"] = c.name;
      all.push_back(j);
    }
    std::cout << json{{"suggestion", pick ? json(pick->name) : json(nullptr)}, {"candidates", all}}.dump(2) << "\n";
  } else {
    std::cout << fmt::format("zinf plan --suggest: {} ({}), {} {}(s), seq {}\n\n", model_source, model.summary(), o.gpus,
                             o.device == "cuda" ? "GPU" : "CPU rank", o.seq_len);
    std::cout << fmt::format("{:<34} {:>10} {:>10} {:>11} {:>9} {:>10}  {}\n", "preset", "GPU GiB", "host GiB",
                             "NVMe GiB", "s/step", "bound", "fits");
    for (const auto& c : cands) {
      if (!c.error.empty()) {
        std::cout << fmt::format("{:<34} not usable: {}\n", c.name, c.error.substr(0, c.error.find('\n')));
        continue;
      }
      const auto& t = c.plan.tiers;
      std::cout << fmt::format("{:<34} {:>10.2f} {:>10.2f} {:>11.2f} {:>9.3f} {:>10}  {}\n", c.name,
                               t[0].total() / 1073741824.0, (t[1].total() + t[2].total()) / 1073741824.0,
                               t[3].total() / 1073741824.0, c.plan.predicted_s, c.plan.bound,
                               c.plan.fits() ? "yes" : "no");
    }
    if (pick) {
      std::cout << fmt::format("\nsuggested: {} (the fastest that fits)\n  zinf train --deepspeed {} ...\n\n", pick->name,
                               pick->name)
                << pick->plan.text();
    } else {
      std::cout << "\nno preset fits: lower --micro-batch or --seq-len, add GPUs, host memory or NVMe (--nvme SIZE), "
                   "or offload to NVMe with a config of your own\n";
    }
  }
  return pick ? 0 : 3;
}


// ---- zinf tune --report: a config tuned to the machine (and, with --model, to the model).

struct TuneOptions {
  PlanOptions plan;  // model, gpus, gpu/host memory, seq len, micro-batch (args), bench = the report
  std::string base;
  std::string output;
  std::string nvme_path;
};

int run_tune(const TuneOptions& t) {
  if (t.output.empty()) throw Error("zinf tune: give -o FILE (the tuned config to write), or a subcommand (nvme)");
  if (t.plan.bench.empty()) throw Error("zinf tune: give --report REPORT.json (from `zinf bench all --report DIR`)");
  runtime::TuneRequest req;
  req.report = runtime::MachineRates::read_report(t.plan.bench, "--report");
  const runtime::MachineRates rates = runtime::MachineRates::from_report_json(req.report, t.plan.bench, "--report");
  req.base = !t.base.empty() ? t.base : (t.nvme_path.empty() ? "deepspeed_zero3_cpuoffload" : "deepspeed_zero3_nvme");
  req.nvme_path = t.nvme_path;
  req.max_grad_norm = t.plan.args.max_grad_norm;
  req.gpus = t.plan.gpus;
  req.device = t.plan.device;
  req.seq_len = t.plan.seq_len;
  if (!t.plan.gpu_mem.empty()) req.gpu_mem = parse_capacity(t.plan.gpu_mem, "--gpu-mem");
  if (!t.plan.model.empty()) {
    std::error_code ec;
    const std::string& m = t.plan.model;
    req.model = runtime::load_model_config(fs::is_directory(m, ec) ? (fs::path(m) / "config.json").string() : m);
  }
  req.plan = [&](const config::LoadedDocument& trial, std::uint64_t gpu_mem) {
    PlanOptions po = t.plan;
    po.gpu_mem = std::to_string(gpu_mem);
    return plan_for(po, *req.model, trial, rates);
  };
  const runtime::TuneResult r = runtime::tune_config(req);
  const std::string text = t.output.ends_with(".yaml") || t.output.ends_with(".yml") ? config::to_yaml_text(r.config)
                                                                                     : config::to_json_text(r.config);
  write_file_atomic(t.output, text);
  std::cout << fmt::format("zinf tune: {} from {} and {}\n", t.output, req.base, t.plan.bench);
  for (const auto& w : r.why) std::cout << "  " << w << "\n";
  if (r.plan) std::cout << "\n" << r.plan->text();
  return 0;
}

}  // namespace

void add_tune_config_options(CLI::App& tune, Action& action) {
  auto t = std::make_shared<TuneOptions>();
  tune.add_option("--report", t->plan.bench, "a `zinf bench all --report DIR` report (DIR/report.json) of this machine");
  tune.add_option("-o,--output", t->output, "the tuned config to write (.json, or .yaml)");
  tune.add_option("--base", t->base, "config or preset to start from (default deepspeed_zero3_cpuoffload; "
                                     "deepspeed_zero3_nvme with --nvme-path)");
  tune.add_option("--nvme-path", t->nvme_path, "NVMe directory for offload (takes the NVMe preset as the base)");
  tune.add_option("--model", t->plan.model, "size the stage-3 budgets and the GPU share for this model (config.json)");
  tune.add_option("--gpus", t->plan.gpus, "GPUs (ranks) on this machine (default 1)")->check(CLI::Range(1, 1024));
  tune.add_option("--gpu-mem", t->plan.gpu_mem, "memory per GPU (default: the report's GPU)");
  tune.add_option("--host-mem", t->plan.host_mem, "host RAM (default: this machine's)");
  tune.add_option("--seq-len", t->plan.seq_len, "tokens per sequence (default 2048)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 22));
  tune.add_option_function<double>("--max-grad-norm", [t](const double& v) { t->plan.args.max_grad_norm = v; },
                                   "gradient clipping the config is tuned for and written with (default: the base's; "
                                   "\"auto\" is 1.0 as in zinf train)")
      ->check(CLI::NonNegativeNumber);
  tune.add_option_function<std::int64_t>("--micro-batch", [t](const std::int64_t& v) { t->plan.args.micro_batch = v; },
                                         "micro-batch per GPU the config is tuned for (default 4)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  tune.callback([t, &tune, &action] {
    if (!tune.get_subcommands().empty()) return;  // `zinf tune nvme ...`
    if (!t->plan.args.micro_batch) t->plan.args.micro_batch = 4;
    action = [t] { return run_tune(*t); };
  });
}

void add_tune_command(CLI::App& app, Action& action) {
  auto* tune = app.add_subcommand("tune", "Tune a config to this machine: from a `zinf bench all` report (--report, -o), "
                                           "or the aio block alone from a drive sweep (nvme)");
  tune->require_subcommand(0, 1);
  add_tune_config_options(*tune, action);
  add_tune_nvme_command(*tune, action);
}

void add_plan_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<PlanOptions>();
  auto* cmd = app.add_subcommand("plan", "Will a run fit (bytes per memory tier) and how fast will a step be (and what bounds it)");
  cmd->add_option("--model", o->model, "Hugging Face config.json (or a directory holding one)")->required();
  cmd->add_option("--deepspeed", o->deepspeed, "DeepSpeed config file or preset (default deepspeed_zero3_cpuoffload)");
  cmd->add_option("--device", o->device, "cuda (default) or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  cmd->add_option("--gpus", o->gpus, "GPUs (ranks) on this machine (default 1)")->check(CLI::Range(1, 1024));
  cmd->add_option("--gpu-mem", o->gpu_mem, "memory per GPU, e.g. 24G, 80G (default: not judged)");
  cmd->add_option("--host-mem", o->host_mem, "host RAM for all ranks (default: this machine's)");
  cmd->add_option("--nvme", o->nvme, "free NVMe space (default: not judged)");
  cmd->add_option("--seq-len", o->seq_len, "tokens per sequence (default 2048)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 22));
  cmd->add_option("--bench", o->bench, "a `zinf bench all --json` report of this machine (default rates otherwise, marked)");
  cmd->add_flag("--fp32", o->fp32, "fp32 parameters (default bf16 unless --fp16)");
  cmd->add_flag("--suggest", o->suggest, "rank every built-in preset and pick the fastest that fits");
  cmd->add_flag("--json", o->json_out, "print one JSON object");
  auto* lr = cmd->add_option("--lora-rank", o->lora_rank, "plan LoRA fine-tuning of this rank on a frozen bf16 base")
                 ->check(CLI::Range(std::int64_t{0}, std::int64_t{4096}));
  cmd->add_option("--lora-targets", o->lora_targets, "LoRA target modules (PEFT names, or all-linear; default q_proj,v_proj)")
      ->needs(lr);
  cmd->add_flag("--lora-offload-optimizer", o->lora_offload_optimizer, "the adapters' Adam state in host memory")->needs(lr);
  add_training_args(*cmd, o->args);
  cmd->callback([o, &action] {
    if (!o->gpu_mem.empty()) (void)parse_capacity(o->gpu_mem, "--gpu-mem");
    if (!o->host_mem.empty()) (void)parse_capacity(o->host_mem, "--host-mem");
    if (!o->nvme.empty()) (void)parse_size(o->nvme, "--nvme");
    if (o->fp32 && (o->args.bf16 || o->args.fp16)) throw CLI::ValidationError("--fp32", "cannot be given with --bf16 or --fp16");
    action = [o] { return run_plan(*o); };
  });
}

}  // namespace zinf::tools
