#!/usr/bin/env bash
# The storage benchmark behind bench/results/io.md, on one directory in one run:
#   1. dd bs=16M with oflag=direct / iflag=direct (the reference the engine must beat by 1.2x),
#   2. `zinf bench io` at DeepSpeed's default aio settings (engine and pread/pwrite baseline),
#   3. `zinf bench io --sweep` (64 engine settings, 16 baseline settings, read and write),
#   4. `zinf tune nvme` on a small grid, writing the aio block into a config.
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
  if(u=="G")n*=1024^3; else if(u=="M")n*=1024^2; else if(u=="T")n*=1024^4; print int(n)}')
count=$((bytes / (16 * 1024 * 1024)))
ddfile="$DIR/zinf-dd-$$.bin"
timeout 300 dd if=/dev/zero of="$ddfile" bs=16M count="$count" oflag=direct 2>"$OUT/dd_write.txt" || true
timeout 300 dd if="$ddfile" of=/dev/null bs=16M iflag=direct 2>"$OUT/dd_read.txt" || true
rm -f "$ddfile"

timeout 300 "$ZINF" bench io --path "$DIR" --size "$SIZE" --json >"$OUT/bench_default.json" 2>"$OUT/bench_default.log"
timeout 560 "$ZINF" bench io --path "$DIR" --size "$SIZE" --sweep --seconds "$SECS" --json >"$OUT/sweep.json" 2>"$OUT/sweep.log"
timeout 300 "$ZINF" tune nvme --path "$DIR" --size "$SIZE" --seconds "$SECS" --sweep-block-sizes 1M,4M \
  --sweep-queue-depths 16,64 --sweep-parallelism 2,4 -o "$OUT/tuned_config.json" >"$OUT/tune.txt" 2>&1
echo "done: $OUT"
