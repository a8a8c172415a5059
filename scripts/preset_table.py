#!/usr/bin/env python3
"""The preset table of docs/plan.md: `zinf plan` for every zinf_* preset and model shape, micro-batch
4 x 2048 without clipping, one GPU of the preset's size (in GiB: 22.5, 79.6 and 140.4, what
the cards report), with a bench report's rates. Standard library only.
    scripts/preset_table.py ZINF REPORT.json [HOST_MEM]
"""
import json
import subprocess
import sys

zinf, report = sys.argv[1], sys.argv[2]
host = sys.argv[3] if len(sys.argv) > 3 else "128G"
models = [("1.1B", "configs/models/tinyllama-1.1b.json"), ("3.1B", "configs/models/bench-3.1b.json"),
          ("8B", "configs/models/bench-8b.json"), ("13B", "configs/models/bench-13b.json"),
          ("70B", "configs/models/bench-70b.json")]
presets = [("zinf_gpu24g_cpuoffload", "22.5G"), ("zinf_gpu24g_nvme", "22.5G"), ("zinf_gpu80g_cpuoffload", "79.6G"),
           ("zinf_gpu80g_nvme", "79.6G"), ("zinf_gpu141g_cpuoffload", "140.4G"), ("zinf_gpu141g_nvme", "140.4G")]
gib = lambda b: b / 2**30
print(f"| preset | model | GPU GiB | pinned host GiB | NVMe GiB | fits ({host} RAM) | predicted s/step | bound |")
print("|---|---|---|---|---|---|---|---|")
for preset, gpu in presets:
    for label, model in models:
        seq = "2048"
        out = subprocess.run([zinf, "plan", "--model", model, "--deepspeed", preset, "--gpu-mem", gpu, "--host-mem", host,
                              "--micro-batch", "4", "--grad-accum", "1", "--max-grad-norm", "0", "--seq-len", seq,
                              "--bench", report, "--json"], capture_output=True, text=True)
        if out.returncode not in (0, 3):
            print(f"| {preset} | {label} | error: {out.stderr.strip()[:80]} |||||")
            continue
        p = json.loads(out.stdout)
        t = p["tiers"]
        bad = [k for k, v in t.items() if v["fits"] == "does not fit"]
        fits = "yes" if not bad else "no: " + ", ".join(bad)
        print(f"| {preset} | {label} | {gib(t['gpu']['bytes']):.1f} | {gib(t['host_pinned']['bytes']):.1f} | "
              f"{gib(t['nvme']['bytes']):.1f} | {fits} | {p['step']['predicted_s']:.2f} | {p['step']['bound']} |")
