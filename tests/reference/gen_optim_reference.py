#!/usr/bin/env python3
"""Golden optimizer trajectories from PyTorch for tests/unit/cpu_optim_golden_test.cpp.

Runs torch.optim.AdamW, Adam (L2 weight decay) and Adagrad for 10 steps on float32 CPU tensors,
plus AdamW fed bf16 gradients with the updated parameter emitted as bf16, and writes inputs and
results as JSON (every float32 value printed exactly). Needs torch: Debian's python3-torch
(/usr/bin/python3 on Debian 12) or any newer PyTorch.

Usage: gen_optim_reference.py OUTPUT.json
"""
import json
import sys

try:
    import torch
except ImportError:
    sys.exit("gen_optim_reference.py: PyTorch is not importable by %s; on Debian install python3-torch "
             "(scripts/install-deps.sh does) or point ZINF_PYTHON at a python3 that has torch" % sys.executable)

N = 1003
STEPS = 10


def floats(t):
    return [float(x) for x in t.detach().float().reshape(-1).tolist()]


def run_case(name, make_opt, grad_scale=1.0, bf16_grads=False):
    g = torch.Generator().manual_seed(1234)
    param = torch.nn.Parameter(torch.rand(N, generator=g, dtype=torch.float32) * 2 - 1)
    init = floats(param)
    opt, config = make_opt([param])
    grads = []
    for _ in range(STEPS):
        raw = (torch.rand(N, generator=g, dtype=torch.float32) - 0.5) * 0.6
        if bf16_grads:
            raw = raw.to(torch.bfloat16)
        grads.append(floats(raw))
        param.grad = raw.float() * grad_scale
        opt.step()
    state = opt.state[param]
    out = {"name": name, "n": N, "steps": STEPS, "config": config, "grad_scale": grad_scale,
           "grad_dtype": "bf16" if bf16_grads else "fp32", "param0": init, "grads": grads, "param": floats(param)}
    for key in ("exp_avg", "exp_avg_sq", "sum"):
        if key in state:
            out[key] = floats(state[key])
    out["param_bf16"] = floats(param.detach().to(torch.bfloat16))
    return out


def adamw(params):
    cfg = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "adam_w_mode": True}
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                             weight_decay=cfg["weight_decay"]), cfg


def adam_l2(params):
    cfg = {"lr": 3e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05, "adam_w_mode": False}
    return torch.optim.Adam(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"]), cfg


def adagrad(params):
    cfg = {"lr": 5e-2, "lr_decay": 0.01, "eps": 1e-10, "weight_decay": 0.02}
    return torch.optim.Adagrad(params, lr=cfg["lr"], lr_decay=cfg["lr_decay"], eps=cfg["eps"],
                               weight_decay=cfg["weight_decay"]), cfg


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = [run_case("adamw", adamw), run_case("adam_l2", adam_l2), run_case("adagrad", adagrad),
             run_case("adamw_bf16_grads_scaled", adamw, grad_scale=0.5, bf16_grads=True)]
    with open(sys.argv[1], "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f)
    print("wrote %s (torch %s, %d cases)" % (sys.argv[1], torch.__version__, len(cases)))


if __name__ == "__main__":
    main()
