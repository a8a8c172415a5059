#!/usr/bin/env bash
# `zinf plan --device cpu` against a real CPU run, on one machine in one invocation: `zinf bench all`
# (host memory, the CPU optimizer and the CPU backend's step; no GPU, no NVMe), then the embedded
# default (`zinf train`: a small Llama on the shipped corpus, ZeRO-3 CPU-offload preset, 8 x 256)
# for STEPS steps, then tools/plan_check.py. Run it on an otherwise idle machine.
#   bench/plan_validation_cpu.sh [ZINF] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
zinf=${1:-build/tools/zinf}
out=${2:-output/plan-validation-cpu}
steps=${STEPS:-12}
mkdir -p "$out"
echo "== zinf bench all"
"$zinf" bench all --skip pcie,io,gemm --report "$out/bench" > "$out/bench.txt" 2>&1 || { tail -20 "$out/bench.txt"; exit 1; }
cat "$out/bench.txt"
echo "== zinf train (the embedded default, $steps steps)"
rm -rf "$out/run-cpu-embedded"
"$zinf" train --max-steps "$steps" --eval-every 0 --no-save --output-dir "$out/run-cpu-embedded" > "$out/run-cpu-embedded.log" 2>&1 ||
  { tail -5 "$out/run-cpu-embedded.log"; exit 1; }
python3 tools/plan_check.py "$zinf" "$out/bench/report.json" "$out/run-cpu-embedded" | tee "$out/plan_check.txt"
