#pragma once
// The typed DeepSpeed config: every section zinf reads, with DeepSpeed's defaults
// (../shared/DEEPSPEED_CONFIG.md). Plain structs: other modules take what they need from here and
// never see JSON.

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace zinf::config {

enum class OffloadDevice { kNone, kCpu, kNvme };
enum class OptimizerType { kAdam, kAdamW, kAdagrad, kLion };
enum class SchedulerType { kLRRangeTest, kOneCycle, kWarmupLR, kWarmupDecayLR, kWarmupCosineLR };
enum class WarmupType { kLog, kLinear };
enum class Dtype { kFp32, kFp16, kBf16 };

const char* to_string(OffloadDevice device) noexcept;
const char* to_string(OptimizerType type) noexcept;
const char* to_string(SchedulerType type) noexcept;
const char* to_string(WarmupType type) noexcept;
const char* to_string(Dtype dtype) noexcept;

struct BatchConfig {
  // As written in the config (absent = not given); "auto" counts as not given once resolution
  // had nothing to fill it with.
  std::optional<std::int64_t> train_batch_size;
  std::optional<std::int64_t> micro_batch_per_gpu;
  std::optional<std::int64_t> gradient_accumulation_steps;
  // Derived by DeepSpeed's rule for `world_size`; valid when `resolved` is true.
  bool resolved = false;
  std::int64_t world_size = 1;
  std::int64_t train = 0;
  std::int64_t micro = 0;
  std::int64_t gas = 0;
};

struct Fp16Config {
  bool enabled = false;
  bool auto_cast = false;
  double loss_scale = 0.0;  // 0 = dynamic
  int initial_scale_power = 16;
  std::int64_t loss_scale_window = 1000;
  int hysteresis = 2;
  bool consecutive_hysteresis = false;
  double min_loss_scale = 1.0;
  bool dynamic() const noexcept { return loss_scale == 0.0; }
};

struct Bf16Config {
  bool enabled = false;
  bool immediate_grad_update = false;
  bool check_grad_overflow = true;
};

struct OptimizerConfig {
  // False when the config has no "optimizer" section: zinf then runs AdamW from the training
  // arguments, as the Hugging Face Trainer does.
  bool from_config = false;
  OptimizerType type = OptimizerType::kAdamW;
  std::string type_name = "AdamW";  // as written
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adam_w_mode = true;  // Adam with adam_w_mode=false is L2 (g += wd * p); AdamW is always decoupled
  bool bias_correction = true;
  bool torch_adam = false;
  double lr_decay = 0.0;         // Adagrad
  double initial_accumulator = 0.0;  // Adagrad
  // True when the update uses decoupled weight decay.
  bool decoupled_weight_decay() const noexcept {
    return type == OptimizerType::kAdamW || (type == OptimizerType::kAdam && adam_w_mode) ||
           type == OptimizerType::kLion;
  }
};

struct LRRangeTestParams {
  double min_lr = 1e-3;
  double step_size = 2000;
  double step_rate = 1.0;
  bool staircase = false;
};

struct OneCycleParams {
  double cycle_min_lr = 0.0;
  double cycle_max_lr = 0.0;
  double decay_lr_rate = 0.0;
  double cycle_first_step_size = 2000;
  double cycle_second_step_size = 2000;  // default: = first
  std::optional<std::int64_t> cycle_first_stair_count;
  std::optional<std::int64_t> cycle_second_stair_count;
  double decay_step_size = 0;
  bool cycle_momentum = true;
  double cycle_min_mom = 0.8;
  double cycle_max_mom = 0.9;
  double decay_mom_rate = 0.0;
};

struct WarmupParams {
  double warmup_min_lr = 0.0;
  double warmup_max_lr = 1e-3;  // default: the optimizer's lr
  std::int64_t warmup_num_steps = 1000;
  WarmupType warmup_type = WarmupType::kLog;
  std::int64_t total_num_steps = 0;  // WarmupDecayLR
};

struct WarmupCosineParams {
  std::int64_t total_num_steps = 0;
  double warmup_min_ratio = 0.0;
  std::int64_t warmup_num_steps = 1000;
  double cos_min_ratio = 1e-4;
  WarmupType warmup_type = WarmupType::kLog;
};

struct SchedulerConfig {
  SchedulerType type = SchedulerType::kWarmupLR;
  LRRangeTestParams lr_range_test;
  OneCycleParams one_cycle;
  WarmupParams warmup;  // WarmupLR and WarmupDecayLR
  WarmupCosineParams warmup_cosine;
};

struct OffloadParamConfig {
  OffloadDevice device = OffloadDevice::kNone;
  std::string nvme_path;
  bool pin_memory = true;
  std::int64_t buffer_count = 5;
  std::int64_t buffer_size = 100'000'000;  // elements
  std::int64_t max_in_cpu = 1'000'000'000;  // elements
};

struct OffloadOptimizerConfig {
  OffloadDevice device = OffloadDevice::kNone;
  std::string nvme_path;
  bool pin_memory = true;
  std::int64_t buffer_count = 4;
  bool pipeline_read = false;
  bool pipeline_write = false;
  bool fast_init = false;
  double ratio = 1.0;
};

struct ZeroConfig {
  int stage = 0;
  bool contiguous_gradients = true;
  bool reduce_scatter = true;
  std::int64_t reduce_bucket_size = 500'000'000;
  std::int64_t allgather_bucket_size = 500'000'000;
  bool allgather_partitions = true;
  bool overlap_comm = false;  // stage 3 default: true
  std::int64_t sub_group_size = 1'000'000'000;
  std::int64_t prefetch_bucket_size = 50'000'000;
  std::int64_t param_persistence_threshold = 100'000;
  std::int64_t model_persistence_threshold = std::numeric_limits<std::int64_t>::max();
  std::int64_t max_live_parameters = 1'000'000'000;
  std::int64_t max_reuse_distance = 1'000'000'000;
  bool gather_16bit_weights_on_model_save = false;
  bool round_robin_gradients = false;
  bool ignore_unused_parameters = true;
  bool elastic_checkpoint = false;
  bool load_from_fp32_weights = true;
  std::optional<OffloadParamConfig> offload_param;          // absent = on the GPU
  std::optional<OffloadOptimizerConfig> offload_optimizer;  // absent = on the GPU

  OffloadDevice param_device() const noexcept { return offload_param ? offload_param->device : OffloadDevice::kNone; }
  OffloadDevice optimizer_device() const noexcept {
    return offload_optimizer ? offload_optimizer->device : OffloadDevice::kNone;
  }
};

struct AioConfig {
  std::int64_t block_size = 1'048'576;
  std::int64_t queue_depth = 8;
  std::int64_t intra_op_parallelism = 1;
  bool single_submit = false;
  bool overlap_events = true;
  bool use_gds = false;
};

struct MonitorConfig {  // tensorboard, wandb, csv_monitor, comet
  bool enabled = false;
  std::string output_path;
  std::string job_name = "DeepSpeedJobName";
  std::string project;  // wandb / comet
  std::string group;    // wandb
  std::string team;     // wandb
};

struct ActivationCheckpointingConfig {
  bool partition_activations = false;
  bool contiguous_memory_optimization = false;
  bool cpu_checkpointing = false;
  std::optional<std::int64_t> number_checkpoints;
  bool synchronize_checkpoint_boundary = false;
  bool profile = false;
};

struct FlopsProfilerConfig {
  bool enabled = false;
  std::int64_t profile_step = 1;
  std::int64_t module_depth = -1;
  std::int64_t top_modules = 1;
  bool detailed = true;
  std::string output_file;
};

struct CommsLoggerConfig {
  bool enabled = false;
  bool verbose = false;
  bool prof_all = true;
  bool debug = false;
  std::vector<std::string> prof_ops;
};

struct CheckpointConfig {
  std::string tag_validation = "Warn";  // Ignore | Warn | Fail
  bool load_universal = false;
  bool use_node_local_storage = false;
  bool parallel_write_pipeline_stage = false;
};

struct DeepSpeedConfig {
  BatchConfig batch;
  double gradient_clipping = 1.0;  // 0 = off; DeepSpeed >= 0.19.3 defaults to 1.0
  std::optional<std::int64_t> steps_per_print;  // absent = no periodic print
  bool wall_clock_breakdown = false;
  bool memory_breakdown = false;
  bool prescale_gradients = false;
  double gradient_predivide_factor = 1.0;
  bool zero_allow_untested_optimizer = false;
  bool zero_force_ds_cpu_optimizer = true;
  bool sparse_gradients = false;
  bool dump_state = false;
  std::optional<Dtype> grad_accum_dtype;          // data_types.grad_accum_dtype
  std::optional<Dtype> communication_data_type;

  Fp16Config fp16;
  Bf16Config bf16;
  OptimizerConfig optimizer;
  std::optional<SchedulerConfig> scheduler;  // absent = constant lr
  ZeroConfig zero;
  AioConfig aio;
  ActivationCheckpointingConfig activation_checkpointing;
  FlopsProfilerConfig flops_profiler;
  CommsLoggerConfig comms_logger;
  CheckpointConfig checkpoint;
  MonitorConfig tensorboard;
  MonitorConfig wandb;
  MonitorConfig csv_monitor;
  MonitorConfig comet;

  // Dotted paths whose value is still "auto" (only when parsing allowed it: `config check`
  // without training arguments). Their fields hold the default meanwhile.
  std::vector<std::string> auto_keys;

  Dtype compute_dtype() const noexcept {
    return fp16.enabled ? Dtype::kFp16 : (bf16.enabled ? Dtype::kBf16 : Dtype::kFp32);
  }
};

}  // namespace zinf::config
