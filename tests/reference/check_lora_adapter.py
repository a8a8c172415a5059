#!/usr/bin/env python3
"""Checks zinf's LoRA outputs with the PyTorch reference (tests/unit/trainer_test.cpp runs it).

Usage: check_lora_adapter.py BASE_DIR ADAPTER_DIR MERGED_DIR CHECK_DIR
  BASE_DIR     config.json + model.safetensors (the frozen base)
  ADAPTER_DIR  adapter_model.safetensors + adapter_config.json, PEFT's format, as zinf saved them
  MERGED_DIR   `zinf ckpt merge`'s output (config.json + model.safetensors)
  CHECK_DIR    batch.safetensors (tokens, targets) and zinf.json {"loss": zinf's eval loss with the adapters}
The reference's own LoRA (gen_lora_reference.py) reads the PEFT files by their names; its loss must
be zinf's, and the merged model's loss in the plain reference model must be the same. Exit 0 when
both agree, 1 when not, 77 when PyTorch is missing (the caller skips). Needs torch and numpy.
"""
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    import torch
except ImportError:
    print("check_lora_adapter.py: no torch/numpy for %s" % sys.executable)
    sys.exit(77)
import gen_model_reference as ref  # noqa: E402
import gen_lora_reference as lora  # noqa: E402


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        b, e = h["data_offsets"]
        raw = np.frombuffer(data[b:e], dtype={"F32": np.float32, "BF16": np.uint16, "I32": np.int32}[h["dtype"]])
        if h["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = torch.from_numpy(raw.copy()).reshape(h["shape"])
    return out


def load_plain(model, weights):
    with torch.no_grad():
        for name, p in model.named_weights():
            p.copy_(weights[name])


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    base_dir, adapter_dir, merged_dir, check_dir = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    acfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["task_type"] == "CAUSAL_LM", acfg
    batch = read_safetensors(os.path.join(check_dir, "batch.safetensors"))
    tokens, targets = batch["tokens"], batch["targets"]
    want = json.load(open(os.path.join(check_dir, "zinf.json")))["loss"]

    model = ref.CausalLM(cfg)
    load_plain(model, read_safetensors(os.path.join(base_dir, "model.safetensors")))
    adapters = lora.attach(model, cfg, acfg["r"], acfg["lora_alpha"], 0.0, acfg["target_modules"], acfg["use_rslora"])
    peft = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with torch.no_grad():
        for mod, lin in adapters:
            lin.lora_A.copy_(peft.pop("base_model.model.%s.lora_A.weight" % mod))
            lin.lora_B.copy_(peft.pop("base_model.model.%s.lora_B.weight" % mod))
        assert not peft, "tensors with no place: %s" % sorted(peft)[:4]
        got = float(model(tokens, targets)[0])
    merged = ref.CausalLM(cfg)
    load_plain(merged, read_safetensors(os.path.join(merged_dir, "model.safetensors")))
    with torch.no_grad():
        got_merged = float(merged(tokens, targets)[0])
    print("zinf %.7f  reference LoRA %.7f  reference merged %.7f" % (want, got, got_merged))
    ok = abs(got - want) <= 2e-5 * abs(want) and abs(got_merged - want) <= 2e-5 * abs(want)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
