#!/usr/bin/env bash
# Two zinf builds on the same GPU machine in one invocation (the runtime reshaping's proof that
# nothing slowed down): bench/gpu_vs_fsdp2.sh's no-clipping and offload_optimizer.ratio 0.5 runs of
# the 3.1B shape, then bench/gpu_8b.sh's 8B run with the optimizer state in host memory, each with
# the new build and then the old, and a table of tokens/s and the new/old ratio.
#   bench/gpu_old_vs_new.sh OLD_ZINF NEW_ZINF [OUT_DIR] [STEPS] [WARMUP] [STEPS_8B]
# FSDP2=1 also runs the FSDP2 baseline once (the old build is compared against the same result).
set -uo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: bench/gpu_old_vs_new.sh OLD_ZINF NEW_ZINF [OUT_DIR] [STEPS] [WARMUP] [STEPS_8B]}
new=${2:?usage: bench/gpu_old_vs_new.sh OLD_ZINF NEW_ZINF [OUT_DIR] [STEPS] [WARMUP] [STEPS_8B]}
out=${3:-output/old-vs-new}
steps=${4:-6}
warmup=${5:-2}
steps_8b=${6:-5}
mkdir -p "$out"
fsdp2=${FSDP2:-0}
for build in new old; do
  bin=$new
  [ "$build" = old ] && bin=$old
  echo "== 3.1B, $build build ($bin)"
  if [ "$fsdp2" = 1 ] && [ "$build" = old ]; then
    FSDP2_JSON="$out/3b-new/fsdp2.json" ZINF_RUNS="noclip ratio0.5" bench/gpu_vs_fsdp2.sh "$bin" "$out/3b-$build" "$steps" "$warmup"
  else
    FSDP2=$fsdp2 ZINF_RUNS="noclip ratio0.5" bench/gpu_vs_fsdp2.sh "$bin" "$out/3b-$build" "$steps" "$warmup"
  fi
  echo "== 8B, state in host memory, $build build"
  RUNS=host MICRO_BATCHES=4 bench/gpu_8b.sh "$bin" "$out/8b-$build" "$steps_8b"
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def tok(path, key):
    try:
        return json.load(open(path))[key]["tokens_per_s"]
    except (OSError, KeyError, ValueError):
        return None
rows = [("3.1B no clipping", "3b-{}/result.json", "zinf_noclip"), ("3.1B ratio 0.5", "3b-{}/result.json", "zinf_ratio0.5"),
        ("8B host, 24 GiB cap", "8b-{}/result.json", "host")]
res = {}
print(f"{'run':22} {'new tok/s':>10} {'old tok/s':>10} {'new/old':>8}")
for name, path, key in rows:
    n, o = tok(os.path.join(out, path.format("new")), key), tok(os.path.join(out, path.format("old")), key)
    res[name] = {"new_tokens_per_s": n, "old_tokens_per_s": o, "ratio": n / o if n and o else None}
    fmt = lambda v: f"{v:10.0f}" if v else f"{'-':>10}"
    print(f"{name:22} {fmt(n)} {fmt(o)} {res[name]['ratio'] or 0:8.3f}")
json.dump(res, open(os.path.join(out, "old_vs_new.json"), "w"), indent=2)
PY
