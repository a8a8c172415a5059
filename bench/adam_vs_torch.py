#!/usr/bin/env python3
"""zinf's CPU optimizer against PyTorch's, same machine, same thread count, one invocation.

Runs `zinf bench adam --json` and then, in this process, PyTorch's equivalents on the same number
of parameters and threads, timed the same way (one warm-up, then the best of --repeat):
  - bare fp32 AdamW: torch.optim.AdamW(fused=True) where this torch has a fused CPU kernel
    (PyTorch >= 2.4), else foreach, else the single-tensor loop;
  - the full host step with bf16 gradients in: the bf16 -> fp32 gradient copy, unscale (mul_),
    torch.nn.utils.clip_grad_norm_, AdamW.step(), and the copy of the parameters to bf16.
Prints a table with the ratios and, with --json, writes everything to a file.

Run it with a python3 that has torch (Debian: /usr/bin/python3 with python3-torch; the GPU
machine: python3). Usage:
  bench/adam_vs_torch.py --zinf build/tools/zinf [--params 256M] [--threads N] [--repeat 5] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch


def parse_count(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def best_of(repeat, fn):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def make_adamw(params, lr):
    for kind in ("fused", "foreach", "single"):
        try:
            if kind == "fused":
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
            elif kind == "foreach":
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
            else:
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
            # Some versions accept fused=True and fail only at the first step on CPU.
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            return opt, kind
        except (RuntimeError, TypeError, ValueError):
            continue
    raise SystemExit("no usable torch.optim.AdamW")


def torch_bench(n, threads, repeat):
    torch.set_num_threads(threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    param = torch.nn.Parameter(torch.full((n,), 0.01, dtype=torch.float32))
    opt, kind = make_adamw([param], 1e-4)
    out["adamw_impl"] = kind
    grad32 = torch.full((n,), 1e-3, dtype=torch.float32)

    def bare():
        param.grad = grad32
        opt.step()

    out["adamw_fp32"] = best_of(repeat, bare)

    grad_bf16 = torch.full((n,), 1e-3, dtype=torch.bfloat16)
    grad_buf = torch.empty(n, dtype=torch.float32)
    out_bf16 = torch.empty(n, dtype=torch.bfloat16)

    def full():
        grad_buf.copy_(grad_bf16)          # bf16 gradient shard -> fp32 grad
        grad_buf.mul_(0.5)                 # unscale
        param.grad = grad_buf
        torch.nn.utils.clip_grad_norm_([param], 1.0)
        opt.step()
        out_bf16.copy_(param.detach())     # parameters for the GPU

    out["full_host_step_adamw_bf16"] = best_of(repeat, full)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zinf", required=True)
    ap.add_argument("--params", default="256M")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write all results to this file")
    a = ap.parse_args()
    n = parse_count(a.params)

    cmd = [a.zinf, "bench", "adam", "--json", "--params", str(n), "--threads", str(a.threads), "--repeat",
           str(a.repeat), "--grad-dtype", "bf16"]
    z = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    t = torch_bench(n, a.threads, a.repeat)

    best_isa = z["kernels"][0]["isa"]  # the stream rows use the best ISA, listed first
    zk = {k["kernel"]: k for k in z["kernels"] if k["isa"] == best_isa}
    rows = []
    for name in ("adamw_fp32", "full_host_step_adamw_bf16"):
        z_pps = zk[name]["params_per_s"]
        t_pps = n / t[name][0]
        rows.append({"step": name, "zinf_params_per_s": z_pps, "torch_params_per_s": t_pps, "ratio": z_pps / t_pps,
                     "zinf_fraction_of_triad": zk[name]["fraction_of_triad"]})

    print(f"{n} parameters, {a.threads} threads; zinf {best_isa} kernels; torch {t['torch']} "
          f"(AdamW {t['adamw_impl']}); best of {a.repeat}; same-run STREAM triad {z['stream_triad_GBps']:.1f} GB/s")
    print(f"{'step':<28} {'zinf Gparam/s':>14} {'torch Gparam/s':>15} {'zinf/torch':>11} {'zinf of triad':>14}")
    for r in rows:
        print(f"{r['step']:<28} {r['zinf_params_per_s'] / 1e9:>14.3f} {r['torch_params_per_s'] / 1e9:>15.3f} "
              f"{r['ratio']:>10.2f}x {100 * r['zinf_fraction_of_triad']:>13.0f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"params": n, "threads": a.threads, "zinf": z, "torch": t, "comparison": rows}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
