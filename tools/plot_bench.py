#!/usr/bin/python3
"""Plots of a `zinf bench all --report DIR` report: DIR/pcie.png (GB/s against transfer size) and
DIR/io.png (GB/s against block size and queue depth, when the io bench swept them).
Uses Debian's python3 with matplotlib (/usr/bin/python3).
    tools/plot_bench.py DIR
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pcie(report, out):
    p = report.get("pcie", {})
    if p.get("status") != "ok":
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    series = {}
    for r in p["rows"]:
        series.setdefault((r["path"], r["memory"], r["direction"]), []).append((r["bytes"], r["GBps"]))
    for (path, mem, direction), pts in sorted(series.items()):
        pts.sort()
        style = "-" if path == "zinf" else ("--" if mem == "pinned" else ":")
        ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", ms=3,
                label=f"{path} {mem} {direction}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("transfer size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"PCIe: {p.get('gpu', '')}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pcie.png"), dpi=120)
    plt.close(fig)
    return True


def io(report, out):
    i = report.get("io", {})
    if i.get("status") != "ok" or "points" not in i:
        return False
    pts = [p for p in i["points"] if p.get("impl") == "zinf" and p.get("pattern") == "sequential"]
    if not pts:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, op in zip(axes, ("read", "write")):
        by_qd = {}
        for p in pts:
            if p["op"] == op:
                by_qd.setdefault((p["queue_depth"], p["intra_op_parallelism"]), []).append((p["block_size"], p["GBps"]))
        for (qd, par), xs in sorted(by_qd.items()):
            xs.sort()
            ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", ms=3, label=f"qd {qd}, {par} ring(s)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (bytes)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"NVMe {op}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "io.png"), dpi=120)
    plt.close(fig)
    return True


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: plot_bench.py REPORT_DIR")
    out = sys.argv[1]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    drawn = [name for name, fn in (("pcie.png", pcie), ("io.png", io)) if fn(report, out)]
    print("drew", ", ".join(drawn) if drawn else "nothing (no pcie or io results)")


if __name__ == "__main__":
    main()
