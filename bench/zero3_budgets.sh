#!/usr/bin/env bash
# Stage-3 parameter coordinator under budgets: the embedded default (tiny-byte) trained with ZeRO
# stage 2 (parameters always resident) and stage 3 at several live/prefetch budgets, on 1 and 2
# ranks, in one invocation. Prints a Markdown table (tokens/s, live high-water, prefetch ahead,
# hits/misses, time waiting for parameters) and keeps every run's summary.json.
#   bench/zero3_budgets.sh [ZINF] [OUT_DIR] [STEPS]
# Uses python3 (any; standard library only) to write the configs and read the summaries.
set -euo pipefail
zinf=${1:-build/tools/zinf}
out=${2:-output/zero3-budgets}
steps=${3:-30}
mkdir -p "$out"
preset=$(dirname "$0")/../configs/presets/deepspeed_zero3_cpuoffload.json

# name stage max_live prefetch_bucket reuse_distance (tiny-byte's layer units hold ~0.8M elements)
configs=(
  "stage2 2 - - -"
  "stage3-fits 3 1000000000 50000000 1000000000"
  "stage3-2layers-prefetch1 3 1600000 800000 1000000000"
  "stage3-2layers-noprefetch 3 1600000 0 0"
)
for ranks in 1 2; do
  for c in "${configs[@]}"; do
    read -r name stage live bucket reuse <<<"$c"
    cfg="$out/$name.json"
    python3 - "$preset" "$cfg" "$stage" "$live" "$bucket" "$reuse" <<'PY'
import json, sys
src, dst, stage, live, bucket, reuse = sys.argv[1:]
j = json.load(open(src))
z = j["zero_optimization"]
z["stage"] = int(stage)
if stage == "2":
    z.pop("offload_param", None)
    for k in list(z):
        if k.startswith("stage3_"):
            del z[k]
else:
    z["stage3_max_live_parameters"] = int(live)
    z["stage3_prefetch_bucket_size"] = int(bucket)
    z["stage3_max_reuse_distance"] = int(reuse)
    z["stage3_param_persistence_threshold"] = 10000
json.dump(j, open(dst, "w"), indent=2)
PY
    run="$out/r$ranks-$name"
    rm -rf "$run"
    "$zinf" launch --nproc "$ranks" -- "$zinf" train --deepspeed "$cfg" --max-steps "$steps" --grad-accum $((2 / ranks)) \
      --output-dir "$run" >"$run.log" 2>&1 || { echo "run $run failed:"; tail -20 "$run.log"; exit 1; }
  done
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
print("| ranks | config | tokens/s | live params high-water | prefetch ahead high-water | hits | misses | param wait s | final loss |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "r*-*/summary.json"))):
    s = json.load(open(path))
    z = s["zero"]
    run = os.path.basename(os.path.dirname(path))
    ranks, name = run[1:].split("-", 1)
    print(f"| {ranks} | {name} | {s['throughput']['tokens_per_s']:.0f} | {z['live_params_high_water']:,} | "
          f"{z['prefetch_ahead_high_water']:,} | {z['prefetch_hits']} | {z['prefetch_misses']} | "
          f"{z['param_wait_seconds']:.3f} | {s['final_loss']:.4f} |")
PY
