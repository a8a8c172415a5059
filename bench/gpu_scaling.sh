#!/usr/bin/env bash
# The CUDA issue's scaling check: the 3.1B shape (configs/models/bench-3.1b.json) trained with the
# ZeRO-3 CPU-offload preset on 1, 2 (and 4) GPUs of one host, the same per-GPU batch (micro-batch 4
# x 2048 tokens, no accumulation), every run under `zinf launch` (which divides the host's cores
# among the ranks). With several GPUs each unit's parameters are all-gathered and its gradient
# reduce-scattered over NCCL, GPU to GPU; each rank steps its own shard of the state on the host.
# Prints, per GPU count: seconds per step, tokens/s in all and per GPU, and per-GPU tokens/s as a
# share of the 1-GPU run's (the bar: at least 90%).
#   bench/gpu_scaling.sh [ZINF] [OUT_DIR] [STEPS]
# GPUS (default: 1 and 2, and 4 where 4 are visible): the GPU counts to run; the first is the
# reference. EXTRA: more `zinf train` arguments for every run. Needs python3 (no PyTorch).
set -uo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/gpu-scaling}
steps=${3:-8}
warmup=2
mkdir -p "$out"
visible=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ -z "${GPUS:-}" ]; then
  GPUS="1 2"
  [ "$visible" -ge 4 ] && GPUS="1 2 4"
fi
echo "== $visible GPU(s) visible; runs on: $GPUS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1
python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(4_000_000))).tofile(open(sys.argv[1], "wb"))
PY
for n in $GPUS; do
  if [ "$n" -gt "$visible" ]; then echo "== $n GPUs: only $visible visible, skipped"; continue; fi
  rm -rf "$out/zinf-g$n"
  echo "== zinf 3.1B on $n GPU(s)"
  # shellcheck disable=SC2086
  "$zinf" launch --nproc "$n" -- "$zinf" train --device cuda --model configs/models/bench-3.1b.json \
    --data "$out/tokens.u16" --data-dtype uint16 --deepspeed deepspeed_zero3_cpuoffload --bf16 --micro-batch 4 \
    --grad-accum 1 --seq-len 2048 --max-grad-norm 0 --max-steps $((steps + warmup)) --eval-every 0 --no-save \
    --output-dir "$out/zinf-g$n" ${EXTRA:-} > "$out/zinf-g$n.log" 2>&1 ||
    { echo "zinf on $n GPU(s) failed:"; tail -20 "$out/zinf-g$n.log"; }
  grep -E "GPUs: each unit|NCCL cannot|error" "$out/zinf-g$n.log" | head -3
done

python3 - "$out" "$warmup" $GPUS <<'PY'
import csv, json, os, sys
out, warmup, counts = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3:]]
res, ref = {}, None
print(f"{'GPUs':>5} {'s/step':>8} {'tokens/s':>10} {'per GPU':>9} {'vs 1st':>7}   median forward / backward / step wait (s)")
for n in counts:
    f = f"{out}/zinf-g{n}/training_metrics.csv"
    if not os.path.exists(f):
        continue
    rows = list(csv.DictReader(open(f)))[warmup:]
    if not rows:
        continue
    med = lambda k: sorted(float(r[k]) for r in rows)[len(rows) // 2]
    step_s = med("step_s")
    tok = 4 * 2048 * n / step_s
    per = tok / n
    if ref is None:
        ref = per
    summary = json.load(open(f"{out}/zinf-g{n}/summary.json"))
    res[str(n)] = {"step_s": step_s, "tokens_per_s": tok, "tokens_per_s_per_gpu": per, "efficiency": per / ref,
                   "forward_s": med("forward_s"), "backward_s": med("backward_s"), "optimizer_s": med("optimizer_s"),
                   "steps_timed": len(rows), "gpu_pipeline": summary.get("gpu_pipeline", {}),
                   "peak_gpu_bytes": summary.get("gpu_memory", {}).get("peak_bytes", 0),
                   "losses": [float(r["loss"]) for r in rows]}
    print(f"{n:5d} {step_s:8.3f} {tok:10.0f} {per:9.0f} {100 * per / ref:6.1f}%   "
          f"{med('forward_s'):.3f} / {med('backward_s'):.3f} / {med('optimizer_s'):.3f}")
json.dump(res, open(f"{out}/result.json", "w"), indent=2)
PY
