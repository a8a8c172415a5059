// `zinf train` and `zinf data tokenize`.
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "commands.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/log.hpp"
#include "zinf/configs/diagnostics.hpp"
#include "zinf/configs/parse.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/data.hpp"
#include "zinf/runtime/embedded.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"
#include "zinf/runtime/trainer.hpp"

namespace zinf::tools {
namespace {
namespace fs = std::filesystem;

constexpr const char* kDefaultPreset = "deepspeed_zero3_cpuoffload";

struct TrainCliOptions {
  std::string model;
  std::string init;
  std::string data;
  std::string data_dtype;
  std::string deepspeed = kDefaultPreset;
  config::TrainingArgs args;
  std::int64_t max_steps = 0;
  double epochs = 0;
  std::int64_t seq_len = 0;
  std::uint64_t seed = 42;
  std::string device = "cpu";
  std::string gpu_memory_limit;
  std::string gpu_overlap = "on";
  std::int64_t eval_every = 0;
  double eval_fraction = 0.05;
  std::int64_t save_every = 0;
  int keep_last = 0;
  bool no_save = false;
  std::string output_dir;
  std::string resume;
  bool resume_given = false;
  // LoRA
  std::int64_t lora_rank = 0;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  std::string lora_targets = "q_proj,v_proj";
  bool lora_rslora = false;
  std::string lora_init;
  bool lora_offload_optimizer = false;
};

// SIGINT and SIGTERM stop training after the step in progress (a checkpoint is saved); a second
// one ends the process as the default action would.
//
// No signal handler runs on the training threads: oneDNN's JIT GEMM kernels (AVX2 and AVX-512)
// point rsp into the heap while they run, so a handler taken there writes its frame over heap
// memory (corrupted malloc state, crashes later; oneDNN's issue 4845, fixed in releases newer than
// the one this links). So `zinf train` blocks both signals before it starts any thread (every
// thread it starts inherits the mask), and one thread of its own takes them with sigwait().
// Until training is armed (arm_stop_signals()), a signal ends the process as before.
std::atomic<int> g_stop{0};
std::atomic<bool> g_stop_armed{false};

void block_stop_signals() {
  sigset_t set;
  ::sigemptyset(&set);
  ::sigaddset(&set, SIGINT);
  ::sigaddset(&set, SIGTERM);
  if (const int e = ::pthread_sigmask(SIG_BLOCK, &set, nullptr); e != 0) {
    throw Error("cannot block SIGINT/SIGTERM for the training threads: {}", std::strerror(e));
  }
  std::thread([set] {
    for (;;) {
      int sig = 0;
      if (::sigwait(&set, &sig) != 0) continue;
      if (g_stop_armed.load() && g_stop.load() == 0) {
        g_stop.store(sig);
        continue;
      }
      // The default action, on this thread only (it runs no kernels): the process ends.
      ::signal(sig, SIG_DFL);
      sigset_t one;
      ::sigemptyset(&one);
      ::sigaddset(&one, sig);
      ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
      ::raise(sig);
    }
  }).detach();
}
void arm_stop_signals() { g_stop_armed.store(true); }

std::string compact_time() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y%m%d-%H%M%S", &tm);
  return buf;
}

std::string plot_script() {
  if (const char* p = std::getenv("ZINF_PLOT_SCRIPT"); p != nullptr && *p != '\0') return p;
  return ZINF_SOURCE_DIR "/tools/plot_training.py";
}

// Draws training_curves.png with matplotlib; a missing Python or matplotlib is a warning.
void draw_curves(const std::string& out_dir) {
  const std::string script = plot_script();
  if (!fs::exists(script)) {
    spdlog::warn("training_curves.png not drawn: {} is missing", script);
    return;
  }
  const std::string cmd = fmt::format("'{}' '{}' '{}' > '{}/plot.log' 2>&1", python_for_plots(), script, out_dir, out_dir);
  if (std::system(cmd.c_str()) != 0) {
    spdlog::warn("training_curves.png not drawn (see {}/plot.log; it needs python3 with matplotlib): rerun with `{} {} {}`",
                 out_dir, python_for_plots(), script, out_dir);
    return;
  }
  std::error_code ec;
  fs::remove(fs::path(out_dir) / "plot.log", ec);
}

// A step's progress line: on a terminal, redrawn in place on stderr (an eval or a steps_per_print
// step keeps its line); otherwise one line per step on stdout.
void print_progress(const runtime::StepProgress& p, bool terminal) {
  const std::string eval = std::isnan(p.eval_loss) ? std::string() : fmt::format(" eval {:.4f}", p.eval_loss);
  const std::string line = fmt::format("step {}/{} loss {:.4f}{} lr {:.3g} {:.0f} tok/s ETA {:.0f}s", p.step, p.total_steps,
                                       p.loss, eval, p.lr, p.tokens_per_s, p.eta_s);
  if (terminal) {
    std::cerr << "\r" << fmt::format("{:<90}", line) << std::flush;
    if (p.milestone || p.last) std::cerr << "\n";
  } else {
    std::cout << line << "\n" << std::flush;
  }
}

int run_train(TrainCliOptions o) {
  block_stop_signals();  // before any thread starts (see g_stop)
  const bool embedded_model = o.model.empty() || o.model == "tiny-byte";
  const bool embedded_data = o.data.empty();
  // The embedded default: a short, visibly learning run unless told otherwise.
  if (embedded_data) {
    if (o.seq_len == 0) o.seq_len = 256;
    if (o.max_steps == 0 && o.epochs == 0) o.max_steps = 400;
    if (!o.args.micro_batch) o.args.micro_batch = 8;
    if (!o.args.lr) o.args.lr = 2e-3;
    if (!o.args.warmup_steps) o.args.warmup_steps = 40;
    if (!o.args.fp16) o.args.bf16 = true;
    if (o.eval_every == 0) o.eval_every = 100;
  }
  if (o.seq_len == 0) o.seq_len = 512;
  if (o.max_steps == 0 && o.epochs == 0) o.epochs = 1;

  // Model.
  runtime::ModelConfig model;
  std::string model_source;
  if (embedded_model) {
    model = runtime::parse_model_config(nlohmann::json::parse(runtime::embedded_model_json()), runtime::kEmbeddedModelName);
    model_source = runtime::kEmbeddedModelName;
  } else {
    std::error_code ec;
    model_source = fs::is_directory(o.model, ec) ? (fs::path(o.model) / "config.json").string() : o.model;
    model = runtime::load_model_config(model_source);
  }
  if (o.seq_len > model.max_position_embeddings) {
    throw Error("--seq-len {} is longer than the model's max_position_embeddings ({})", o.seq_len,
                model.max_position_embeddings);
  }

  // Data.
  runtime::TokenData data;
  if (embedded_data) {
    data = runtime::TokenData::from_tokens(runtime::byte_tokens(runtime::embedded_corpus()), runtime::kEmbeddedCorpusName,
                                           runtime::kByteVocab);
  } else {
    std::optional<unsigned> width;
    if (o.data_dtype == "uint16") width = 2;
    if (o.data_dtype == "uint32") width = 4;
    data = runtime::TokenData::open(o.data, width);
  }

  // Config: the preset or file, "auto" filled from the arguments, then validated.
  o.args.hidden_size = model.hidden_size;
  const config::LoadedDocument doc = config::load_document(o.deepspeed);
  // Steps for the schedule's "auto" total: known up front only with --max-steps.
  if (!o.args.total_steps && o.max_steps > 0) o.args.total_steps = o.max_steps;
  // Ranks: from the launcher's environment (zinf launch, torchrun, mpirun, srun).
  const runtime::RankInfo ranks = runtime::rank_info_from_environment();
  if (o.args.world_size && *o.args.world_size != ranks.world_size) {
    throw Error("--world-size {} but this job has {} rank(s) ({}): start the ranks with `zinf launch --nproc {}`",
                *o.args.world_size, ranks.world_size, ranks.source, *o.args.world_size);
  }
  o.args.world_size = ranks.world_size;
  const ResolvedConfig rc = resolve_and_parse(doc, o.args);
  const config::Resolution& res = rc.resolution;
  const config::ParseResult& parsed = rc.parsed;

  // Output directory and log file.
  if (o.output_dir.empty()) {
    if (o.resume_given) throw Error("--resume needs the --output-dir of the run to continue");
    if (ranks.world_size > 1) throw Error("training on {} ranks: pass --output-dir (every rank must name the same one)", ranks.world_size);
    const std::string name = embedded_model ? "tiny-byte" : fs::path(model_source).parent_path().filename().string();
    o.output_dir = (fs::path("output") / fmt::format("{}-{}", name.empty() ? "model" : name, compact_time())).string();
  }
  fs::create_directories(o.output_dir);
  log::init({.rank = std::nullopt,
             .level = {},
             .file = (fs::path(o.output_dir) / (ranks.rank == 0 ? std::string("zinf.log")
                                                                 : fmt::format("zinf.rank{}.log", ranks.rank)))
                         .string()});
  std::unique_ptr<runtime::Communicator> comm = runtime::make_gloo_communicator(ranks);
  if (ranks.world_size > 1) {
    spdlog::info("rank {} of {} ({}); ZeRO stage {}", ranks.rank, ranks.world_size, ranks.source, parsed.config.zero.stage);
  }
  for (const auto& f : res.filled) spdlog::info("config: {}", f);
  for (const auto& f : res.defaulted) spdlog::info("config: {}", f);
  const std::string warnings = parsed.diagnostics.format(config::Severity::kWarning);
  if (!warnings.empty()) spdlog::warn("config:\n{}", warnings);
  if (embedded_data) {
    spdlog::info("embedded default: {} on {} (byte tokens), preset {}", runtime::kEmbeddedModelName,
                 runtime::kEmbeddedCorpusName, o.deepspeed);
  }

  runtime::TrainOptions t;
  t.model = model;
  t.model_source = model_source;
  t.init_weights = o.init;
  t.data = &data;
  t.ds = parsed.config;
  t.ds_resolved = res.resolved;
  t.seq_len = o.seq_len;
  t.max_steps = o.max_steps;
  t.epochs = o.epochs;
  t.seed = o.seed;
  t.eval_fraction = o.eval_fraction;
  t.eval_every = o.eval_every;
  t.save_every = o.save_every;
  t.keep_last = o.keep_last;
  t.save = !o.no_save;
  t.output_dir = o.output_dir;
  t.resume = o.resume_given ? (o.resume.empty() ? "latest" : o.resume) : "";
  arm_stop_signals();
  t.stop_requested = [] { return g_stop.load() != 0; };
  t.comm = comm.get();
  t.on_progress = [terminal = ::isatty(STDERR_FILENO) != 0](const runtime::StepProgress& p) { print_progress(p, terminal); };
  t.device = o.device;
  if (!o.gpu_memory_limit.empty()) {
    if (o.device != "cuda") {
      throw CLI::ValidationError("--gpu-memory-limit", "caps GPU memory, so it needs --device cuda");
    }
    t.gpu_memory_limit = parse_size(o.gpu_memory_limit, "--gpu-memory-limit");
  }
  // (ZINF_GPU_OVERLAP=0|1, the older spelling of --gpu-overlap, is still honoured.)
  if (const char* env = std::getenv("ZINF_GPU_OVERLAP"); env != nullptr && *env != '\0') {
    const std::string v = env;
    if (v != "0" && v != "1") {
      throw Error("ZINF_GPU_OVERLAP='{}' is not 0 or 1: unset it and pass --gpu-overlap on|off instead", v);
    }
    spdlog::warn("ZINF_GPU_OVERLAP is deprecated: pass --gpu-overlap {}", v == "0" ? "off" : "on");
    o.gpu_overlap = v == "0" ? "off" : "on";
  }
  t.gpu_overlap = o.gpu_overlap == "on";
  t.gpu = ranks.local_rank;  // one GPU per local rank
  if (o.lora_rank > 0) {
    t.lora.rank = o.lora_rank;
    t.lora.alpha = o.lora_alpha;
    t.lora.dropout = o.lora_dropout;
    t.lora.targets = runtime::parse_lora_targets(o.lora_targets);
    t.lora.rslora = o.lora_rslora;
    t.lora.validate();
    t.lora_init = o.lora_init;
    t.lora_offload_optimizer = o.lora_offload_optimizer;
  }

  const runtime::TrainResult r = runtime::train(t);
  if (ranks.rank != 0) return kExitOk;  // rank 0 reports
  if (r.stopped_early && std::isnan(r.final_loss)) {
    std::cout << "stopped before the first step (a signal during set-up): nothing was trained or saved\n";
    return kExitOk;
  }
  if (std::isnan(r.final_loss)) {
    std::cout << fmt::format("nothing to train: {} is at step {}; pass a larger --max-steps to go on\n",
                             r.last_checkpoint, r.steps);
    return kExitOk;
  }
  draw_curves(o.output_dir);
  if (o.lora_rank > 0 && !r.last_checkpoint.empty()) {
    std::cout << fmt::format("LoRA adapters (PEFT format) in {}; merge them into the base with: zinf ckpt merge --base "
                             "BASE --adapter {} --to DIR\n",
                             r.last_checkpoint, o.output_dir);
  }
  std::cout << fmt::format("{} after {} steps: loss {:.4f} (first {:.4f}){}\n", r.stopped_early ? "stopped" : "done",
                           r.steps, r.final_loss, r.first_loss,
                           std::isnan(r.final_eval_loss) ? std::string() : fmt::format(", eval loss {:.4f}", r.final_eval_loss));
  std::cout << fmt::format("outputs in {}: training_metrics.csv, summary.json, deepspeed_config_auto.json, zinf.log{}; "
                           "checkpoint {}\n",
                           o.output_dir,
                           fs::exists(fs::path(o.output_dir) / "training_curves.png") ? ", training_curves.png" : "",
                           r.last_checkpoint.empty() ? std::string("none (--no-save)") : r.last_checkpoint);
  if (r.stopped_early && !o.no_save) std::cout << fmt::format("continue with: zinf train ... --output-dir {} --resume\n", o.output_dir);
  return kExitOk;
}

}  // namespace

void add_train_commands(CLI::App& app, Action& action) {
  auto o = std::make_shared<TrainCliOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train", "train a model (no arguments: a small Llama on the embedded corpus, CPU-offload preset)");
  cmd->add_option("--model", o->model, "Hugging Face config.json, a directory holding one, or tiny-byte (embedded)");
  cmd->add_option("--init", o->init, "initial weights: a .safetensors file, index or directory (default: seeded init)");
  cmd->add_option("--data", o->data, "token file (`zinf data tokenize` makes one; default: the embedded corpus)");
  cmd->add_option("--data-dtype", o->data_dtype, "for a raw token file without zinf's header: uint16 or uint32")
      ->check(CLI::IsMember({"uint16", "uint32"}));
  cmd->add_option("--deepspeed", o->deepspeed, "DeepSpeed config file or preset (default deepspeed_zero3_cpuoffload)");
  auto* steps = cmd->add_option("--max-steps", o->max_steps, "optimizer steps to train (default: one epoch)")
                    ->check(whole_number())
                    ->check(CLI::PositiveNumber);
  cmd->add_option("--epochs", o->epochs, "epochs over the training samples")
      ->check(finite_number())
      ->check(CLI::PositiveNumber)
      ->excludes(steps);
  cmd->add_option("--seq-len", o->seq_len, "tokens per sample (default 512; 256 for the embedded default)")->check(whole_number())
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", o->seed, "seed for the initialisation and the sample order (default 42)")->check(whole_number());
  cmd->add_option("--device", o->device,
                  "where the model computes: cpu (default) or cuda (GPU LOCAL_RANK; optimizer state stays on the host "
                  "or NVMe)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--eval-every", o->eval_every, "eval loss every N steps (default: at the end)")->check(whole_number())
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--eval-fraction", o->eval_fraction, "share of samples held out for the eval loss (default 0.05)")
      ->check(finite_number())->check(CLI::Range(0.0, 0.5));
  cmd->add_option("--save-every", o->save_every, "checkpoint every N steps (default: at the end)")->check(whole_number())
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-save", o->no_save, "write no checkpoint, not even at the end (benchmarks)");
  cmd->add_option("--gpu-memory-limit", o->gpu_memory_limit,
                  "cap what zinf allocates on the GPU, e.g. 24GiB, to train as on a smaller card; a run that "
                  "cannot fit is refused at start-up with its plan (--device cuda)");
  cmd->add_option("--gpu-overlap", o->gpu_overlap,
                  "on (default): one GPU at ZeRO 2-3, or several at 3, trains as an overlapped pipeline; off: the "
                  "synchronous path, for comparison and debugging (--device cuda)")
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--keep-last", o->keep_last, "keep only the N newest checkpoints (default: all)")->check(whole_number())
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--output-dir", o->output_dir, "where outputs go (default output/<model>-<time>)");
  cmd->add_option("--resume", o->resume, "continue from a checkpoint directory, or the latest in --output-dir")
      ->expected(0, 1);
  auto* lora_rank = cmd->add_option("--lora-rank", o->lora_rank,
                                    "train LoRA adapters of this rank on a frozen bf16 base (docs/lora.md); 0 = full "
                                    "training")
                        ->check(CLI::Range(std::int64_t{0}, std::int64_t{4096}));
  cmd->add_option("--lora-alpha", o->lora_alpha, "LoRA alpha: the adapters are scaled by alpha / rank (default 8, as PEFT)")
      ->check(finite_number())->check(CLI::PositiveNumber)->needs(lora_rank);
  cmd->add_option("--lora-dropout", o->lora_dropout, "dropout on the adapters' input while training (default 0)")
      ->check(finite_number())->check(CLI::Range(0.0, 0.999))->needs(lora_rank);
  cmd->add_option("--lora-targets", o->lora_targets,
                  "modules to adapt, PEFT's names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, or "
                  "all-linear (default q_proj,v_proj, as PEFT for Llama)")
      ->needs(lora_rank);
  cmd->add_flag("--lora-rslora", o->lora_rslora, "rank-stabilised LoRA: scale by alpha / sqrt(rank)")->needs(lora_rank);
  cmd->add_option("--lora-init", o->lora_init, "start from these adapters (a PEFT adapter directory) instead of PEFT's "
                                               "initialisation")
      ->needs(lora_rank);
  cmd->add_flag("--lora-offload-optimizer", o->lora_offload_optimizer,
                "keep the adapters' Adam state in host memory and step it on the CPU (default: on the GPU with the "
                "adapters)")
      ->needs(lora_rank);
  add_training_args(*cmd, o->args);
  cmd->callback([o, cmd, &action] {
    if (cmd->count("--resume") > 0) o->resume_given = true;
    action = [o] { return run_train(*o); };
  });

}

std::string python_for_plots() {
  if (const char* p = std::getenv("ZINF_PYTHON"); p != nullptr && *p != '\0') return p;
  return fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
}

}  // namespace zinf::tools
