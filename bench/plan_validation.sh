#!/usr/bin/env bash
# Measures this machine (`zinf bench all`) and trains the runs `zinf plan` is checked against, in one
# invocation: the 3.1B shape (micro-batch 4 x 2048, CPU-offload preset) without clipping, with
# clipping at 1.0, with bf16 gradients and with offload_optimizer.ratio 0.5; and the 8B shape under
# --gpu-memory-limit 24GiB (micro-batch 5, bf16 gradients). Then prints `zinf plan --bench` for each
# next to what the run measured (tools/plan_check.py).
#   bench/plan_validation.sh [ZINF] [OUT_DIR] [NVME_DIR]
# (the io bench writes its test file in a new directory under NVME_DIR, removed afterwards)
# Uses python3 (any) for the token file and the comparison. Needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/plan-validation}
io_parent=${3:-${TMPDIR:-/tmp}}
steps=${STEPS:-8}
mkdir -p "$out"
io_dir=$(mktemp -d "$io_parent/zinf-plan-io.XXXXXX")

echo "== zinf bench all"
ZINF_BENCH_PLOT_SCRIPT=$PWD/tools/plot_bench.py ZINF_PYTHON=$(command -v python3) \
  "$zinf" bench all --path "$io_dir" --io-size 8G --model configs/models/bench-3.1b.json --report "$out/bench" > "$out/bench.txt" 2>&1 || { tail -20 "$out/bench.txt"; exit 1; }
cat "$out/bench.txt"
rm -rf "$io_dir"

python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(2_000_000))).tofile(open(sys.argv[1], "wb"))
PY
python3 - configs/presets/deepspeed_zero3_cpuoffload.json "$out" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
out = sys.argv[2]
b = json.loads(json.dumps(c)); b["communication_data_type"] = "bf16"
json.dump(b, open(f"{out}/bf16grads.json", "w"), indent=2)
r = json.loads(json.dumps(c)); r["zero_optimization"]["offload_optimizer"]["ratio"] = 0.5
json.dump(r, open(f"{out}/ratio0.5.json", "w"), indent=2)
PY

train() {  # name model micro clip config [extra...]
  local name=$1 model=$2 mb=$3 clip=$4 cfg=$5
  shift 5
  echo "== zinf train: $name"
  rm -rf "$out/run-$name"
  "$zinf" train --device cuda --model "$model" --data "$out/tokens.u16" --data-dtype uint16 --deepspeed "$cfg" --bf16 \
    --micro-batch "$mb" --grad-accum 1 --seq-len 2048 --max-grad-norm "$clip" --max-steps "$steps" --eval-every 0 \
    --no-save --output-dir "$out/run-$name" "$@" > "$out/run-$name.log" 2>&1 || { tail -5 "$out/run-$name.log"; failed=1; }
}
failed=0
train 3b-noclip configs/models/bench-3.1b.json 4 0 deepspeed_zero3_cpuoffload
train 3b-clip configs/models/bench-3.1b.json 4 1.0 deepspeed_zero3_cpuoffload
train 3b-bf16grads configs/models/bench-3.1b.json 4 0 "$out/bf16grads.json"
train 3b-ratio0.5 configs/models/bench-3.1b.json 4 0 "$out/ratio0.5.json"
train 8b-cap24 configs/models/bench-8b.json 5 0 "$out/bf16grads.json" --gpu-memory-limit 24GiB
rm -f "$out/tokens.u16"

python3 tools/plan_check.py "$zinf" "$out/bench/report.json" "$out"/run-*/ | tee "$out/plan_check.txt"
check=${PIPESTATUS[0]}
[[ $failed -eq 0 ]] || { echo "plan_validation: a training run failed (see its log)"; exit 1; }
exit "$check"
