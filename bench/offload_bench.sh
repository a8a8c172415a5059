#!/usr/bin/env bash
# The offload benchmark behind bench/results/offload.md, in one run on one machine:
#   1. the step with all optimizer state in (pinned) host memory,
# and for each I/O schedule in IO (default "mixed phased"):
#   2. the step with all state on NVMe at DeepSpeed's default aio settings,
#   3. the same with a tuned aio block (AIO="block,queue_depth,parallelism"); with mixed I/O, one
#      more step is timed with overlap off for comparison,
#   4. half of the state on NVMe (ratio 0.5) with the tuned aio block.
# Each run prints its own same-run bounds (CPU kernel, disk read/write) next to the step.
# Usage: bench/offload_bench.sh ZINF_BINARY DIR OUTDIR [PARAMS=1G] [SUB_GROUP=16M] [AIO=262144,4,8]
#        (environment: IO="mixed phased")
# DIR must be on the drive under test, with room for 12 B/param of state plus a 4 GiB test file.
set -euo pipefail
ZINF=$1
DIR=$2
OUT=$3
PARAMS=${4:-1G}
SUB=${5:-16M}
AIO=${6:-262144,4,8}
mkdir -p "$OUT"
IFS=, read -r block qd par <<<"$AIO"
cat >"$OUT/aio_tuned.json" <<EOF
{"train_batch_size": 1, "aio": {"block_size": $block, "queue_depth": $qd, "intra_op_parallelism": $par}}
EOF

run() {
  local name=$1
  shift
  echo "== $name: zinf bench offload $*" | tee -a "$OUT/offload.txt"
  "$ZINF" bench offload "$@" 2>&1 | tee "$OUT/$name.txt" | tee -a "$OUT/offload.txt"
  echo | tee -a "$OUT/offload.txt"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); cores: $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}'); dir: $DIR on $(df --output=source,fstype "$DIR" | tail -1)"
  "$ZINF" --version
  echo
} | tee "$OUT/offload.txt"

run cpu --device cpu --params "$PARAMS" --sub-group "$SUB"
for io in ${IO:-mixed phased}; do
  serial=()
  [[ $io == mixed ]] && serial=(--serial)
  run "nvme_default_aio_$io" --device nvme --path "$DIR" --params "$PARAMS" --sub-group "$SUB" --io "$io"
  run "nvme_tuned_aio_$io" --device nvme --path "$DIR" --params "$PARAMS" --sub-group "$SUB" \
    --config "$OUT/aio_tuned.json" --io "$io" "${serial[@]}"
  run "nvme_ratio_half_$io" --device nvme --path "$DIR" --params "$PARAMS" --sub-group "$SUB" \
    --config "$OUT/aio_tuned.json" --ratio 0.5 --io "$io"
done
