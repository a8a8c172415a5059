#!/usr/bin/env python3
"""Render the output folder of bench/io_bench.sh as a Markdown section for bench/results/io.md.

Usage: python3 bench/io_report.py OUTDIR [TITLE]   (standard library only; any python3)
"""
import glob
import json
import os
import re
import statistics
import sys


def dd_gbps(path):
    """GB/s (1e9 bytes/s) from dd's summary line, recomputed from bytes and seconds."""
    try:
        text = open(path).read()
    except OSError:
        return None
    m = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", text, re.M)
    return int(m.group(1)) / float(m.group(2)) / 1e9 if m else None


def size_label(b):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)


def row(p):
    qd = p.get("queue_depth")
    qd = "-" if qd is None else (f"{qd}*" if p.get("effective_queue_depth", qd) < qd else str(qd))
    lat = p["latency_us"]
    return (f"| {p['impl']} | {p['op']} | {'seq' if p['pattern'] == 'sequential' else 'random'} | "
            f"{size_label(p['block_size'])} | {qd} | {p['intra_op_parallelism']} | {p['GBps']:.3f} | "
            f"{lat['p50']:.0f} | {lat['p99']:.0f} | {lat['max']:.0f} |")


HEADER = ("| impl | op | access | block | qd | par | GB/s | p50 us | p99 us | max us |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main():
    out_dir = sys.argv[1]
    title = sys.argv[2] if len(sys.argv) > 2 else out_dir
    sweep = json.load(open(os.path.join(out_dir, "sweep.json")))
    default = json.load(open(os.path.join(out_dir, "bench_default.json")))
    m = sweep["machine"]
    lines = [f"## {title}", ""]
    lines.append(f"- date: {m['date']}; host CPU: {m['cpu']}, {m['cores']} cores; kernel {m['kernel']}")
    lines.append(f"- directory: `{sweep['path']}` on {m['device']} ({m['filesystem']}, mounted at {m['mount']}), "
                 f"{'O_DIRECT' if sweep['direct'] else 'buffered'}; test file {sweep['size'] / 2**30:.0f} GiB; "
                 f"sweep points limited to {sweep['max_seconds_per_point']} s each")
    machine_txt = os.path.join(out_dir, "machine.txt")
    if os.path.exists(machine_txt):
        queue = [l.strip() for l in open(machine_txt) if re.search(r"max_sectors_kb|hardware queues|scheduler|nr_requests", l)]
        if queue:
            lines.append("- block queue: " + "; ".join(queue))
    lines.append("")

    dd_w, dd_r = dd_gbps(os.path.join(out_dir, "dd_write.txt")), dd_gbps(os.path.join(out_dir, "dd_read.txt"))
    lines.append("### Reference: dd bs=16M, O_DIRECT")
    lines.append("")
    lines.append(f"fresh file: write {dd_w:.3f} GB/s, read {dd_r:.3f} GB/s" if dd_w and dd_r else "dd: not measured")
    lines.append("")

    best = sweep["best"]
    bw, br = sweep["baseline_best_write"], sweep["baseline_best_read"]
    tw, tr = sweep["best_write"], sweep["best_read"]
    lines.append("### Sweep (sequential, block x queue depth x parallelism; baseline: block x threads)")
    lines.append("")
    lines.append("| | zinf best | pread/pwrite best | zinf / baseline | zinf / dd |")
    lines.append("|---|---|---|---|---|")
    for name, t, b, dd in (("read", tr, br, dd_r), ("write", tw, bw, dd_w)):
        lines.append(f"| {name} | {t['GBps']:.3f} GB/s ({size_label(t['block_size'])}, qd {t['queue_depth']}, "
                     f"par {t['intra_op_parallelism']}) | {b['GBps']:.3f} GB/s ({size_label(b['block_size'])}, "
                     f"{b['intra_op_parallelism']} threads) | {t['GBps'] / b['GBps']:.2f}x | "
                     f"{t['GBps'] / dd:.2f}x |" if dd else "")
    lines.append("")
    lines.append(f"One aio setting for both directions (`zinf tune nvme` picks it): block {size_label(best['block_size'])}, "
                 f"queue depth {best['queue_depth']}, parallelism {best['intra_op_parallelism']}: "
                 f"read {best['read_GBps']:.3f} GB/s, write {best['write_GBps']:.3f} GB/s.")
    lines.append("")
    for op in ("read", "write"):
        pts = sorted((p for p in sweep["points"] if p["op"] == op), key=lambda p: -p["GBps"])
        lines.append(f"<details><summary>sequential {op}: all {len(pts)} points, fastest first</summary>")
        lines.append("")
        lines.append(HEADER)
        lines.extend(row(p) for p in pts)
        lines.append("")
        lines.append("</details>")
        lines.append("")

    rounds = sorted(glob.glob(os.path.join(out_dir, "best_*.json")))
    if rounds:
        lines.append(f"### Head to head, {len(rounds)} rounds on the same file system (GB/s)")
        lines.append("")
        s = json.load(open(rounds[0]))["settings"]
        lines.append(f"zinf at the sweep's best setting (block {size_label(s['block_size'])}, qd {s['queue_depth']}, "
                     f"par {s['intra_op_parallelism']}); pread/pwrite at the same block size and thread count; "
                     "dd bs=16M direct overwriting its own 4 GiB file, then reading it.")
        lines.append("")
        lines.append("| round | zinf seq write | pwrite seq | dd overwrite | zinf seq read | pread seq | dd read | "
                     "zinf rand write | zinf rand read |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        cols = {k: [] for k in ("zw", "bw", "dw", "zr", "br", "dr", "zrw", "zrr")}
        for i, path in enumerate(rounds, 1):
            pts = json.load(open(path))["points"]
            get = lambda impl, op, pat: next(p["GBps"] for p in pts if p["impl"] == impl and p["op"] == op and p["pattern"] == pat)
            vals = dict(zw=get("zinf", "write", "sequential"), bw=get("pread", "write", "sequential"),
                        dw=dd_gbps(os.path.join(out_dir, f"dd_overwrite_{i}.txt")),
                        zr=get("zinf", "read", "sequential"), br=get("pread", "read", "sequential"),
                        dr=dd_gbps(os.path.join(out_dir, f"dd_read_{i}.txt")),
                        zrw=get("zinf", "write", "random"), zrr=get("zinf", "read", "random"))
            for k, v in vals.items():
                cols[k].append(v)
            lines.append(f"| {i} | " + " | ".join(f"{vals[k]:.3f}" for k in cols) + " |")
        med = {k: statistics.median(v) for k, v in cols.items()}
        lines.append("| median | " + " | ".join(f"{med[k]:.3f}" for k in cols) + " |")
        lines.append("")
        lines.append(f"Medians: zinf write {med['zw'] / med['bw']:.2f}x pwrite and {med['zw'] / med['dw']:.2f}x dd; "
                     f"zinf read {med['zr'] / med['br']:.2f}x pread and {med['zr'] / med['dr']:.2f}x dd.")
        lines.append("")

    s = default["settings"]
    lines.append(f"### DeepSpeed's default aio setting (block {size_label(s['block_size'])}, qd {s['queue_depth']}, "
                 f"par {s['intra_op_parallelism']}), sequential and random")
    lines.append("")
    lines.append(HEADER)
    lines.extend(row(p) for p in default["points"])
    lines.append("")
    tuned = os.path.join(out_dir, "tuned_config.json")
    if os.path.exists(tuned):
        lines.append("`zinf tune nvme` on a small grid (1M,4M x 16,64 x 2,4) wrote:")
        lines.append("")
        lines.append("```json")
        lines.append(open(tuned).read().strip())
        lines.append("```")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
