// DeepSpeedConfig -> JSON with every default spelled out (`zinf config check --json`, and the
// deepspeed_config_auto.json a run writes next to its metrics).
#include <cmath>

#include "zinf/configs/parse.hpp"

namespace zinf::config {

namespace {

Json offload_param_json(const OffloadParamConfig& c) {
  Json j;
  j["device"] = to_string(c.device);
  j["nvme_path"] = c.nvme_path.empty() ? Json(nullptr) : Json(c.nvme_path);
  j["pin_memory"] = c.pin_memory;
  j["buffer_count"] = c.buffer_count;
  j["buffer_size"] = c.buffer_size;
  j["max_in_cpu"] = c.max_in_cpu;
  return j;
}

Json offload_optimizer_json(const OffloadOptimizerConfig& c) {
  Json j;
  j["device"] = to_string(c.device);
  j["nvme_path"] = c.nvme_path.empty() ? Json(nullptr) : Json(c.nvme_path);
  j["pin_memory"] = c.pin_memory;
  j["buffer_count"] = c.buffer_count;
  j["pipeline_read"] = c.pipeline_read;
  j["pipeline_write"] = c.pipeline_write;
  j["fast_init"] = c.fast_init;
  j["ratio"] = c.ratio;
  return j;
}

Json monitor_json(const MonitorConfig& m, bool with_project) {
  Json j;
  j["enabled"] = m.enabled;
  if (with_project) {
    j["project"] = m.project;
  } else {
    j["output_path"] = m.output_path;
    j["job_name"] = m.job_name;
  }
  return j;
}

Json scheduler_params_json(const SchedulerConfig& s) {
  Json p;
  switch (s.type) {
    case SchedulerType::kLRRangeTest:
      p["lr_range_test_min_lr"] = s.lr_range_test.min_lr;
      p["lr_range_test_step_size"] = s.lr_range_test.step_size;
      p["lr_range_test_step_rate"] = s.lr_range_test.step_rate;
      p["lr_range_test_staircase"] = s.lr_range_test.staircase;
      break;
    case SchedulerType::kOneCycle: {
      const auto& q = s.one_cycle;
      p["cycle_min_lr"] = q.cycle_min_lr;
      p["cycle_max_lr"] = q.cycle_max_lr;
      p["decay_lr_rate"] = q.decay_lr_rate;
      p["cycle_first_step_size"] = q.cycle_first_step_size;
      p["cycle_second_step_size"] = q.cycle_second_step_size;
      p["cycle_first_stair_count"] = q.cycle_first_stair_count ? Json(*q.cycle_first_stair_count) : Json(nullptr);
      p["cycle_second_stair_count"] = q.cycle_second_stair_count ? Json(*q.cycle_second_stair_count) : Json(nullptr);
      p["decay_step_size"] = q.decay_step_size;
      p["cycle_momentum"] = q.cycle_momentum;
      p["cycle_min_mom"] = q.cycle_min_mom;
      p["cycle_max_mom"] = q.cycle_max_mom;
      p["decay_mom_rate"] = q.decay_mom_rate;
      break;
    }
    case SchedulerType::kWarmupLR:
    case SchedulerType::kWarmupDecayLR:
      p["warmup_min_lr"] = s.warmup.warmup_min_lr;
      p["warmup_max_lr"] = s.warmup.warmup_max_lr;
      p["warmup_num_steps"] = s.warmup.warmup_num_steps;
      p["warmup_type"] = to_string(s.warmup.warmup_type);
      if (s.type == SchedulerType::kWarmupDecayLR) p["total_num_steps"] = s.warmup.total_num_steps;
      break;
    case SchedulerType::kWarmupCosineLR:
      p["total_num_steps"] = s.warmup_cosine.total_num_steps;
      p["warmup_min_ratio"] = s.warmup_cosine.warmup_min_ratio;
      p["warmup_num_steps"] = s.warmup_cosine.warmup_num_steps;
      p["cos_min_ratio"] = s.warmup_cosine.cos_min_ratio;
      p["warmup_type"] = to_string(s.warmup_cosine.warmup_type);
      break;
  }
  return p;
}

}  // namespace

Json to_json(const DeepSpeedConfig& c) {
  Json j;
  if (c.batch.resolved) {
    j["train_batch_size"] = c.batch.train;
    j["train_micro_batch_size_per_gpu"] = c.batch.micro;
    j["gradient_accumulation_steps"] = c.batch.gas;
  } else {
    auto opt = [](const std::optional<std::int64_t>& v) { return v ? Json(*v) : Json("auto"); };
    j["train_batch_size"] = opt(c.batch.train_batch_size);
    j["train_micro_batch_size_per_gpu"] = opt(c.batch.micro_batch_per_gpu);
    j["gradient_accumulation_steps"] = opt(c.batch.gradient_accumulation_steps);
  }
  j["gradient_clipping"] = c.gradient_clipping;
  j["steps_per_print"] = c.steps_per_print ? Json(*c.steps_per_print) : Json(nullptr);
  j["wall_clock_breakdown"] = c.wall_clock_breakdown;
  j["memory_breakdown"] = c.memory_breakdown;
  j["prescale_gradients"] = c.prescale_gradients;
  j["gradient_predivide_factor"] = c.gradient_predivide_factor;
  j["zero_allow_untested_optimizer"] = c.zero_allow_untested_optimizer;
  j["zero_force_ds_cpu_optimizer"] = c.zero_force_ds_cpu_optimizer;
  j["sparse_gradients"] = c.sparse_gradients;
  j["dump_state"] = c.dump_state;
  j["data_types"]["grad_accum_dtype"] = c.grad_accum_dtype ? Json(to_string(*c.grad_accum_dtype)) : Json(nullptr);
  j["communication_data_type"] =
      c.communication_data_type ? Json(to_string(*c.communication_data_type)) : Json(nullptr);

  auto& fp16 = j["fp16"];
  fp16["enabled"] = c.fp16.enabled;
  fp16["auto_cast"] = c.fp16.auto_cast;
  fp16["loss_scale"] = c.fp16.loss_scale;
  fp16["initial_scale_power"] = c.fp16.initial_scale_power;
  fp16["loss_scale_window"] = c.fp16.loss_scale_window;
  fp16["hysteresis"] = c.fp16.hysteresis;
  fp16["consecutive_hysteresis"] = c.fp16.consecutive_hysteresis;
  fp16["min_loss_scale"] = c.fp16.min_loss_scale;
  auto& bf16 = j["bf16"];
  bf16["enabled"] = c.bf16.enabled;
  bf16["immediate_grad_update"] = c.bf16.immediate_grad_update;
  bf16["check_grad_overflow"] = c.bf16.check_grad_overflow;

  if (c.optimizer.from_config) {
    auto& o = j["optimizer"];
    o["type"] = to_string(c.optimizer.type);
    auto& p = o["params"];
    p["lr"] = c.optimizer.lr;
    if (c.optimizer.type != OptimizerType::kAdagrad) p["betas"] = {c.optimizer.beta1, c.optimizer.beta2};
    if (c.optimizer.type != OptimizerType::kLion) p["eps"] = c.optimizer.eps;
    p["weight_decay"] = c.optimizer.weight_decay;
    if (c.optimizer.type == OptimizerType::kAdam || c.optimizer.type == OptimizerType::kAdamW) {
      p["adam_w_mode"] = c.optimizer.adam_w_mode;
      p["bias_correction"] = c.optimizer.bias_correction;
    }
    if (c.optimizer.type == OptimizerType::kAdagrad) {
      p["lr_decay"] = c.optimizer.lr_decay;
      p["initial_accumulator_value"] = c.optimizer.initial_accumulator;
    }
  }
  if (c.scheduler) {
    j["scheduler"]["type"] = to_string(c.scheduler->type);
    j["scheduler"]["params"] = scheduler_params_json(*c.scheduler);
  }

  auto& z = j["zero_optimization"];
  z["stage"] = c.zero.stage;
  z["contiguous_gradients"] = c.zero.contiguous_gradients;
  z["reduce_scatter"] = c.zero.reduce_scatter;
  z["reduce_bucket_size"] = c.zero.reduce_bucket_size;
  z["allgather_partitions"] = c.zero.allgather_partitions;
  z["allgather_bucket_size"] = c.zero.allgather_bucket_size;
  z["overlap_comm"] = c.zero.overlap_comm;
  z["sub_group_size"] = c.zero.sub_group_size;
  z["stage3_prefetch_bucket_size"] = c.zero.prefetch_bucket_size;
  z["stage3_param_persistence_threshold"] = c.zero.param_persistence_threshold;
  z["stage3_model_persistence_threshold"] = c.zero.model_persistence_threshold;
  z["stage3_max_live_parameters"] = c.zero.max_live_parameters;
  z["stage3_max_reuse_distance"] = c.zero.max_reuse_distance;
  z["stage3_gather_16bit_weights_on_model_save"] = c.zero.gather_16bit_weights_on_model_save;
  z["round_robin_gradients"] = c.zero.round_robin_gradients;
  z["ignore_unused_parameters"] = c.zero.ignore_unused_parameters;
  z["elastic_checkpoint"] = c.zero.elastic_checkpoint;
  z["load_from_fp32_weights"] = c.zero.load_from_fp32_weights;
  if (c.zero.offload_param) z["offload_param"] = offload_param_json(*c.zero.offload_param);
  if (c.zero.offload_optimizer) z["offload_optimizer"] = offload_optimizer_json(*c.zero.offload_optimizer);

  auto& a = j["aio"];
  a["block_size"] = c.aio.block_size;
  a["queue_depth"] = c.aio.queue_depth;
  a["intra_op_parallelism"] = c.aio.intra_op_parallelism;
  a["single_submit"] = c.aio.single_submit;
  a["overlap_events"] = c.aio.overlap_events;
  a["use_gds"] = c.aio.use_gds;

  auto& ac = j["activation_checkpointing"];
  ac["partition_activations"] = c.activation_checkpointing.partition_activations;
  ac["contiguous_memory_optimization"] = c.activation_checkpointing.contiguous_memory_optimization;
  ac["cpu_checkpointing"] = c.activation_checkpointing.cpu_checkpointing;
  ac["number_checkpoints"] = c.activation_checkpointing.number_checkpoints
                                 ? Json(*c.activation_checkpointing.number_checkpoints)
                                 : Json(nullptr);
  ac["synchronize_checkpoint_boundary"] = c.activation_checkpointing.synchronize_checkpoint_boundary;
  ac["profile"] = c.activation_checkpointing.profile;

  auto& fp = j["flops_profiler"];
  fp["enabled"] = c.flops_profiler.enabled;
  fp["profile_step"] = c.flops_profiler.profile_step;
  fp["module_depth"] = c.flops_profiler.module_depth;
  fp["top_modules"] = c.flops_profiler.top_modules;
  fp["detailed"] = c.flops_profiler.detailed;
  fp["output_file"] = c.flops_profiler.output_file.empty() ? Json(nullptr) : Json(c.flops_profiler.output_file);

  auto& cl = j["comms_logger"];
  cl["enabled"] = c.comms_logger.enabled;
  cl["verbose"] = c.comms_logger.verbose;
  cl["prof_all"] = c.comms_logger.prof_all;
  cl["debug"] = c.comms_logger.debug;
  cl["prof_ops"] = c.comms_logger.prof_ops;

  auto& ck = j["checkpoint"];
  ck["tag_validation"] = c.checkpoint.tag_validation;
  ck["load_universal"] = c.checkpoint.load_universal;
  ck["use_node_local_storage"] = c.checkpoint.use_node_local_storage;
  ck["parallel_write"]["pipeline_stage"] = c.checkpoint.parallel_write_pipeline_stage;

  j["tensorboard"] = monitor_json(c.tensorboard, false);
  j["wandb"] = monitor_json(c.wandb, true);
  j["csv_monitor"] = monitor_json(c.csv_monitor, false);
  return j;
}

}  // namespace zinf::config
