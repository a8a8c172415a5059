#!/usr/bin/env python3
"""The PyTorch baseline zinf is measured against: FSDP2 with CPU offload on one GPU.

transformers' LlamaForCausalLM at the given shape, each decoder layer and the root wrapped with
`fully_shard` (FSDP2) under `CPUOffloadPolicy(pin_memory=True)` and a bf16 `MixedPrecisionPolicy`
(fp32 reduction), activation checkpointing on every layer, and PyTorch's fused CPU AdamW on the
offloaded fp32 parameters. Random tokens; tokens/s and model TFLOP/s from the steps after warm-up.

Needs PyTorch >= 2.6 with CUDA, and transformers (the GPU machine's python3 has both).
Usage: fsdp2_cpu_offload.py [--hidden 3072 --layers 26 --intermediate 8192 --heads 24 --kv-heads 24
                             --vocab 32000 --micro-batch 4 --seq 2048 --steps 6 --warmup 2] [--json]
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)

    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=a.intermediate,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=max(4096, a.seq), tie_word_embeddings=False, use_cache=False)
    t0 = time.time()
    model = LlamaForCausalLM(cfg)  # fp32 on the CPU
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    off = CPUOffloadPolicy(pin_memory=True)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp, offload_policy=off)
    fully_shard(model, mp_policy=mp, offload_policy=off)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    setup = time.time() - t0

    g = torch.Generator(device="cuda").manual_seed(1)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        x = torch.randint(0, a.vocab, (a.micro_batch, a.seq), device="cuda", generator=g)
        torch.cuda.synchronize()
        s = time.time()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.time() - s)
        losses.append(float(loss.detach()))
    tokens = a.micro_batch * a.seq
    step_s = sorted(times)[len(times) // 2]
    emb = a.vocab * a.hidden
    flops_per_token = 6 * (params - emb) + 12 * a.layers * a.seq * a.hidden
    out = {"baseline": "fsdp2_cpu_offload", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "parameters": params, "micro_batch": a.micro_batch, "seq": a.seq, "steps": a.steps, "warmup": a.warmup,
           "step_seconds_median": step_s, "tokens_per_s": tokens / step_s,
           "model_tflops": tokens / step_s * flops_per_token / 1e12, "setup_seconds": setup, "losses": losses,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"FSDP2 CPU offload: {params / 1e9:.2f}B params, {step_s:.3f} s/step, {out['tokens_per_s']:.0f} tokens/s, "
              f"{out['model_tflops']:.1f} model TFLOP/s, peak GPU {out['peak_gpu_bytes'] / 2**30:.1f} GiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
