#!/usr/bin/env python3
"""PyTorch reference of zinf's Llama-family model for tests/unit/model_reference_test.cpp.

A small, plain torch.nn implementation of the same architecture (Llama, Qwen2, Mistral: RMSNorm,
rotary embedding with theta and linear/llama3 scaling, grouped-query causal attention, SwiGLU MLP,
optional q/k/v, o and MLP biases, tied or untied embeddings), with Hugging Face parameter names.
For each tiny config it writes, into OUTPUT_DIR/<case>/:
  config.json             the Hugging Face config
  model.safetensors       random fp32 weights
  batch.safetensors       tokens and targets (batch, seq) int32, some targets -100 (ignored)
  ref.safetensors         loss, logits and the gradient of every parameter ("grad.<name>")
  ref.json                AdamW steps (10, or --adam-steps): hyperparameters and the loss before
                          each step and after
  model_bf16.safetensors  the same weights rounded to bf16 (stored as BF16)
  ref_bf16.safetensors    loss, logits and gradients in fp32 for the bf16-rounded weights
Needs torch: Debian's python3-torch (/usr/bin/python3 on Debian 12) or any newer PyTorch; no
transformers needed. With --device cuda the passes run on the GPU, in full fp32 (TF32 off): the
reference for the CUDA backend on the GPU machine (PyTorch 2.11 there).

Usage: gen_model_reference.py OUTPUT_DIR [--device cpu|cuda] [--adam-steps N]
"""
import json
import math
import os
import struct
import sys

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("gen_model_reference.py: PyTorch is not importable by %s; on Debian install python3-torch "
             "(scripts/install-deps.sh does) or point ZINF_PYTHON at a python3 that has torch" % sys.executable)

ADAM = {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "steps": 10}

CASES = {
    # name: (config, batch, seq)
    "llama_mha": ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 96,
                   "vocab_size": 200, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "max_position_embeddings": 64, "tie_word_embeddings": False}, 2, 16),
    "llama_gqa_tied_llama3": ({"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 80,
                               "vocab_size": 131, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                               "max_position_embeddings": 64, "tie_word_embeddings": True,
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 256}}, 3, 12),
    "qwen2_bias_tied": ({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                         "vocab_size": 150, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                         "max_position_embeddings": 64, "tie_word_embeddings": True,
                         "use_sliding_window": False, "sliding_window": 32}, 2, 20),
    "llama_all_bias_headdim": ({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24,
                                "intermediate_size": 40, "vocab_size": 77, "rms_norm_eps": 1e-6,
                                "attention_bias": True, "mlp_bias": True, "max_position_embeddings": 32,
                                "tie_word_embeddings": False}, 2, 9),
    "mistral_linear_rope": ({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
                             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 112,
                             "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                             "rope_scaling": {"type": "linear", "factor": 2.0},
                             "max_position_embeddings": 128, "sliding_window": 4096,
                             "tie_word_embeddings": False}, 1, 33),
}


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def inv_freq(cfg, hd):
    base = cfg.get("rope_theta", 10000.0)
    f = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.get("rope_scaling")
    if not rs:
        return f
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return f / rs["factor"]
    assert kind == "llama3"
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / f
    scaled = torch.where(wavelen > low_wavelen, f / factor, f)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, qkv_bias, o_bias):
        super().__init__()
        h, self.nh, self.nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim", h // self.nh)
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=o_bias)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        g = self.nh // self.nkv
        k = k.repeat_interleave(g, dim=1)  # q head j reads kv head j // g, as transformers' repeat_kv
        v = v.repeat_interleave(g, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=s.device), diagonal=1)
        p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg, bias):
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg, qkv_bias, o_bias, mlp_bias):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg, mlp_bias)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        arch = cfg["architectures"][0]
        qkv_bias = arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)
        o_bias = arch == "LlamaForCausalLM" and cfg.get("attention_bias", False)
        mlp_bias = arch == "LlamaForCausalLM" and cfg.get("mlp_bias", False)
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg, qkv_bias, o_bias, mlp_bias) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


class CausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hd = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        freqs = (torch.arange(t, dtype=torch.float32)[:, None] * inv_freq(self.cfg, self.hd)[None, :]).to(tokens.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(), ignore_index=-100)
        return loss, logits

    def named_weights(self):
        """(name, parameter) in Hugging Face naming, without the tied lm_head duplicate."""
        seen = set()
        for name, p in self.named_parameters(remove_duplicate=False) if _has_remove_duplicate() else self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield name, p


def _has_remove_duplicate():
    import inspect
    return "remove_duplicate" in inspect.signature(nn.Module.named_parameters).parameters


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_weights():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32"}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def dump_pass(model, tokens, targets):
    model.zero_grad()
    loss, logits = model(tokens, targets)
    loss.backward()
    out = {"loss": loss.detach().reshape([]), "logits": logits.detach()}
    for name, p in model.named_weights():
        out["grad." + name] = p.grad.detach().clone()
    return out


DEVICE = "cpu"


def run_case(out_dir, name, cfg, batch, seq, seed):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model = CausalLM(cfg)
    randomize(model, gen)  # on the CPU, so both devices start from the same weights
    model.to(DEVICE)
    tokens = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=gen, dtype=torch.int64)
    inputs = tokens[:, :-1].to(torch.int32).contiguous()
    targets = tokens[:, 1:].to(torch.int32).clone()
    ignore = torch.rand((batch, seq), generator=gen) < 0.15
    targets[ignore] = -100
    targets[0, 0] = int(tokens[0, 1])  # at least one target stays
    inputs, targets = inputs.to(DEVICE), targets.to(DEVICE)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights = {n: p.detach().clone() for n, p in model.named_weights()}
    save_safetensors(os.path.join(d, "model.safetensors"), weights)
    save_safetensors(os.path.join(d, "batch.safetensors"), {"tokens": inputs, "targets": targets})
    save_safetensors(os.path.join(d, "ref.safetensors"), dump_pass(model, inputs, targets))

    # bf16: the same weights rounded to bf16, the reference computed in fp32 from them.
    with torch.no_grad():
        for _, p in model.named_weights():
            p.copy_(p.to(torch.bfloat16).float())
    save_safetensors(os.path.join(d, "model_bf16.safetensors"),
                     {n: p.detach().to(torch.bfloat16) for n, p in model.named_weights()})
    save_safetensors(os.path.join(d, "ref_bf16.safetensors"), dump_pass(model, inputs, targets))

    # AdamW steps from the fp32 weights on the same batch.
    with torch.no_grad():
        for n, p in model.named_weights():
            p.copy_(weights[n])
    opt = torch.optim.AdamW([p for _, p in model.named_weights()], lr=ADAM["lr"], betas=tuple(ADAM["betas"]),
                            eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    losses = []
    for _ in range(ADAM["steps"]):
        opt.zero_grad()
        loss, _ = model(inputs, targets)
        losses.append(float(loss))
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(model(inputs, targets)[0]))
    with open(os.path.join(d, "ref.json"), "w") as f:
        json.dump({"adamw": ADAM, "losses": losses, "torch": torch.__version__, "device": DEVICE}, f, indent=2)


def main():
    global DEVICE
    args = sys.argv[1:]
    out = [a for a in args if not a.startswith("--")][:1]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--device" and i + 1 < len(args) and args[i + 1] in ("cpu", "cuda"):
            DEVICE = args[i + 1]
            i += 2
        elif a == "--adam-steps" and i + 1 < len(args) and args[i + 1].isdigit() and int(args[i + 1]) > 0:
            ADAM["steps"] = int(args[i + 1])
            i += 2
        elif not a.startswith("--") and [a] == out and i == args.index(a):
            i += 1
        else:
            sys.exit(__doc__)
    if len(out) != 1:
        sys.exit(__doc__)
    args = out
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gen_model_reference.py: --device cuda, but this PyTorch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 products
        torch.backends.cudnn.allow_tf32 = False
    sys.argv = [sys.argv[0]] + args
    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic sums
    for i, (name, (cfg, batch, seq)) in enumerate(sorted(CASES.items())):
        run_case(sys.argv[1], name, cfg, batch, seq, seed=1000 + i)
    with open(os.path.join(sys.argv[1], "cases.txt"), "w") as f:
        f.write("\n".join(sorted(CASES)) + "\n")


if __name__ == "__main__":
    main()
