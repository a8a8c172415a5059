#!/usr/bin/env bash
# zinf (ZeRO-3, CPU offload, one GPU) against PyTorch FSDP2 with CPU offload, same model and batch,
# in one invocation on one machine: prints tokens/s, model TFLOP/s, peak GPU memory and the ratio
# (zinf without clipping, as the baseline; zinf with clipping at 1.0; zinf with bf16 gradients;
# zinf with a GPU share of the optimizer state, offload_optimizer.ratio 0.7 and 0.5, without and
# with clipping).
#   bench/gpu_vs_fsdp2.sh [ZINF] [OUT_DIR] [STEPS] [WARMUP]
# ZINF_RUNS picks runs (below); FSDP2_JSON reuses a baseline result measured earlier in the same
# session on the same machine instead of running it again (two zinf builds against one baseline);
# FSDP2=0 runs zinf alone (no ratios).
# Shape: the CUDA issue's 3.1B Llama (configs/models/bench-3.1b.json: hidden 3072, 26 layers,
# intermediate 8192, 24 heads, vocab 32000), micro-batch 4 x 2048 tokens, bf16, activation
# checkpointing. Needs python3 with PyTorch (CUDA) and transformers for the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/gpu-vs-fsdp2}
steps=${3:-6}
warmup=${4:-2}
mkdir -p "$out"

echo "== PyTorch FSDP2, CPU offload"
if [[ ${FSDP2:-1} == 0 ]]; then
  echo "(skipped: FSDP2=0; zinf runs only)"
  rm -f "$out/fsdp2.json"
elif [[ -n ${FSDP2_JSON:-} ]]; then
  # A baseline measured earlier in the same invocation (comparing two zinf builds on one machine).
  cp "$FSDP2_JSON" "$out/fsdp2.json"
else
  python3 bench/baselines/fsdp2_cpu_offload.py --steps "$steps" --warmup "$warmup" --json > "$out/fsdp2.json"
fi

echo "== zinf ZeRO-3, CPU offload"
# Random tokens (the step does the same work whatever the text), raw uint16.
python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(2_000_000))).tofile(open(sys.argv[1], "wb"))
PY
# The same preset with bf16 gradient communication (DeepSpeed's communication_data_type).
python3 - configs/presets/deepspeed_zero3_cpuoffload.json "$out/zero3_cpuoffload_bf16grads.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["communication_data_type"] = "bf16"
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
# ... and with part of the optimizer state on the GPU (DeepSpeed's partial offload: ratio = the
# fraction offloaded to the CPU).
for ratio in 0.7 0.5; do
python3 - configs/presets/deepspeed_zero3_cpuoffload.json "$out/zero3_cpuoffload_ratio$ratio.json" "$ratio" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["zero_optimization"]["offload_optimizer"]["ratio"] = float(sys.argv[3])
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
done
# Three zinf runs: without gradient clipping (the baseline does not clip: the same arithmetic);
# with clipping at 1.0 (the usual setting; the step then waits for the global norm); and without
# clipping, gradients in bf16 (DeepSpeed's usual bf16 arithmetic, not the baseline's fp32 one).
runs="noclip:0:deepspeed_zero3_cpuoffload clip:1.0:deepspeed_zero3_cpuoffload
      bf16grads:0:$out/zero3_cpuoffload_bf16grads.json ratio0.7:0:$out/zero3_cpuoffload_ratio0.7.json
      ratio0.5:0:$out/zero3_cpuoffload_ratio0.5.json ratio0.7clip:1.0:$out/zero3_cpuoffload_ratio0.7.json"
# ZINF_RUNS picks some of them by name ("noclip ratio0.5") or gives NAME:CLIP:CONFIG specs.
selected=()
for want in ${ZINF_RUNS:-}; do
  if [[ $want == *:* ]]; then selected+=("$want"); continue; fi
  spec=""
  for run in $runs; do [[ ${run%%:*} == "$want" ]] && spec=$run; done
  [[ -n $spec ]] || { echo "ZINF_RUNS: no run named '$want' (known: $(for r in $runs; do printf '%s ' "${r%%:*}"; done))" >&2; exit 2; }
  selected+=("$spec")
done
[[ ${#selected[@]} -gt 0 ]] || read -r -a selected <<< "$(echo $runs)"
for run in "${selected[@]}"; do
  IFS=: read -r name clip ds <<< "$run"
  rm -rf "$out/zinf-$name"
  "$zinf" train --device cuda --model configs/models/bench-3.1b.json --data "$out/tokens.u16" --data-dtype uint16 \
    --deepspeed "$ds" --bf16 --micro-batch 4 --grad-accum 1 --seq-len 2048 --max-grad-norm "$clip" \
    --max-steps $((steps + warmup)) --no-save --output-dir "$out/zinf-$name" > "$out/zinf-$name.log" 2>&1 ||
    { echo "zinf failed:"; tail -20 "$out/zinf-$name.log"; exit 1; }
done

python3 - "$out" "$warmup" <<'PY'
import csv, json, sys
out, warmup = sys.argv[1], int(sys.argv[2])
import os
b = json.load(open(f"{out}/fsdp2.json")) if os.path.exists(f"{out}/fsdp2.json") else None
def median(rows, key):
    v = sorted(float(r[key]) for r in rows)
    return v[len(v) // 2]
res = {}
print(f"{'':18} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'GPU GiB':>8}")
if b:
    res["fsdp2"] = {"tokens_per_s": b["tokens_per_s"], "step_s": b["step_seconds_median"], "model_tflops": b["model_tflops"],
                    "torch": b["torch"], "gpu": b["gpu"]}
    print(f"{'FSDP2':18} {b['step_seconds_median']:8.3f} {b['tokens_per_s']:10.0f} {b['model_tflops']:8.1f} "
          f"{b.get('peak_gpu_bytes', 0) / 2**30:8.2f}")
labels = {"noclip": "zinf", "clip": "zinf clip 1.0", "bf16grads": "zinf bf16 grads", "ratio0.7": "zinf ratio 0.7",
          "ratio0.5": "zinf ratio 0.5", "ratio0.7clip": "zinf ratio 0.7 clip"}
for name in labels:
    if not os.path.exists(f"{out}/zinf-{name}/training_metrics.csv"):
        continue
    rows = list(csv.DictReader(open(f"{out}/zinf-{name}/training_metrics.csv")))[warmup:]
    step_s = median(rows, "step_s")
    tok = 4 * 2048 / step_s
    tflops = median(rows, "tflops") * median(rows, "step_s") / step_s
    breakdown = {k: median(rows, k) for k in ("forward_s", "backward_s", "optimizer_s")}
    summary = json.load(open(f"{out}/zinf-{name}/summary.json"))
    peak = summary["gpu_memory"]["peak_bytes"]
    res[f"zinf_{name}"] = {"tokens_per_s": tok, "step_s": step_s, "model_tflops": tflops, "median_breakdown_s": breakdown,
                           "peak_gpu_bytes": peak, "gpu_optimizer_elements": summary["gpu_pipeline"].get("gpu_optimizer_elements", 0),
                           "ratio": tok / b["tokens_per_s"] if b else None}
    label = labels[name]
    ratio = f"{tok / b['tokens_per_s']:.2f}x" if b else "  -  "
    print(f"{label:18} {step_s:8.3f} {tok:10.0f} {tflops:8.1f} {peak / 2**30:8.2f}   {ratio}   "
          f"(median forward {breakdown['forward_s']:.2f} s, backward {breakdown['backward_s']:.2f} s, step wait "
          f"{breakdown['optimizer_s']:.2f} s)")
json.dump(res, open(f"{out}/result.json", "w"), indent=2)
if b and "zinf_noclip" in res:
    print(f"zinf / FSDP2 = {res['zinf_noclip']['ratio']:.2f}x, same arithmetic (no clipping), all optimizer state on "
          f"the host  (on {b['gpu']}, torch {b['torch']})")
PY
