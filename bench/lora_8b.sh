#!/usr/bin/env bash
# LoRA on the CUDA issue's 8B shape (configs/models/bench-8b.json, Llama-3-8B: 8.03B parameters),
# one GPU, rank 16 on all seven linears (q,k,v,o,gate,up,down: 42M trainable parameters), bf16,
# activation checkpointing, micro-batch 4 x 2048, seeded base, random tokens:
#   host:    ZeRO-3, the frozen base in page-locked host memory, under --gpu-memory-limit 24GiB;
#   nvme:    ZeRO-3, the frozen base on NVMe (offload_param nvme, max_in_cpu 0), same cap;
#   gpu:     ZeRO stage 1, the whole frozen base resident on the GPU (no cap).
# Each run's summary.json gives tokens/s and the peak bytes per tier; `zinf plan` predicts each
# (plan.json) for the comparison. Results: bench/results/lora.md.
#   bench/lora_8b.sh [ZINF] [OUT_DIR] [STEPS] [NVME_STEPS] [NVME_DIR]     RUNS="host nvme gpu"
set -uo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/lora-8b}
steps=${3:-6}
nvme_steps=${4:-3}
nvme_dir=${5:-/tmp/zinf-lora-swap}
runs=${RUNS:-host nvme gpu}
mkdir -p "$out" "$nvme_dir"
python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(2_000_000))).tofile(open(sys.argv[1], "wb"))
PY
python3 - configs/presets/deepspeed_zero3_cpuoffload.json "$out" "$nvme_dir" <<'PY'
import json, sys
src, out, nvme_dir = sys.argv[1:]
c = json.load(open(src))
c["gradient_clipping"] = 1.0
json.dump(c, open(f"{out}/host.json", "w"), indent=2)
c["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": True,
                                           "max_in_cpu": 0, "buffer_count": 4, "buffer_size": 3e8}
json.dump(c, open(f"{out}/nvme.json", "w"), indent=2)
g = json.load(open(src))
g["gradient_clipping"] = 1.0
g["zero_optimization"] = {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
json.dump(g, open(f"{out}/gpu.json", "w"), indent=2)
PY
lora=(--lora-rank 16 --lora-alpha 32 --lora-targets all-linear)
plan_lora=(--lora-rank 16 --lora-targets all-linear)  # (alpha changes no byte or second)
for run in $runs; do
  n=$steps; cap=(--gpu-memory-limit 24GiB); capplan=(--gpu-mem 24G)
  [[ $run == nvme ]] && n=$nvme_steps
  [[ $run == gpu ]] && cap=() && capplan=()
  echo "== $run: $n steps"
  "$zinf" plan --model configs/models/bench-8b.json --deepspeed "$out/$run.json" --micro-batch 4 --seq-len 2048 \
    "${plan_lora[@]}" "${capplan[@]}" ${BENCH_REPORT:+--bench "$BENCH_REPORT"} --json > "$out/$run-plan.json" 2> "$out/$run-plan.err"
  /usr/bin/time -v "$zinf" train --device cuda --model configs/models/bench-8b.json --data "$out/tokens.u16" \
    --data-dtype uint16 --deepspeed "$out/$run.json" --micro-batch 4 --seq-len 2048 --lr 1e-4 --max-steps "$n" \
    --eval-fraction 0.002 "${lora[@]}" "${cap[@]}" --no-save --output-dir "$out/$run" \
    > "$out/$run.log" 2> "$out/$run.time"
  echo "rc $?"
  tail -3 "$out/$run.log"
  grep -E "Maximum resident" "$out/$run.time"
  python3 - "$out/$run" "$out/$run-plan.json" <<'PY'
import csv, json, statistics, sys
d, planf = sys.argv[1:]
s = json.load(open(d + "/summary.json"))
rows = list(csv.DictReader(open(d + "/training_metrics.csv")))
mid = [float(r["step_s"]) for r in rows[1:-1]] or [float(r["step_s"]) for r in rows]
step = statistics.median(mid)
tok = 4 * 2048
print(json.dumps({"median_step_s": step, "tokens_per_s": tok / step,
                  "model_tflops": float(rows[len(rows) // 2]["tflops"]),
                  "losses": [float(r["loss"]) for r in rows],
                  "gpu_peak_bytes": s.get("gpu_memory", {}).get("peak_bytes"),
                  "gpu_planned_bytes": s.get("gpu_memory", {}).get("planned_bytes"),
                  "host_pinned_bytes": s["peak_memory_bytes"]["host_pinned"],
                  "nvme_bytes": s["peak_memory_bytes"]["nvme"],
                  "lora": s.get("lora")}, indent=1))
try:
    p = json.load(open(planf))
    print("plan: predicted %.3f s/step, bound %s; tiers %s" % (p["step"]["predicted_s"], p["step"]["bound"],
          {t: v["bytes"] for t, v in p["tiers"].items()}))
except Exception as e:
    print("plan: unreadable (%s)" % e)
PY
done
