#!/usr/bin/env bash
# End-to-end checks of the `zinf` CLI: exit codes (0 ok, 1 runtime error, 2 usage error), outputs
# and error texts. Usage: cli_test.sh ZINF_BINARY TEST_DATA_DIR
set -u
ZINF=$1
DATA=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
passed=0
failed=0

# expect CODE PATTERN -- COMMAND...: runs COMMAND, checks its exit code and that stdout+stderr
# matches the extended regex PATTERN ('' = anything).
expect() {
  local code=$1 pattern=$2
  shift 3
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    echo "FAIL (exit $rc, wanted $code): $*"; echo "$out" | head -20; failed=$((failed + 1)); return
  fi
  if [[ -n $pattern ]] && ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAIL (output lacks /$pattern/): $*"; echo "$out" | head -20; failed=$((failed + 1)); return
  fi
  passed=$((passed + 1))
}

# Usage, help and version.
expect 0 'check +Validate a config'    -- "$ZINF" config --help
expect 0 'Training arguments'           -- "$ZINF" config check --help
expect 0 '^zinf [0-9]+\.[0-9]+\.[0-9]+' -- "$ZINF" --version
expect 0 'cpu: (avx512|avx2|scalar)'    -- "$ZINF" --version
expect 2 'required'                     -- "$ZINF"
expect 2 ''                             -- "$ZINF" frobnicate
expect 2 "unknown command 'zinf frobnicate': choose one of config" -- "$ZINF" frobnicate
expect 2 "unknown command 'zinf config frob': choose one of check" -- "$ZINF" config frob
expect 2 'A subcommand is required'     -- "$ZINF" config
expect 2 'FILE is required'             -- "$ZINF" config check
expect 2 'not a number|could not be converted|Value' -- "$ZINF" config check x.json --micro-batch many
expect 2 ''                             -- "$ZINF" config check x.json --micro-batch 0
expect 2 'must be in'                   -- "$ZINF" config check x.json --beta1 1.5
expect 2 'excludes'                     -- "$ZINF" config check x.json --bf16 --fp16
expect 2 'required'                     -- "$ZINF" config resolve deepspeed_zero2
expect 2 ''                             -- "$ZINF" config check x.json --no-such-flag

# config check: presets, real-world files, bad input.
for preset in deepspeed_zero0 deepspeed_zero1 deepspeed_zero2 deepspeed_zero2_offload deepspeed_zero3 \
              deepspeed_zero3_cpuoffload deepspeed_zero3_nvme; do
  expect 0 '^OK' -- "$ZINF" config check "$preset"
done
for f in "$DATA"/real_world/*; do
  expect 0 '^OK' -- "$ZINF" config check "$f"
done
expect 0 'ZeRO stage +3'                              -- "$ZINF" config check deepspeed_zero3_cpuoffload
expect 0 'parameters +host memory \(pinned\)'         -- "$ZINF" config check deepspeed_zero3_cpuoffload
expect 0 'train_batch_size 32 = micro 2 x grad accum 16 x world 1' -- "$ZINF" config check "$DATA/real_world/zero3_cpuoffload_onecycle.yaml"
expect 0 'train_batch_size 128 = micro 4 x grad accum 8 x world 4' -- "$ZINF" config check deepspeed_zero2 --micro-batch 4 --grad-accum 8 --world-size 4
expect 0 'bf16 mixed'                                 -- "$ZINF" config check deepspeed_zero2 --bf16
expect 1 '64 != 4 \* 16 \* 2'                         -- "$ZINF" config check "$DATA/real_world/zero2_cpu_offload_fp16_warmuplr.json" --world-size 2
expect 1 'contradicts a training argument'            -- "$ZINF" config check "$DATA/real_world/zero3_nvme_aio.json" --lr 0.5
expect 1 'deprecated'                                 -- "$ZINF" config check "$DATA/real_world/hf_ds_config_zero3.json" --strict
expect 1 'no such file'                               -- "$ZINF" config check "$TMP/missing.json"
expect 1 'did you mean "deepspeed_zero3_cpuoffload"'  -- "$ZINF" config check deepspeed_zero3_cpuofload
expect 1 'empty'                                      -- "$ZINF" config check "$DATA/invalid/empty.json"
expect 1 'empty'                                      -- "$ZINF" config check "$DATA/invalid/whitespace.json"
expect 1 'invalid JSON'                               -- "$ZINF" config check "$DATA/invalid/binary.json"
expect 1 'invalid JSON'                               -- "$ZINF" config check "$DATA/invalid/truncated.json"
expect 1 'duplicate key "zero_optimization.stage"'    -- "$ZINF" config check "$DATA/invalid/duplicate_key.json"
expect 1 'is a directory'                             -- "$ZINF" config check "$DATA"
many=$("$ZINF" config check "$DATA/invalid/many_errors.json" 2>&1)
for fragment in 'gradient_clipping: expected a number, found string "1.0"' \
                'fp16.loss_scale_windw: unknown key; did you mean "loss_scale_window"' \
                'bf16.enabled: bfloat16 and fp16 modes cannot be simultaneously enabled' \
                'optimizer.params.lr: -1 is out of range' \
                'optimizer.params.betas: expected a list of two numbers' \
                'optimizer.params.max_grad_norm' \
                'zero_optimization.stage: 4 is out of range' \
                'zero_optimization.stage3_prefetch_bucket_sise: unknown key; did you mean "stage3_prefetch_bucket_size"' \
                'zero_optimization.offload_param.device: "gpu" is not one of' \
                'zero_optimization.offload_optimizer.nvme_path: missing' \
                'train_batch_size is not equal to micro_batch_per_gpu \* gradient_acc_step \* world_size 32 != 4 \* 4 \* 1'; do
  if grep -Eq -- "$fragment" <<<"$many"; then passed=$((passed + 1)); else echo "FAIL: many_errors lacks /$fragment/"; failed=$((failed + 1)); fi
done
expect 1 '"ok": false' -- "$ZINF" config check "$DATA/invalid/many_errors.json" --json
json=$("$ZINF" config check deepspeed_zero3 --json --micro-batch 2)
if /usr/bin/env python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["ok"] and d["config"]["zero_optimization"]["stage"]==3' <<<"$json"; then
  passed=$((passed + 1)); else echo "FAIL: check --json is not one valid object"; failed=$((failed + 1)); fi

# config resolve.
expect 0 'wrote' -- "$ZINF" config resolve deepspeed_zero3_cpuoffload --micro-batch 4 --grad-accum 2 --lr 3e-4 --bf16 --hidden-size 1024 -o "$TMP/resolved.json"
expect 0 '^OK' -- "$ZINF" config check "$TMP/resolved.json"
if grep -q '"auto"' "$TMP/resolved.json"; then echo "FAIL: resolved config still holds auto"; failed=$((failed + 1)); else passed=$((passed + 1)); fi
expect 0 '"train_batch_size": 8' -- cat "$TMP/resolved.json"
expect 0 '"reduce_bucket_size": 1048576' -- cat "$TMP/resolved.json"
expect 0 'stage: 3' -- "$ZINF" config resolve deepspeed_zero3 --yaml -o -
expect 0 '"aio"' -- "$ZINF" config resolve deepspeed_zero2 --full -o -
expect 1 'set these DeepSpeed config values to "auto"' -- "$ZINF" config resolve "$DATA/real_world/zero3_nvme_aio.json" --lr 1 -o "$TMP/x.json"
printf '{"extends": "deepspeed_zero2", "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}' >"$TMP/decay.json"
expect 1 'total_num_steps: pass --total-steps' -- "$ZINF" config resolve "$TMP/decay.json" -o "$TMP/x.json"
expect 0 '"total_num_steps": 500' -- "$ZINF" config resolve "$TMP/decay.json" --total-steps 500 -o -
expect 1 'does not exist' -- "$ZINF" config resolve deepspeed_zero2 -o "$TMP/no/dir/x.json"
if [[ -e $TMP/x.json ]]; then echo "FAIL: a failed resolve wrote its output"; failed=$((failed + 1)); else passed=$((passed + 1)); fi

# presets and show.
expect 0 'deepspeed_zero3_nvme +ZeRO-3 with parameters and optimizer state on NVMe' -- "$ZINF" config presets
expect 0 '"name": "deepspeed_zero0"' -- "$ZINF" config presets --json
expect 0 '"stage": 3' -- "$ZINF" config show deepspeed_zero3_cpuoffload
expect 0 '^  stage: 3' -- "$ZINF" config show deepspeed_zero3_cpuoffload --yaml
expect 0 '^  stage: 2' -- "$ZINF" config show deepspeed_zero2.yaml
expect 1 'no preset named' -- "$ZINF" config show deepspeed_zero7

# bench io and tune nvme (small files and a small grid: the mechanics, not the drive).
mkdir -p "$TMP/io"
expect 0 'pread +read +seq' -- "$ZINF" bench io --path "$TMP/io" --size 32M --block-size 256K --queue-depth 4 --parallelism 2
expect 0 '"read_GBps"' -- "$ZINF" bench io --path "$TMP/io" --size 16M --json
expect 0 'rotate through 64 MiB' -- "$ZINF" bench io --path "$TMP/io" --size 16M --buffer-footprint 64M
expect 2 'not a size' -- "$ZINF" bench io --path "$TMP/io" --size 16M --buffer-footprint big
expect 0 '"queue_depth": 16' -- "$ZINF" bench io --path "$TMP/io" --size 16M --json --config "$DATA/real_world/zero3_nvme_aio.json" --queue-depth 16
expect 0 'best aio block' -- "$ZINF" bench io --path "$TMP/io" --size 16M --sweep --sweep-block-sizes 256K,1M --sweep-queue-depths 4 --sweep-parallelism 1,2
expect 0 '"best_write"' -- "$ZINF" bench io --path "$TMP/io" --size 16M --sweep --sweep-block-sizes 1M --sweep-queue-depths 4 --sweep-parallelism 1 --json
printf '{"train_micro_batch_size_per_gpu": 2, "aio": {"block_size": 4096}}' >"$TMP/io/ds.json"
expect 0 'wrote the aio block' -- "$ZINF" tune nvme --path "$TMP/io" --size 16M --sweep-block-sizes 256K,1M --sweep-queue-depths 4,8 --sweep-parallelism 1 -o "$TMP/io/ds.json"
expect 0 '"train_micro_batch_size_per_gpu": 2' -- cat "$TMP/io/ds.json"
expect 0 '"intra_op_parallelism": 1' -- cat "$TMP/io/ds.json"
expect 0 '^OK' -- "$ZINF" config check "$TMP/io/ds.json"
expect 0 '"block_size"' -- "$ZINF" tune nvme --path "$TMP/io" --size 16M --sweep-block-sizes 1M --sweep-queue-depths 4 --sweep-parallelism 1 -o "$TMP/io/new.json" --json
expect 0 '"overlap_events": true' -- cat "$TMP/io/new.json"
if [[ -n $(ls "$TMP/io" | grep zinf-bench) ]]; then echo "FAIL: bench left its test file behind"; failed=$((failed + 1)); else passed=$((passed + 1)); fi
expect 1 'does not exist' -- "$ZINF" bench io --path "$TMP/nope" --size 16M
expect 1 'not enough free space' -- "$ZINF" bench io --path "$TMP/io" --size 900T
expect 2 'not a size' -- "$ZINF" bench io --path "$TMP/io" --size lots
expect 2 'unknown unit' -- "$ZINF" bench io --path "$TMP/io" --size 4X
expect 2 'required' -- "$ZINF" bench io --size 16M
expect 1 'aio.block_size=1000' -- "$ZINF" bench io --path "$TMP/io" --size 16M --block-size 1000
expect 2 'multiple of 4K' -- "$ZINF" bench io --path "$TMP/io" --sweep --sweep-block-sizes 1000
expect 2 '' -- "$ZINF" bench io --path "$TMP/io" --queue-depth 0
printf '[1, 2]' >"$TMP/io/array.json"
expect 1 'must be a JSON object' -- "$ZINF" tune nvme --path "$TMP/io" --size 16M --sweep-block-sizes 1M --sweep-queue-depths 4 --sweep-parallelism 1 -o "$TMP/io/array.json"
expect 0 '^\[1, 2\]' -- cat "$TMP/io/array.json"
expect 1 "directory '$TMP/io/no' does not exist" -- "$ZINF" tune nvme --path "$TMP/io" --size 16M -o "$TMP/io/no/x.json"

# bench model (a tiny config: the mechanics and the output, not the machine).
cat > "$TMP/tiny_model.json" <<'EOT'
{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 64}
EOT
expect 0 'tokens/s.*model TFLOP/s' -- "$ZINF" bench model --model "$TMP/tiny_model.json" --seq 32 --batch 2 --steps 1
expect 0 'attention.backward' -- "$ZINF" bench model --model "$TMP/tiny_model.json" --seq 16 --batch 1 --steps 1 --dtype fp32 --no-checkpoint
expect 0 '"tokens_per_s"' -- "$ZINF" bench model --model "$TMP/tiny_model.json" --seq 16 --batch 1 --steps 1 --json
mkdir -p "$TMP/tiny_dir" && cp "$TMP/tiny_model.json" "$TMP/tiny_dir/config.json"
expect 0 'Llama 2 layers' -- "$ZINF" bench model --model "$TMP/tiny_dir" --seq 16 --batch 1 --steps 1
expect 2 'model is required' -- "$ZINF" bench model --seq 16
expect 2 '' -- "$ZINF" bench model --model "$TMP/tiny_model.json" --dtype fp8
expect 1 'exceeds the model.s max_position_embeddings 64' -- "$ZINF" bench model --model "$TMP/tiny_model.json" --seq 65 --steps 1
expect 1 'cannot read model config' -- "$ZINF" bench model --model "$TMP/none.json"
echo '{"architectures": ["GPT2LMHeadModel"], "hidden_size": 64}' > "$TMP/gpt2.json"
expect 1 "architecture 'GPT2LMHeadModel' is not supported" -- "$ZINF" bench model --model "$TMP/gpt2.json"

# bench adam (tiny sizes: the mechanics and the output, not the machine).
expect 0 'host_step_adamw_bf16 ' -- "$ZINF" bench adam --params 1M --repeat 1 --threads 2
expect 0 'stream_triad' -- "$ZINF" bench adam --params 1M --repeat 1 --isa scalar
expect 0 '"stream_triad_GBps"' -- "$ZINF" bench adam --params 256K --repeat 1 --json --grad-dtype fp16
expect 0 '"params_per_s"' -- "$ZINF" bench adam --params 256K --repeat 1 --json
expect 2 'choose fp32, bf16 or fp16' -- "$ZINF" bench adam --grad-dtype int8
expect 2 'not a count' -- "$ZINF" bench adam --params lots
expect 1 'unknown CPU ISA' -- "$ZINF" bench adam --params 1K --isa sse9
expect 1 'ZINF_CPU_ISA' -- env ZINF_CPU_ISA=mmx "$ZINF" bench adam --params 1K --repeat 1

# bench offload (tiny sizes: the mechanics, the bounds and the errors).
mkdir -p "$TMP/swap"
expect 0 'best pipelined step: .* of min\(disk, kernel\)' -- "$ZINF" bench offload --device cpu --params 1M --units 4 --steps 1
expect 0 'mixed pass .* GB/s'       -- "$ZINF" bench offload --path "$TMP/swap" --params 1M --units 3 --sub-group 64K --steps 1 --serial
expect 0 'phased I/O'               -- "$ZINF" bench offload --path "$TMP/swap" --params 512K --ratio 0.5 --io phased --steps 1
expect 0 '"fraction_of_bound"'      -- "$ZINF" bench offload --path "$TMP/swap" --params 512K --steps 1 --json
expect 0 '"disk_file_bytes": 268435456' -- "$ZINF" bench offload --path "$TMP/swap" --params 256K --steps 1 --json --disk-size 256M
expect 2 'needs --path'             -- "$ZINF" bench offload --params 1M
expect 2 ''                         -- "$ZINF" bench offload --device gpu --params 1M
expect 2 ''                         -- "$ZINF" bench offload --device cpu --ratio 2
expect 2 'not a count'              -- "$ZINF" bench offload --device cpu --sub-group many
expect 1 'does not exist|create it' -- "$ZINF" bench offload --path "$TMP/no/such/dir" --params 1M
expect 1 'ZINF_OFFLOAD_IO=sideways' -- env ZINF_OFFLOAD_IO=sideways "$ZINF" bench offload --device cpu --params 1M
[[ -z $(ls -A "$TMP/swap") ]] || { echo "FAIL: bench offload left files in $TMP/swap"; failed=$((failed + 1)); }

# train and data tokenize (tiny runs: the mechanics; the trainer's numerics are in trainer_test).
mkdir -p "$TMP/train"
printf 'hello zinf, %.0s' {1..400} > "$TMP/train/text.txt"
printf '{"text": "one two three four five six seven eight nine ten"}\n%.0s' {1..60} > "$TMP/train/docs.jsonl"
expect 0 'wrote .*text.tok: 4800 tokens' -- "$ZINF" data tokenize "$TMP/train/text.txt" -o "$TMP/train/text.tok"
expect 0 'from 60 document' -- "$ZINF" data tokenize "$TMP/train/docs.jsonl" -o "$TMP/train/docs.tok"
expect 1 'no string field "body"' -- "$ZINF" data tokenize "$TMP/train/docs.jsonl" -o "$TMP/train/x.tok" --jsonl-key body
expect 1 'cannot load SentencePiece model' -- "$ZINF" data tokenize "$TMP/train/text.txt" -o "$TMP/train/x.tok" --tokenizer "$TMP/train/text.txt"
expect 1 'cannot load SentencePiece model' -- "$ZINF" data tokenize "$TMP/train/text.txt" -o "$TMP/train/x.tok" --tokenizer spm
expect 2 '' -- "$ZINF" data tokenize "$TMP/train/missing.txt" -o "$TMP/train/x.tok"
expect 0 'outputs in .*/run1' -- "$ZINF" train --max-steps 3 --seq-len 32 --output-dir "$TMP/train/run1"
for f in training_metrics.csv summary.json deepspeed_config_auto.json zinf.log checkpoints/latest training_curves.png; do
  [[ -s $TMP/train/run1/$f ]] || { echo "FAIL: zinf train left no $f"; failed=$((failed + 1)); }
done
[[ $(wc -l < "$TMP/train/run1/training_metrics.csv") -eq 4 ]] || { echo "FAIL: metrics rows"; failed=$((failed + 1)); }
expect 0 'done after 5 steps' -- "$ZINF" train --max-steps 5 --seq-len 32 --output-dir "$TMP/train/run1" --resume
expect 0 'resumed from .*step-00000005' -- "$ZINF" train --max-steps 6 --seq-len 32 --output-dir "$TMP/train/run1" --resume "$TMP/train/run1/checkpoints/step-00000005"
expect 0 'done after 4 steps' -- "$ZINF" train --data "$TMP/train/text.tok" --max-steps 4 --seq-len 16 --micro-batch 2 --bf16 --output-dir "$TMP/train/run2"
expect 0 'wrote .*/hf from .*step-00000006: model.safetensors, config.json' -- "$ZINF" ckpt export "$TMP/train/run1" --to "$TMP/train/hf"
[[ -s $TMP/train/hf/config.json ]] || { echo "FAIL: ckpt export left no config.json"; failed=$((failed + 1)); }
expect 1 'not a zinf checkpoint' -- "$ZINF" ckpt export "$TMP/train" --to "$TMP/train/hf2"
# Outputs never replace anything but their own kind: a file in --to's place, a symlink as -o, or
# -o naming the input are refused and left as they were.
echo keep > "$TMP/not_a_dir"
expect 1 'not a directory' -- "$ZINF" ckpt export "$TMP/train/run1" --to "$TMP/not_a_dir"
[[ $(cat "$TMP/not_a_dir") == keep ]] || { echo "FAIL: ckpt export replaced a file"; failed=$((failed + 1)); }
printf 'some text\n' > "$TMP/in.txt"
expect 1 'is the input file' -- "$ZINF" data tokenize "$TMP/in.txt" -o "$TMP/in.txt"
ln -sf "$TMP/not_a_dir" "$TMP/link.tok"
expect 1 'symbolic link' -- "$ZINF" data tokenize "$TMP/in.txt" -o "$TMP/link.tok"
[[ $(cat "$TMP/not_a_dir") == keep && -L $TMP/link.tok ]] || { echo "FAIL: tokenize wrote through a symlink"; failed=$((failed + 1)); }
expect 2 '' -- "$ZINF" ckpt export "$TMP/train/run1" --to "$TMP/train/hf3" --dtype fp8
# LoRA on the exported model: adapters in PEFT's format, resume, merge, plan, mistakes.
lora=(--model "$TMP/train/hf" --init "$TMP/train/hf" --seq-len 32 --lora-rank 4 --lora-targets all-linear --lora-dropout 0.1)
expect 0 'LoRA adapters \(PEFT format\) in .*step-00000003' -- "$ZINF" train "${lora[@]}" --max-steps 3 --output-dir "$TMP/train/lora"
for f in adapter_model.safetensors adapter_config.json optimizer_state.safetensors; do
  [[ -s $TMP/train/lora/checkpoints/step-00000003/$f ]] || { echo "FAIL: LoRA checkpoint lacks $f"; failed=$((failed + 1)); }
done
expect 0 '"peft_type": "LORA"' -- cat "$TMP/train/lora/checkpoints/step-00000003/adapter_config.json"
expect 0 'done after 4 steps' -- "$ZINF" train "${lora[@]}" --max-steps 4 --output-dir "$TMP/train/lora" --resume
expect 1 'resume with the same --lora-\* options' -- "$ZINF" train "${lora[@]}" --lora-alpha 16 --max-steps 5 --output-dir "$TMP/train/lora" --resume
expect 0 'merged .*step-00000004 \([0-9]+ adapted linears' -- "$ZINF" ckpt merge --base "$TMP/train/hf" --adapter "$TMP/train/lora" --to "$TMP/train/merged"
[[ -s $TMP/train/merged/model.safetensors && -s $TMP/train/merged/config.json ]] || { echo "FAIL: ckpt merge wrote no model"; failed=$((failed + 1)); }
expect 0 'done after 1 steps' -- "$ZINF" train --model "$TMP/train/merged" --init "$TMP/train/merged" --seq-len 32 --max-steps 1 --no-save --output-dir "$TMP/train/on-merged"
expect 1 'not a LoRA adapter directory' -- "$ZINF" ckpt merge --base "$TMP/train/hf" --adapter "$TMP/train/run1" --to "$TMP/train/merged2"
expect 1 'zinf ckpt merge' -- "$ZINF" ckpt export "$TMP/train/lora" --to "$TMP/train/hf4"
expect 1 "LoRA target 'wq' is not a module" -- "$ZINF" train --seq-len 32 --max-steps 1 --lora-rank 4 --lora-targets wq --output-dir "$TMP/train/lora2"
expect 2 'requires --lora-rank' -- "$ZINF" train --lora-alpha 16 --max-steps 1
expect 0 'LoRA: [0-9]+ adapters' -- "$ZINF" plan --model "$TMP/train/hf" --lora-rank 8 --lora-targets all-linear --micro-batch 2 --seq-len 64
# SIGINT: the step finishes, a checkpoint is saved, exit 0; --resume continues.
train_until_a_step() {  # NAME: a long zinf train in the background (sig_pid) once it has logged a step
  "$ZINF" train --max-steps 100000 --seq-len 32 --output-dir "$TMP/train/$1" > "$TMP/train/$1.log" 2>&1 &
  sig_pid=$!
  for _ in $(seq 600); do grep -q '^step [0-9]' "$TMP/train/$1.log" 2>/dev/null && break; sleep 0.1; done
}
train_until_a_step sig
kill -INT "$sig_pid"
wait "$sig_pid"
sig_rc=$?
if [[ $sig_rc -ne 0 ]] || ! grep -q 'stopped after' "$TMP/train/sig.log" || [[ ! -s $TMP/train/sig/checkpoints/latest ]]; then
  echo "FAIL: SIGINT during zinf train (exit $sig_rc)"; tail -5 "$TMP/train/sig.log"; failed=$((failed + 1))
else
  passed=$((passed + 1))
fi
# The stop signal lands while the training threads are inside oneDNN's kernels: none of them may
# take it (a handler there once corrupted the heap in about one stop in ten). Eight more stops,
# then a second signal, which ends the process at once.
sig_bad=0
for i in 1 2 3 4 5 6 7 8; do
  train_until_a_step "sig$i"
  kill -INT "$sig_pid"
  wait "$sig_pid"
  sig_rc=$?
  if [[ $sig_rc -ne 0 ]] || ! grep -q 'stopped after' "$TMP/train/sig$i.log"; then
    echo "FAIL: SIGINT stop $i of zinf train (exit $sig_rc)"; tail -3 "$TMP/train/sig$i.log"; sig_bad=1
  fi
  rm -rf "$TMP/train/sig$i"
done
train_until_a_step sig9
kill -INT "$sig_pid"
sleep 0.5
kill -INT "$sig_pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$sig_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$sig_pid" 2>/dev/null; then
  echo "FAIL: a second SIGINT did not end zinf train"; kill -9 "$sig_pid"; sig_bad=1
fi
wait "$sig_pid" 2>/dev/null
if [[ $sig_bad -eq 0 ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
expect 1 'needs the --output-dir' -- "$ZINF" train --resume
expect 1 'no checkpoint in' -- "$ZINF" train --resume --output-dir "$TMP/train/none"
expect 1 'no zinf token header.*--data-dtype' -- "$ZINF" train --data "$TMP/train/text.txt" --max-steps 1
printf 'abc' > "$TMP/train/odd.bin"
expect 1 'not a multiple' -- "$ZINF" train --data "$TMP/train/odd.bin" --data-dtype uint16 --max-steps 1
expect 1 'too few for training' -- "$ZINF" train --data "$TMP/train/text.tok" --seq-len 2000 --max-steps 1 --model "$DATA/../../configs/models/llama-110m.json"
expect 1 'max_position_embeddings' -- "$ZINF" train --seq-len 4096 --max-steps 1
echo '{"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}' > "$TMP/train/ds.json"
expect 1 'optimizer.params.lr' -- "$ZINF" train --max-steps 1 --deepspeed "$TMP/train/ds.json" --lr 0.1
expect 2 '' -- "$ZINF" train --max-steps 0
expect 2 '' -- "$ZINF" train --max-steps 2 --epochs 1

# launch and bench comm: local ranks, fail-fast, signals, collectives between processes.
expect 0 'rank=1 of 3 local=1' -- "$ZINF" launch --nproc 3 -- sh -c 'echo rank=$RANK of $WORLD_SIZE local=$LOCAL_RANK port=$MASTER_PORT'
start=$(date +%s)
expect 7 'rank 1 exited with code 7; stopping the other 2' -- "$ZINF" launch --nproc 3 -- sh -c 'if [ $RANK = 1 ]; then exit 7; fi; sleep 60'
[[ $(( $(date +%s) - start )) -lt 20 ]] || { echo "FAIL: launch did not stop the other ranks promptly"; failed=$((failed + 1)); }
# Rank 1 ignores SIGTERM (and says so through a file before rank 0 dies): SIGKILL after the grace.
expect 137 'still running .* killing them' -- "$ZINF" launch --nproc 2 --grace 1 -- sh -c "trap '' TERM; if [ \$RANK = 1 ]; then touch $TMP/r1ready; sleep 60; else while [ ! -e $TMP/r1ready ]; do sleep 0.05; done; kill -9 \$\$; fi"
expect 127 'cannot run' -- "$ZINF" launch --nproc 2 -- /no/such/program
expect 2 '' -- "$ZINF" launch --nproc 0 -- true
expect 2 '' -- "$ZINF" launch --nproc 2
expect 0 'all-reduce .* GB/s' -- "$ZINF" launch --nproc 2 -- "$ZINF" bench comm --size 4M --iterations 2
expect 0 '"ranks": 3' -- "$ZINF" launch --nproc 3 -- "$ZINF" bench comm --size 1M --iterations 1 --json
expect 0 'single process' -- "$ZINF" bench comm --size 1M --iterations 1
"$ZINF" launch --nproc 2 -- sh -c 'trap "echo got-int-$RANK; exit 0" INT; sleep 60 & wait' > "$TMP/launch_sig.log" 2>&1 &
launch_pid=$!
sleep 1
kill -INT "$launch_pid"
wait "$launch_pid"
launch_rc=$?
if [[ $launch_rc -ne 0 ]] || [[ $(grep -c '^got-int' "$TMP/launch_sig.log") -ne 2 ]]; then
  echo "FAIL: SIGINT forwarding (exit $launch_rc)"; cat "$TMP/launch_sig.log"; failed=$((failed + 1))
else
  passed=$((passed + 1))
fi

expect 0 'done after 3 steps' -- "$ZINF" launch --nproc 2 -- "$ZINF" train --max-steps 3 --seq-len 32 --output-dir "$TMP/train/dp2"
[[ -s $TMP/train/dp2/checkpoints/step-00000003/optimizer_state.rank00001-of-00002.safetensors ]] || { echo "FAIL: 2-rank train left no rank 1 shard"; failed=$((failed + 1)); }
expect 0 'wrote .*/dp2hf' -- "$ZINF" ckpt export "$TMP/train/dp2" --to "$TMP/train/dp2hf"
expect 1 'pass --output-dir' -- "$ZINF" launch --nproc 2 -- "$ZINF" train --max-steps 1
expect 1 'this job has 1 rank' -- "$ZINF" train --max-steps 1 --world-size 2 --output-dir "$TMP/train/ws"
# --device cuda where no GPU is usable (CI): a clear error, not a crash; on a GPU host it trains.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  expect 1 'no usable GPU|not in this build' -- "$ZINF" train --device cuda --max-steps 1 --output-dir "$TMP/train/nogpu"
  expect 1 'no usable GPU|not in this build' -- "$ZINF" bench model --model "$DATA/../../configs/models/tiny-byte.json" --backend cuda --steps 1
fi
expect 2 'device' -- "$ZINF" train --device tpu --max-steps 1
expect 1 'gpu-memory-limit: caps GPU memory, so it needs --device cuda' -- "$ZINF" train --gpu-memory-limit 24GiB --max-steps 1 --output-dir "$TMP/train/gml"
expect 1 "gpu-memory-limit: '24Q': unknown unit" -- "$ZINF" train --device cuda --gpu-memory-limit 24Q --max-steps 1 --output-dir "$TMP/train/gml"
expect 2 'gpu-overlap' -- "$ZINF" train --gpu-overlap maybe --max-steps 1 --output-dir "$TMP/train/gov"
# Numbers out of range are refused, not clamped or wrapped; a batch whose product overflows too.
expect 2 'out of range' -- "$ZINF" train --max-steps 99999999999999999999999 --output-dir "$TMP/train/ovf"
expect 2 'at least 0' -- "$ZINF" train --seed -1 --max-steps 1 --output-dir "$TMP/train/ovf"
expect 2 'out of range' -- "$ZINF" train --micro-batch 9223372036854775808 --max-steps 1 --output-dir "$TMP/train/ovf"
echo '{"train_micro_batch_size_per_gpu": 6148914691236517208, "gradient_accumulation_steps": 3}' > "$TMP/overflow.json"
expect 1 'overflows a 64-bit count' -- "$ZINF" config check "$TMP/overflow.json"
expect 1 'more tokens than any machine' -- "$ZINF" train --micro-batch 9223372036854775807 --max-steps 1 --output-dir "$TMP/train/ovf"
expect 2 'not a finite number' -- "$ZINF" train --eval-fraction nan --max-steps 1 --output-dir "$TMP/train/ovf"
expect 2 'not a finite number' -- "$ZINF" train --lr inf --max-steps 1 --output-dir "$TMP/train/ovf"
expect 2 'has no unit' -- "$ZINF" plan --model "$DATA/../../configs/models/tiny-byte.json" --gpu-mem 24 --host-mem 128G
expect 1 "ZINF_GPU_OVERLAP='yes' is not 0 or 1" -- env ZINF_GPU_OVERLAP=yes "$ZINF" train --max-steps 1 --output-dir "$TMP/train/gov"

# A rank killed mid-training ends the whole job within seconds, naming it.
"$ZINF" launch --nproc 2 --grace 2 -- "$ZINF" train --max-steps 100000 --seq-len 32 --output-dir "$TMP/train/dpkill" > "$TMP/train/dpkill.log" 2>&1 &
kill_launcher=$!
for _ in $(seq 600); do grep -q '^step [0-9]' "$TMP/train/dpkill.log" 2>/dev/null && break; sleep 0.1; done
victim=$(pgrep -P "$kill_launcher" | tail -1)
kill_start=$(date +%s)
kill -9 "$victim"
wait "$kill_launcher"
kill_rc=$?
if [[ $kill_rc -ne 137 ]] || ! grep -q 'was killed by signal 9' "$TMP/train/dpkill.log" || [[ $(( $(date +%s) - kill_start )) -gt 30 ]]; then
  echo "FAIL: a killed training rank did not end the job promptly (exit $kill_rc)"; tail -5 "$TMP/train/dpkill.log"; failed=$((failed + 1))
else
  passed=$((passed + 1))
fi

# Without a launcher (ranks started by hand, as mpirun or srun would): the survivor's next
# collective fails as soon as the dead rank's sockets close, with an error naming the collective.
solo_port=$(( 20000 + RANDOM % 20000 ))
for r in 0 1; do
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$solo_port WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 ZINF_JOB_ID=solo$$ \
    "$ZINF" train --max-steps 100000 --seq-len 32 --output-dir "$TMP/train/solo" > "$TMP/train/solo$r.log" 2>&1 &
  eval "solo_pid$r=\$!"
done
for _ in $(seq 600); do grep -q '^step [0-9]' "$TMP/train/solo0.log" 2>/dev/null && break; sleep 0.1; done
solo_start=$(date +%s)
kill -9 "$solo_pid1"
wait "$solo_pid0"
solo_rc=$?
if [[ $solo_rc -ne 1 ]] || ! grep -q 'rank 0 of 2: .* failed: .*a rank has probably died' "$TMP/train/solo0.log" ||
   [[ $(( $(date +%s) - solo_start )) -gt 10 ]]; then
  echo "FAIL: without a launcher, a killed rank did not end the other promptly (exit $solo_rc)"; tail -3 "$TMP/train/solo0.log"
  failed=$((failed + 1))
else
  passed=$((passed + 1))
fi
wait "$solo_pid1" 2>/dev/null


# zinf plan, zinf tune, zinf bench mem / all / pcie (docs/plan.md).
ROOT=$(cd "$DATA/../.." && pwd)
M3=$ROOT/configs/models/bench-3.1b.json
REPORT=$ROOT/bench/results/raw/plan-validation-2026-12-01/bench/report.json
expect 0 'predicted 0\.9[0-9]+ s per step .*bound by host' -- \
  "$ZINF" plan --model "$M3" --micro-batch 4 --max-grad-norm 0 --host-mem 128G --gpu-mem 24G --bench "$REPORT"
expect 3 'gpu +10\.27 GiB +does not fit' -- "$ZINF" plan --model "$M3" --micro-batch 4 --gpu-mem 8G --host-mem 128G
expect 0 'host_pinned +52\.66 GiB +fits' -- "$ZINF" plan --model "$M3" --micro-batch 4 --gpu-mem 24G --host-mem 128G
expect 0 '"fits": true' -- "$ZINF" plan --model "$M3" --micro-batch 4 --gpu-mem 24G --host-mem 128G --json
expect 0 'suggested: zinf_gpu141g_cpuoffload' -- "$ZINF" plan --model "$M3" --micro-batch 4 --max-grad-norm 0 --gpu-mem 141G \
  --host-mem 128G --bench "$REPORT" --suggest
expect 3 'no preset fits' -- "$ZINF" plan --model "$M3" --micro-batch 4 --gpu-mem 2G --host-mem 8G --suggest
expect 0 'default rates \(not measured here' -- "$ZINF" plan --model "$M3" --micro-batch 4 --host-mem 128G
expect 1 'no-such.json' -- "$ZINF" plan --model "$TMP/no-such.json"
expect 1 'cannot read the file' -- "$ZINF" plan --model "$M3" --bench "$TMP/no-report.json"
echo '{"x": 1}' > "$TMP/empty-report.json"
expect 1 'no figure zinf plan can use' -- "$ZINF" plan --model "$M3" --bench "$TMP/empty-report.json"
expect 2 'gpu-mem' -- "$ZINF" plan --model "$M3" --gpu-mem lots
expect 2 'cannot be given with' -- "$ZINF" plan --model "$M3" --fp32 --bf16
expect 0 'offload_optimizer.ratio 0.5' -- "$ZINF" tune --report "$REPORT" --model "$M3" --gpu-mem 141G --host-mem 128G \
  --max-grad-norm 0 -o "$TMP/tuned.json"
expect 0 '"gradient_clipping": 0' -- cat "$TMP/tuned.json"
expect 0 'offload_optimizer.ratio 0\.1' -- "$ZINF" tune --report "$REPORT" --model "$M3" --gpu-mem 141G --host-mem 128G \
  -o "$TMP/tuned-clip.json"
expect 1 'more than .* usable here.*nothing was' -- "$ZINF" tune --report "$REPORT" --model "$ROOT/configs/models/bench-8b.json" \
  --gpu-mem 24G --host-mem 64G -o "$TMP/never8b.json"
[[ -e "$TMP/never8b.json" ]] && { echo "FAIL: a tune whose host memory does not fit wrote its file"; failed=$((failed + 1)); }
expect 1 'give --gpu-mem' -- "$ZINF" plan --model "$M3" --suggest
expect 1 'zinf bench gemm --json.*no figure|no figure' -- "$ZINF" plan --model "$M3" --bench "$TMP/empty-report.json"
echo '{"best": {"zinf": {"pinned": {"h2d": 50, "d2h": 50, "both": 90}}}}' > "$TMP/pcie-only.json"
expect 0 'predicted' -- "$ZINF" plan --model "$M3" --micro-batch 4 --host-mem 128G --bench "$TMP/pcie-only.json"
echo '{"adam": {"kernels": [{"kernel": 5, "params_per_s": "fast"}]}}' > "$TMP/bad-type.json"
expect 1 'wrong type' -- "$ZINF" plan --model "$M3" --bench "$TMP/bad-type.json"
expect 2 'at least one byte' -- "$ZINF" bench pcie --sizes 0.5
expect 0 'OK' -- "$ZINF" config check "$TMP/tuned.json"
expect 0 'communication_data_type bf16' -- "$ZINF" tune --report "$REPORT" --model "$ROOT/configs/models/bench-8b.json" \
  --gpu-mem 24G --host-mem 128G -o "$TMP/tuned8b.yaml"
expect 0 'OK' -- "$ZINF" config check "$TMP/tuned8b.yaml"
expect 1 'give -o FILE' -- "$ZINF" tune --report "$REPORT"
expect 1 'does not fit' -- "$ZINF" tune --report "$REPORT" --model "$M3" --gpu-mem 4G -o "$TMP/never.json"
[[ -e "$TMP/never.json" ]] && { echo "FAIL: a refused tune wrote its file"; failed=$((failed + 1)); }
expect 0 'zinf_gpu24g_cpuoffload +24 GB GPU' -- "$ZINF" config presets
expect 0 'triad +[0-9.]+ GB/s' -- "$ZINF" bench mem --size 64M --repeat 2
expect 0 'mem +ok +STREAM copy' -- "$ZINF" bench all --skip adam,io,step --report "$TMP/bench-all"
[[ -s "$TMP/bench-all/report.json" && -s "$TMP/bench-all/report.txt" ]] || { echo "FAIL: bench all wrote no report"; failed=$((failed + 1)); }
expect 0 'step +failed +no result within 1 s' -- "$ZINF" bench all --skip pcie,io,adam,gemm,mem --timeout 1
if [[ ! -e /dev/nvidiactl ]]; then  # no GPU here: the GPU benches say why
  expect 1 'no usable GPU|built without CUDA' -- "$ZINF" bench pcie
  expect 1 'no usable GPU|built without CUDA' -- "$ZINF" bench gemm
fi

echo "cli: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
