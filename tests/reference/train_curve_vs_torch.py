#!/usr/bin/env python3
# A real model's training curve through `zinf train --device cuda` against a plain PyTorch training
# loop (transformers LlamaForCausalLM, torch.optim.AdamW), from the same weights on the same
# batches. Needs python3 with torch (CUDA) and transformers: the GPU machine's.
#
#   train_curve_vs_torch.py ZINF OUT_DIR [--model configs/models/llama-110m.json] [--steps 100]
#                           [--micro-batch 8] [--seq-len 512] [--bf16]
#
# 1. The PyTorch model is built from the config with a fixed seed and saved as safetensors; zinf
#    starts from those weights (--init).
# 2. The data is real text (this Python installation's own library sources) as byte tokens.
# 3. zinf trains with ZeRO-3 and CPU offload (the preset; on one GPU, the overlapped pipeline),
#    AdamW, gradient clipping 1.0.
# 4. The PyTorch loop replays zinf's run: the same samples in the same order (zinf's seeded
#    permutation, reimplemented below), the learning rate of each step from zinf's metrics, and
#    the optimizer settings from the config zinf resolved.
# fp32: both in fp32, TF32 off. --bf16: zinf's bf16 weights with an fp32 master, PyTorch's
# autocast to bf16 with fp32 weights (similar, not the same arithmetic).
# Prints both curves and their largest difference; writes OUT_DIR/curve.json and curve.csv.
import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

M64 = (1 << 64) - 1


def splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def permutation(n, seed, epoch):
    """zinf's Sampler::shuffle_epoch: Fisher-Yates driven by splitmix64."""
    order = list(range(n))
    state = (seed * 0x100000001B3 + epoch) & M64
    for i in range(n - 1, 0, -1):
        state, r = splitmix(state)
        j = r % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("zinf")
    ap.add_argument("out")
    ap.add_argument("--model", default="configs/models/llama-110m.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    # The data: real text as bytes, enough for every step without a second epoch.
    need = (a.steps * a.micro_batch + 64) * a.seq_len * 1.2
    text = bytearray()
    for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True)):
        text += open(f, "rb").read()
        if len(text) > need:
            break
    tok_file = os.path.join(a.out, "tokens.u16")
    with open(tok_file, "wb") as f:
        f.write(b"".join(bytes((c, 0)) for c in text))  # little-endian uint16
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)

    # The weights: PyTorch's own initialisation, saved for zinf.
    cfg = LlamaConfig(**{k: v for k, v in json.load(open(a.model)).items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(cfg).float()
    init_dir = os.path.join(a.out, "init")
    model.save_pretrained(init_dir, safe_serialization=True)

    zdir = os.path.join(a.out, "zinf")
    cmd = [a.zinf, "train", "--device", "cuda", "--model", a.model, "--init", init_dir, "--data", tok_file,
           "--data-dtype", "uint16", "--micro-batch", str(a.micro_batch), "--grad-accum", "1", "--seq-len",
           str(a.seq_len), "--max-steps", str(a.steps), "--lr", str(a.lr), "--warmup-steps", "0",
           "--weight-decay", "0.01", "--max-grad-norm", "1.0", "--seed", str(a.seed), "--no-save",
           "--output-dir", zdir]
    if a.bf16:
        cmd.append("--bf16")
    print(" ".join(cmd), flush=True)
    with open(os.path.join(a.out, "zinf.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    rows = list(csv.DictReader(open(os.path.join(zdir, "training_metrics.csv"))))
    ds = json.load(open(os.path.join(zdir, "deepspeed_config_auto.json")))
    op = ds["optimizer"]["params"]
    clip = float(ds["gradient_clipping"])

    # The same samples: zinf holds out the last eval_fraction (0.05) of them and permutes the rest.
    total = (len(tokens) - 1) // a.seq_len
    n_eval = max(1, math.floor(total * 0.05 + 0.5))
    train = total - n_eval
    order = permutation(train, a.seed, 0)
    assert a.steps * a.micro_batch <= train, "not enough text for one epoch of these steps"

    dev = torch.device("cuda")
    model = model.to(dev)
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=tuple(op["betas"]), eps=float(op["eps"]),
                            weight_decay=float(op["weight_decay"]))
    data = tokens.to(dev)
    torch_losses = []
    for step in range(a.steps):
        idx = order[step * a.micro_batch:(step + 1) * a.micro_batch]
        x = torch.stack([data[s * a.seq_len:s * a.seq_len + a.seq_len] for s in idx])
        y = torch.stack([data[s * a.seq_len + 1:s * a.seq_len + a.seq_len + 1] for s in idx])
        for g in opt.param_groups:
            g["lr"] = float(rows[step]["lr"])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        torch_losses.append(loss.item())

    zinf_losses = [float(r["loss"]) for r in rows]
    diffs = [abs(z - t) for z, t in zip(zinf_losses, torch_losses)]
    rel = [d / abs(t) for d, t in zip(diffs, torch_losses)]
    with open(os.path.join(a.out, "curve.csv"), "w") as f:
        f.write("step,zinf,torch,abs_diff\n")
        for i, (z, t) in enumerate(zip(zinf_losses, torch_losses)):
            f.write(f"{i + 1},{z:.6f},{t:.6f},{abs(z - t):.6f}\n")
    res = {"model": a.model, "steps": a.steps, "micro_batch": a.micro_batch, "seq_len": a.seq_len,
           "precision": "bf16" if a.bf16 else "fp32", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
           "first_loss": {"zinf": zinf_losses[0], "torch": torch_losses[0]},
           "last_loss": {"zinf": zinf_losses[-1], "torch": torch_losses[-1]},
           "max_abs_diff": max(diffs), "max_rel_diff": max(rel),
           "max_rel_diff_first_10": max(rel[:10]), "mean_abs_diff_last_10": sum(diffs[-10:]) / len(diffs[-10:])}
    json.dump(res, open(os.path.join(a.out, "curve.json"), "w"), indent=2)
    for i in list(range(0, a.steps, max(1, a.steps // 10))) + [a.steps - 1]:
        print(f"step {i + 1:4d}  zinf {zinf_losses[i]:.5f}  torch {torch_losses[i]:.5f}  diff {diffs[i]:.2e}")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
