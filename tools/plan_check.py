#!/usr/bin/env python3
"""Compares `zinf plan` with runs that happened: for each `zinf train` output directory, the plan
made from the run's own resolved config, model and batch (and a `zinf bench all` report of the
machine) against the run's median step time and measured peak memory per tier.
Exits 1 when a run is missing or failed, a prediction is off by more than 25%, the plan's GPU
bytes differ from the trainer's own plan, or fall below the measured peak.
Standard library only (any python3).
    tools/plan_check.py ZINF REPORT.json RUN_DIR [RUN_DIR ...]
"""
import csv
import json
import os
import subprocess
import sys
import tempfile


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    zinf, report, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    rows = []
    problems = []
    for run in runs:
        sp = os.path.join(run, "summary.json")
        mp = os.path.join(run, "training_metrics.csv")
        if not (os.path.exists(sp) and os.path.exists(mp)):
            problems.append(f"{run}: no summary.json / training_metrics.csv (the run failed?)")
            continue
        s = json.load(open(sp))
        metrics = list(csv.DictReader(open(mp)))[2:]  # two warm-up steps
        if not metrics:
            problems.append(f"{run}: fewer than 3 steps")
            continue
        steps = sorted(float(m["step_s"]) for m in metrics)
        measured = steps[len(steps) // 2]
        with tempfile.TemporaryDirectory() as tmp:
            ds = os.path.join(tmp, "ds.json")
            model = os.path.join(tmp, "config.json")
            json.dump(s["deepspeed_config"], open(ds, "w"))
            json.dump(s["model"]["config"], open(model, "w"))
            world = s.get("zero", {}).get("world_size", 1)
            cmd = [zinf, "plan", "--model", model, "--deepspeed", ds, "--gpus", str(world), "--seq-len",
                   str(s["data"]["seq_len"]), "--bench", report, "--json", "--device", s.get("backend", "cuda")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode not in (0, 3):
                problems.append(f"{run}: zinf plan failed: {out.stderr.strip()}")
                continue
            p = json.loads(out.stdout)
        gpu = s.get("gpu_memory", {})
        plan_gpu = p["tiers"]["gpu"]["bytes"]
        plan_host = p["tiers"]["host_pinned"]["bytes"] / world
        meas_host = s["peak_memory_bytes"]["host_pinned"]
        r = {
            "run": os.path.basename(run.rstrip("/")),
            "predicted_s": p["step"]["predicted_s"], "measured_s": measured,
            "step_error": p["step"]["predicted_s"] / measured - 1, "bound": p["step"]["bound"],
            "plan_gpu_bytes": plan_gpu, "trainer_planned_gpu_bytes": gpu.get("planned_bytes"),
            "measured_gpu_peak_bytes": gpu.get("peak_bytes"),
            "gpu_error": plan_gpu / gpu["peak_bytes"] - 1 if gpu.get("peak_bytes") else None,
            "plan_host_pinned_bytes_per_rank": plan_host, "measured_host_pinned_bytes": meas_host,
            "host_error": plan_host / meas_host - 1 if meas_host else None,
        }
        rows.append(r)
        if abs(r["step_error"]) > 0.25:
            problems.append(f"{r['run']}: predicted {r['predicted_s']:.3f} s, measured {measured:.3f} s (more than 25% off)")
        if gpu.get("planned_bytes") and abs(plan_gpu / gpu["planned_bytes"] - 1) > 0.005:
            problems.append(f"{r['run']}: plan GPU bytes {plan_gpu} differ from the trainer's plan {gpu['planned_bytes']}")
        if gpu.get("peak_bytes") and plan_gpu < gpu["peak_bytes"]:
            problems.append(f"{r['run']}: plan GPU bytes {plan_gpu} below the measured peak {gpu['peak_bytes']}")
    print(f"{'run':<22} {'plan s':>8} {'meas s':>8} {'err':>7} {'bound':>8}   {'GPU plan':>9} {'GPU peak':>9} {'err':>7}"
          f"   {'host plan':>9} {'host meas':>9} {'err':>7}")
    g = lambda b: f"{b / 2**30:9.2f}" if b else f"{'-':>9}"
    e = lambda x: f"{100 * x:+6.1f}%" if x is not None else f"{'-':>7}"
    for r in rows:
        print(f"{r['run']:<22} {r['predicted_s']:8.3f} {r['measured_s']:8.3f} {e(r['step_error'])} {r['bound']:>8}   "
              f"{g(r['plan_gpu_bytes'])} {g(r['measured_gpu_peak_bytes'])} {e(r['gpu_error'])}   "
              f"{g(r['plan_host_pinned_bytes_per_rank'])} {g(r['measured_host_pinned_bytes'])} {e(r['host_error'])}")
    print("(GiB; GPU plan = zinf's own allocations, the upper bound --gpu-memory-limit enforces)")
    with open(os.path.join(os.path.dirname(os.path.abspath(runs[0].rstrip("/"))), "plan_check.json"), "w") as f:
        json.dump(rows, f, indent=2)
    for p in problems:
        print("PROBLEM:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
