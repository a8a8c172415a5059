#!/usr/bin/env python3
"""PyTorch reference of zinf's LoRA for tests/unit/lora_reference_test.cpp.

The plain model of gen_model_reference.py with PEFT's LoRA math on the targeted linears:
    y = x W^T (+ b) + scale * (dropout(x) A^T) B^T,   scale = alpha / r (alpha / sqrt(r) with rsLoRA),
the base frozen. Dropout masks are zinf's counter-based ones (kernels/include/zinf/kernels/dropout.hpp),
reproduced here bit for bit with numpy, so a training-mode pass with dropout is compared exactly too.
For each case it writes, into OUTPUT_DIR/<case>/:
  config.json, model.safetensors (fp32 base), model_bf16.safetensors (the base rounded to bf16)
  adapter/adapter_model.safetensors + adapter/adapter_config.json   the adapters, in PEFT's format
  batch.safetensors      tokens and targets (batch, seq) int32
  ref.json               the micro-batch seed, the training loss (dropout on) and the eval loss (off)
  ref.safetensors        "grad.<PEFT tensor name>" of every lora_A / lora_B for the training pass
  ref_bf16.json, ref_bf16.safetensors   the same from the bf16-rounded base (computed in fp32)
Needs torch and numpy: Debian's python3-torch (/usr/bin/python3 on Debian 12) or any newer PyTorch.

Usage: gen_lora_reference.py OUTPUT_DIR
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    import torch
    import torch.nn as nn
except ImportError:
    sys.exit("gen_lora_reference.py: torch and numpy must be importable by %s; on Debian install python3-torch "
             "(scripts/install-deps.sh does) or point ZINF_PYTHON at a python3 that has them" % sys.executable)
import gen_model_reference as ref  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # zinf's order

CASES = {
    # name: (base case of gen_model_reference, rank, alpha, dropout, targets, rslora)
    "llama_mha_all_linear": ("llama_mha", 4, 8.0, 0.0, TARGETS, False),
    "qwen2_qv_dropout_rslora": ("qwen2_bias_tied", 3, 6.0, 0.25, ["q_proj", "v_proj"], True),
    "llama_gqa_attn_mlp_dropout": ("llama_gqa_tied_llama3", 2, 16.0, 0.1, ["k_proj", "o_proj", "up_proj", "down_proj"], False),
}

M64 = (1 << 64) - 1


def _mix(x):
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def dropout_stream(seed, stream):
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + np.uint64((stream + 1) * 0xD1B54A32D192ED03 & M64)
    return int(_mix(np.array([x], dtype=np.uint64))[0])


def keep_mask(seed, count, p):
    """zinf's dropout_keep(seed, i, p) for i < count."""
    i = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
    u = (_mix(x) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return u >= np.float32(p)


class LoraLinear(nn.Module):
    def __init__(self, base, r, scale, p):
        super().__init__()
        self.base = base
        for q in self.base.parameters():
            q.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale, self.p = scale, p
        self.mask = None  # (rows, in) bool, or None: no dropout

    def forward(self, x):
        xd = x
        if self.mask is not None:
            xd = x * self.mask.reshape(x.shape).to(x.dtype) / (1.0 - self.p)
        return self.base(x) + self.scale * ((xd @ self.lora_A.t()) @ self.lora_B.t())


def attach(model, cfg, r, alpha, p, targets, rslora):
    scale = alpha / (r ** 0.5 if rslora else r)
    adapters = []  # (PEFT module name, LoraLinear), in zinf's order: layer by layer, TARGETS order
    for li, layer in enumerate(model.model.layers):
        for t in TARGETS:
            if t not in targets:
                continue
            parent = layer.self_attn if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            lin = LoraLinear(getattr(parent, t), r, scale, p)
            setattr(parent, t, lin)
            where = "self_attn" if parent is layer.self_attn else "mlp"
            adapters.append(("model.layers.%d.%s.%s" % (li, where, t), lin))
    return adapters


def run_case(out_dir, name, spec, seed):
    base_case, r, alpha, p, targets, rslora = spec
    cfg, batch, seq = ref.CASES[base_case]
    d = os.path.join(out_dir, name)
    os.makedirs(os.path.join(d, "adapter"), exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model = ref.CausalLM(cfg)
    ref.randomize(model, gen)
    base = {n: q.detach().clone() for n, q in model.named_weights()}
    adapters = attach(model, cfg, r, alpha, p, targets, rslora)
    with torch.no_grad():
        for _, lin in adapters:
            lin.lora_A.copy_(torch.rand(lin.lora_A.shape, generator=gen) * 2 - 1)
            lin.lora_A.mul_(1.0 / lin.base.in_features ** 0.5)
            lin.lora_B.copy_(0.2 * torch.randn(lin.lora_B.shape, generator=gen))  # non-zero: gradients reach A
    tokens = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=gen, dtype=torch.int64)
    inputs = tokens[:, :-1].to(torch.int32).contiguous()
    targets_t = tokens[:, 1:].to(torch.int32).clone()
    targets_t[0, 1] = -100
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    ref.save_safetensors(os.path.join(d, "model.safetensors"), base)
    ref.save_safetensors(os.path.join(d, "model_bf16.safetensors"), {n: t.to(torch.bfloat16) for n, t in base.items()})
    ref.save_safetensors(os.path.join(d, "batch.safetensors"), {"tokens": inputs, "targets": targets_t})
    peft = {}
    for mod, lin in adapters:
        peft["base_model.model.%s.lora_A.weight" % mod] = lin.lora_A.detach().clone()
        peft["base_model.model.%s.lora_B.weight" % mod] = lin.lora_B.detach().clone()
    ref.save_safetensors(os.path.join(d, "adapter", "adapter_model.safetensors"), peft)
    with open(os.path.join(d, "adapter", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": p,
                   "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": rslora,
                   "base_model_name_or_path": "model.safetensors"}, f, indent=2)
    micro_seed = 0x1234ABCD5678 + seed

    def dump(suffix):
        # training pass: zinf's masks (adapter i: dropout_stream(micro_seed, i))
        for i, (_, lin) in enumerate(adapters):
            rows = batch * seq
            lin.mask = torch.from_numpy(keep_mask(dropout_stream(micro_seed, i), rows * lin.base.in_features, p)) \
                if p > 0 else None
        for _, lin in adapters:
            lin.lora_A.grad = None
            lin.lora_B.grad = None
        loss, _ = model(inputs, targets_t)
        loss.backward()
        grads = {}
        for mod, lin in adapters:
            grads["grad.base_model.model.%s.lora_A.weight" % mod] = lin.lora_A.grad.detach().clone()
            grads["grad.base_model.model.%s.lora_B.weight" % mod] = lin.lora_B.grad.detach().clone()
        for _, lin in adapters:
            lin.mask = None
        with torch.no_grad():
            eval_loss, _ = model(inputs, targets_t)
        ref.save_safetensors(os.path.join(d, "ref%s.safetensors" % suffix), grads)
        with open(os.path.join(d, "ref%s.json" % suffix), "w") as f:
            json.dump({"micro_seed": micro_seed, "train_loss": float(loss), "eval_loss": float(eval_loss),
                       "rank": r, "alpha": alpha, "dropout": p, "targets": targets, "rslora": rslora,
                       "torch": torch.__version__}, f, indent=2)

    dump("")
    with torch.no_grad():  # the bf16-rounded base, the reference still in fp32
        for n, q in model.named_parameters():
            if "lora_" not in n:
                q.copy_(q.to(torch.bfloat16).float())
    dump("_bf16")


def main():
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for i, (name, spec) in enumerate(sorted(CASES.items())):
        run_case(sys.argv[1], name, spec, seed=2000 + i)
    with open(os.path.join(sys.argv[1], "cases.txt"), "w") as f:
        f.write("\n".join(sorted(CASES)) + "\n")


if __name__ == "__main__":
    main()
