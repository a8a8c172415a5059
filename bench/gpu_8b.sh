#!/usr/bin/env bash
# The CUDA issue's oversized run: a Llama-3-8B-shaped model (configs/models/bench-8b.json: hidden
# 4096, 32 layers, intermediate 14336, 32 heads, 8 kv heads, vocab 128256) trained on one GPU under
# --gpu-memory-limit 24GiB, ZeRO-3, bf16, activation checkpointing, micro-batch 4 x 2048:
#   1. the optimizer state in host memory (the CPU-offload preset, bf16 gradient communication);
#   2. part of the state on NVMe (offload_optimizer.device nvme, `ratio` = the fraction on NVMe),
#      sized to the disk at NVME_DIR.
# Prints tokens/s, model TFLOP/s and MFU against the GPU's bf16 GEMM peak, measured in the same
# invocation (PyTorch matmuls; needs python3 with PyTorch and CUDA).
#   bench/gpu_8b.sh [ZINF] [OUT_DIR] [HOST_STEPS] [NVME_STEPS] [NVME_DIR] [NVME_RATIO]
# MICRO_BATCHES (default "4 2"): the micro-batches to try, in order, until one fits the cap;
# RUNS (default "host nvme"): which runs.
set -uo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/gpu-8b}
host_steps=${3:-5}
nvme_steps=${4:-3}
nvme_dir=${5:-/tmp/zinf-8b-swap}
nvme_ratio=${6:-0.3}
mkdir -p "$out" "$nvme_dir"

echo "== bf16 GEMM peak (PyTorch matmul, best of three shapes)"
python3 - > "$out/gemm_peak.json" <<'PY'
import json, torch
best, res = 0.0, {}
for m, n, k in ((8192, 8192, 8192), (16384, 14336, 4096), (8192, 4096, 14336)):
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    reps = 30
    for _ in range(reps):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    tf = 2 * m * n * k * reps / (e0.elapsed_time(e1) / 1e3) / 1e12
    res[f"{m}x{n}x{k}"] = tf
    best = max(best, tf)
print(json.dumps({"peak_tflops": best, "shapes": res, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
PY
cat "$out/gemm_peak.json"

python3 - "$out/tokens.u16" <<'PY'
import array, random, sys
random.seed(0)
array.array("H", (random.randrange(32000) for _ in range(2_000_000))).tofile(open(sys.argv[1], "wb"))
PY
python3 - configs/presets/deepspeed_zero3_cpuoffload.json "$out" "$nvme_dir" "$nvme_ratio" <<'PY'
import json, sys
src, out, nvme_dir, ratio = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
c = json.load(open(src))
c["communication_data_type"] = "bf16"
json.dump(c, open(f"{out}/host.json", "w"), indent=2)
z = c["zero_optimization"]
z["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": True, "buffer_count": 4, "ratio": ratio}
z["sub_group_size"] = 1e8  # staging slices of 1e8 elements (the preset's 1e9 would pin 4 x 14 GB)
json.dump(c, open(f"{out}/nvme.json", "w"), indent=2)
PY

run() {  # name config steps
  local name=$1 cfg=$2 steps=$3 mb
  for mb in ${MICRO_BATCHES:-4 2}; do
    rm -rf "$out/zinf-$name"
    echo "== zinf 8B, $name, micro-batch $mb"
    "$zinf" train --device cuda --model configs/models/bench-8b.json --data "$out/tokens.u16" --data-dtype uint16 \
      --deepspeed "$cfg" --bf16 --micro-batch $mb --grad-accum 1 --seq-len 2048 --max-grad-norm 0 \
      --gpu-memory-limit 24GiB --max-steps "$steps" --eval-every 0 --no-save --output-dir "$out/zinf-$name" \
      > "$out/zinf-$name.log" 2>&1
    local rc=$?
    grep -E "GPU memory plan|offload:|error|does not fit" "$out/zinf-$name.log" | head -8
    if [ $rc -eq 0 ]; then echo "$mb" > "$out/zinf-$name.mb"; return 0; fi
    grep -q "does not fit --gpu-memory-limit" "$out/zinf-$name.log" || { tail -5 "$out/zinf-$name.log"; return 1; }
  done
  return 1
}
for r in ${RUNS:-host nvme}; do
  if [ "$r" = host ]; then run host "$out/host.json" "$host_steps"; else run nvme "$out/nvme.json" "$nvme_steps"; fi
done
rm -rf "$nvme_dir"

python3 - "$out" <<'PY'
import csv, json, os, sys
out = sys.argv[1]
peak = json.load(open(f"{out}/gemm_peak.json"))["peak_tflops"]
res = {"gemm_peak_tflops": peak}
for name in ("host", "nvme"):
    f = f"{out}/zinf-{name}/training_metrics.csv"
    if not os.path.exists(f) or not os.path.exists(f"{out}/zinf-{name}.mb"):
        print(f"{name}: did not run (see zinf-{name}.log)")
        continue
    rows = list(csv.DictReader(open(f)))
    steady = rows[1:-1] if len(rows) > 2 else rows  # the first step warms up; the last also evaluates
    v = sorted(float(r["step_s"]) for r in steady)
    step_s = v[len(v) // 2]
    mb = int(open(f"{out}/zinf-{name}.mb").read())
    tok = mb * 2048 / step_s
    tflops = float(steady[0]["tflops"]) * float(steady[0]["step_s"]) / step_s
    s = json.load(open(f"{out}/zinf-{name}/summary.json"))
    g = s["gpu_memory"]
    res[name] = {"micro_batch": mb, "step_s": step_s, "tokens_per_s": tok, "model_tflops": tflops, "mfu": tflops / peak,
                 "gpu_peak_bytes": g["peak_bytes"], "gpu_planned_bytes": g["planned_bytes"], "steps": len(rows),
                 "losses": [float(r["loss"]) for r in rows]}
    print(f"{name:5} micro-batch {mb}: {step_s:.2f} s/step, {tok:,.0f} tokens/s, {tflops:.1f} model TFLOP/s, "
          f"MFU {100 * tflops / peak:.1f}% of {peak:.0f}; GPU peak {g['peak_bytes'] / 2**30:.2f} GiB "
          f"(plan {g['planned_bytes'] / 2**30:.2f})")
json.dump(res, open(f"{out}/result.json", "w"), indent=2)
PY
