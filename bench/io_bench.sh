#!/usr/bin/env bash
# The storage benchmark behind bench/results/io.md, on one directory in one run:
#   1. dd bs=16M with oflag=direct / iflag=direct (the reference the engine must beat by 1.2x),
#   2. `zinf bench io` at DeepSpeed's default aio settings (engine and pread/pwrite baseline),
#   3. `zinf bench io --sweep` (64 engine settings, 16 baseline settings, read and write),
#   4. three rounds of dd (overwrite, read) against the sweep's best setting and its baseline,
#   5. `zinf tune nvme` on a small grid, writing the aio block into a config.
# Usage: bench/io_bench.sh ZINF_BINARY DIR|auto OUTDIR [SIZE=4G] [SECONDS_PER_POINT=1.5]
# `auto` picks the writable local file system with the most free space. Render the results with
# /usr/bin/python3 bench/io_report.py OUTDIR.
set -euo pipefail
ZINF=$1
DIR=$2
OUT=$3
SIZE=${4:-4G}
SECS=${5:-1.5}
mkdir -p "$OUT"

if [[ $DIR == auto ]]; then
  DIR=""
  best=0
  for c in /mnt /scratch /local /nvme /data /tmp "$PWD"; do
    [[ -d $c && -w $c ]] || continue
    avail=$(df --output=avail -B1 "$c" | tail -1)
    if ((avail > best)); then best=$avail; DIR=$c; fi
  done
fi
[[ -n $DIR ]] || { echo "no writable directory found" >&2; exit 1; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "dir: $DIR"
  uname -a
  echo "cores: $(nproc)"
  lscpu | grep -E 'Model name|Socket|NUMA node\(s\)' || true
  free -g | head -2
  df -hT "$DIR"
  findmnt -T "$DIR" || true
  lsblk -o NAME,MODEL,SIZE,ROTA,TYPE,MOUNTPOINT 2>/dev/null || true
  dev=$(basename "$(findmnt -no SOURCE -T "$DIR" 2>/dev/null)" 2>/dev/null || true)
  for q in max_sectors_kb max_hw_sectors_kb nr_requests scheduler rotational; do
    [[ -r /sys/block/$dev/queue/$q ]] && echo "$dev $q: $(cat /sys/block/$dev/queue/$q)"
  done
  [[ -d /sys/block/$dev/mq ]] && echo "$dev hardware queues: $(ls /sys/block/$dev/mq | wc -l)"
  echo "memlock: $(ulimit -l)"
  echo "io_uring_disabled: $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"
} >"$OUT/machine.txt" 2>&1

bytes=$("$ZINF" bench io --help >/dev/null && echo "$SIZE" | awk '{n=$1+0; u=toupper(substr($1,length($1)));
  if(u=="G")n*=1024^3; else if(u=="M")n*=1024^2; else if(u=="T")n*=1024^4; printf "%.0f\n", n}')
count=$((bytes / (16 * 1024 * 1024)))
ddfile="$DIR/zinf-dd-$$.bin"
trap 'rm -f "$ddfile"' EXIT
dd_write() { timeout 300 dd if=/dev/zero of="$ddfile" bs=16M count="$count" oflag=direct "$@"; }
dd_read() { timeout 300 dd if="$ddfile" of=/dev/null bs=16M iflag=direct; }
# The issue's reference commands: a fresh file, then reading it back.
dd_write 2>"$OUT/dd_write.txt" || true
dd_read 2>"$OUT/dd_read.txt" || true

timeout 300 "$ZINF" bench io --path "$DIR" --size "$SIZE" --json >"$OUT/bench_default.json" 2>"$OUT/bench_default.log"
timeout 560 "$ZINF" bench io --path "$DIR" --size "$SIZE" --sweep --seconds "$SECS" --json >"$OUT/sweep.json" 2>"$OUT/sweep.log"

# Head to head, three rounds: dd overwriting its file (as the engine overwrites its test file),
# dd reading it, and the sweep's best aio setting with the pread baseline at the same block size
# and thread count. Cloud disks drift by tens of percent between minutes; rounds make that visible.
read -r bs qd par < <(python3 -c 'import json,sys; b=json.load(open(sys.argv[1]))["best"]; print(b["block_size"], b["queue_depth"], b["intra_op_parallelism"])' "$OUT/sweep.json")
for round in 1 2 3; do
  dd_write conv=notrunc 2>"$OUT/dd_overwrite_$round.txt" || true
  dd_read 2>"$OUT/dd_read_$round.txt" || true
  timeout 120 "$ZINF" bench io --path "$DIR" --size "$SIZE" --block-size "$bs" --queue-depth "$qd" \
    --parallelism "$par" --json >"$OUT/best_$round.json" 2>>"$OUT/best.log"
done
rm -f "$ddfile"

timeout 300 "$ZINF" tune nvme --path "$DIR" --size "$SIZE" --seconds "$SECS" --sweep-block-sizes 1M,4M \
  --sweep-queue-depths 16,64 --sweep-parallelism 2,4 -o "$OUT/tuned_config.json" >"$OUT/tune.txt" 2>&1
echo "done: $OUT"
