#pragma once
// The training loop behind `zinf train`: micro-batches with gradient accumulation, clipping by the
// global norm, the DeepSpeed schedules, the offloaded optimizer step (offload/), eval on a
// held-out split, per-step metrics, and checkpoints that a crash at any moment leaves usable.
//
// Outputs in TrainOptions::output_dir: training_metrics.csv, summary.json,
// deepspeed_config_auto.json, zinf.log (by the caller's logger), checkpoints/step-NNNNNNNN/ and
// checkpoints/latest.

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "zinf/configs/deepspeed_config.hpp"
#include "zinf/configs/document.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/runtime/checkpoint.hpp"
#include "zinf/runtime/comm.hpp"
#include "zinf/runtime/data.hpp"
#include "zinf/runtime/flops.hpp"
#include "zinf/runtime/lora.hpp"
#include "zinf/runtime/model_config.hpp"

namespace zinf::runtime {

// One step's progress, for TrainOptions::on_progress.
struct StepProgress {
  std::int64_t step = 0, total_steps = 0;
  double loss = 0;
  double eval_loss = 0;  // NaN: no eval at this step
  double lr = 0, tokens_per_s = 0;
  double eta_s = 0;       // at the pace of this run's steps so far
  bool milestone = false;  // an eval, or a step of the config's steps_per_print: worth a line of its own
  bool last = false;       // the run's last step (it ends, or stops, after it)
};

struct TrainOptions {
  ModelConfig model;
  std::string model_source;  // for the logs and summary
  std::string init_weights;  // safetensors file or directory; empty = seeded initialisation
  const TokenData* data = nullptr;
  config::DeepSpeedConfig ds;  // resolved (no "auto" left)
  config::Json ds_resolved;    // written to deepspeed_config_auto.json
  std::int64_t seq_len = 128;
  std::int64_t max_steps = 0;  // optimizer steps; 0 = epochs * steps per epoch
  double epochs = 1.0;
  std::uint64_t seed = 42;
  double eval_fraction = 0.05;
  std::int64_t eval_every = 0;       // 0 = only at the end
  std::int64_t eval_max_batches = 8;  // micro-batches per eval
  std::int64_t save_every = 0;       // 0 = only at the end
  int keep_last = 0;                 // 0 = keep every checkpoint
  bool save = true;                  // false: no checkpoint at all (benchmarks; a stop request then just stops)
  std::string output_dir;
  std::string resume;  // "" = fresh; "latest" or a checkpoint directory
  std::function<bool()> stop_requested;  // polled after each step (SIGINT/SIGTERM)
  // Rank 0, after each optimizer step: what a person watching wants to see (the library prints
  // nothing itself; `zinf train` prints these lines).
  std::function<void(const StepProgress&)> on_progress;
  // Data-parallel ranks (null: one rank). With W ranks each takes a W-th of every micro-batch
  // round; ZeRO stage >= 1 shards the optimizer state (and stage 2-3 the gradients) across them.
  // Only rank 0 writes the metrics, summary, config and `latest`; every rank writes its shard of
  // each checkpoint.
  Communicator* comm = nullptr;
  // Where the model computes: "cpu", or "cuda" on GPU `gpu` (the optimizer state stays on the host
  // or NVMe; parameters go up and gradients come down each step: overlapped with compute and the
  // CPU optimizer on one GPU at stage 2-3, docs/gpu.md).
  std::string device = "cpu";
  int gpu = 0;
  // Caps what zinf allocates on the GPU (bytes; 0: no cap): the run is planned against it at
  // start-up and refused with the numbers when it cannot fit (--gpu-memory-limit).
  std::uint64_t gpu_memory_limit = 0;
  // false: the GPU takes the synchronous path (collectives on the host), not the overlapped
  // pipeline: for comparison and debugging (`--gpu-overlap off`).
  bool gpu_overlap = true;
  // Test hook: sees each step's accumulated (loss-scaled) fp32 gradients before the norm, e.g. to
  // inject an overflow. Step numbers are 1-based. (Not called in LoRA runs.)
  std::function<void(std::int64_t step, const std::vector<void*>& grad_units)> after_backward;

  // LoRA (lora.rank > 0, docs/lora.md): the base model is frozen and held in bf16 (offloaded per
  // offload_param; no gradients, no optimizer state), and only the adapters train. The adapters
  // and their Adam state stay on the compute device, or in host memory with
  // lora_offload_optimizer (stepped there by the CPU optimizer). Checkpoints hold the adapters'
  // state and the adapters in PEFT's format; the base is read again from init_weights (or the
  // seed) on resume and must be the same (checked by fingerprint).
  LoraConfig lora;
  std::string lora_init;  // a PEFT adapter directory to start from (default: PEFT's initialisation)
  bool lora_offload_optimizer = false;
  // Test hook (LoRA runs): at the end of the run, each unit's frozen bf16 shard as the store holds
  // it, and (stages 0-2) the compute copy on the device, so a test can check they never changed.
  std::function<void(std::size_t unit, std::span<const std::uint16_t> store_shard,
                     std::span<const std::uint16_t> compute_copy)>
      inspect_base;
};

struct TrainResult {
  std::int64_t steps = 0;  // optimizer steps done in all (including before a resume)
  double first_loss = 0, final_loss = 0, best_eval_loss = 0, final_eval_loss = 0;
  bool stopped_early = false;
  std::string last_checkpoint;
};

TrainResult train(const TrainOptions& options);

}  // namespace zinf::runtime
