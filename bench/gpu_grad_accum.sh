#!/usr/bin/env bash
# Gradient accumulation in the GPU pipeline against the synchronous path (--gpu-overlap off), on
# one GPU, in one invocation: the 3.1B shape (seq 2048, the CPU-offload preset) with
#   micro-batch 4 x 1 (no accumulation: the reference), 2 x 2 (the same 8192 tokens per step),
#   4 x 4 (32768 tokens per step), and 4 x 4 with clipping at 1.0;
# 2 x 2 also through the synchronous path (and, with FULL=1, 4 x 4 too). STEPS (default 8) each. Then measures the machine
# (`zinf bench all`, no io) and compares `zinf plan` with the pipeline's runs (tools/plan_check.py).
#   bench/gpu_grad_accum.sh [ZINF] [OUT_DIR]
# Uses python3 (any) for the token file and the comparison. Needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/gpu-grad-accum}
steps=${STEPS:-8}
mkdir -p "$out"

python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(4_000_000))).tofile(open(sys.argv[1], "wb"))
PY

failed=0
train() {  # name micro accum clip overlap
  local name=$1 mb=$2 gas=$3 clip=$4 overlap=on
  [ "$5" = 0 ] && overlap=off
  echo "== zinf train: $name (micro-batch $mb x $gas, clip $clip, --gpu-overlap $overlap)"
  rm -rf "$out/$name"
  "$zinf" train --gpu-overlap "$overlap" --device cuda --model configs/models/bench-3.1b.json --data "$out/tokens.u16" \
    --data-dtype uint16 --deepspeed deepspeed_zero3_cpuoffload --bf16 --micro-batch "$mb" --grad-accum "$gas" \
    --seq-len 2048 --max-grad-norm "$clip" --max-steps "$steps" --eval-every 0 --no-save --output-dir "$out/$name" \
    > "$out/$name.log" 2>&1 || { tail -5 "$out/$name.log"; failed=1; }
}
mkdir -p "$out/pipe" "$out/sync"
train pipe/m4-g1 4 1 0 1
train pipe/m2-g2 2 2 0 1
train sync/m2-g2 2 2 0 0
train pipe/m4-g4 4 4 0 1
train pipe/m4-g4-clip 4 4 1.0 1
# The synchronous path at 32768 tokens per step takes about 27 s a step on an H200: FULL=1 runs it.
if [[ ${FULL:-0} == 1 ]]; then
  train sync/m4-g4 4 4 0 0
  train sync/m4-g4-clip 4 4 1.0 0
fi
rm -f "$out/tokens.u16"

echo "== zinf bench all (no io)"
ZINF_BENCH_PLOT_SCRIPT=$PWD/tools/plot_bench.py ZINF_PYTHON=$(command -v python3) \
  "$zinf" bench all --model configs/models/bench-3.1b.json --report "$out/bench" > "$out/bench.txt" 2>&1 || { tail -20 "$out/bench.txt"; exit 1; }
cat "$out/bench.txt"

python3 - "$out" <<'PY'
import csv, json, os, sys
out = sys.argv[1]
print(f"{'run':<16} {'path':<12} {'tokens/step':>11} {'median s/step':>13} {'tokens/s':>9} {'GPU peak GiB':>12} {'pinned GiB':>10} {'final loss':>10}")
rows = []
for name in ["m4-g1", "m2-g2", "m4-g4", "m4-g4-clip"]:
    for path in ["pipe", "sync"]:
        d = os.path.join(out, path, name)
        if not os.path.exists(os.path.join(d, "summary.json")):
            continue
        s = json.load(open(os.path.join(d, "summary.json")))
        m = sorted(float(r["step_s"]) for r in list(csv.DictReader(open(os.path.join(d, "training_metrics.csv"))))[2:])
        med = m[len(m) // 2]
        tok = s["deepspeed_config"]["train_micro_batch_size_per_gpu"] * s["deepspeed_config"]["gradient_accumulation_steps"] * s["data"]["seq_len"]
        r = {"run": name, "path": "pipeline" if s["gpu_pipeline"]["enabled"] else "synchronous", "tokens_per_step": tok,
             "median_step_s": med, "tokens_per_s": tok / med, "gpu_peak_bytes": s["gpu_memory"]["peak_bytes"],
             "host_pinned_bytes": s["peak_memory_bytes"]["host_pinned"], "final_loss": s["final_loss"]}
        rows.append(r)
        print(f"{name:<16} {r['path']:<12} {tok:>11} {med:>13.3f} {tok / med:>9.0f} {r['gpu_peak_bytes'] / 2**30:>12.2f} "
              f"{r['host_pinned_bytes'] / 2**30:>10.2f} {r['final_loss']:>10.4f}")
json.dump(rows, open(os.path.join(out, "result.json"), "w"), indent=2)
PY

python3 tools/plan_check.py "$zinf" "$out/bench/report.json" "$out"/pipe/*/ | tee "$out/plan_check.txt"
check=${PIPESTATUS[0]}
[[ $failed -eq 0 ]] || { echo "gpu_grad_accum: a training run failed (see its log)"; exit 1; }
exit "$check"
