#!/usr/bin/env python3
# Loads a `zinf ckpt export` directory with Hugging Face transformers (LlamaForCausalLM) and
# recomputes the eval loss `zinf train` reported for the embedded default, on the same held-out
# samples: the last 5% of 256-token samples of the corpus, the first 64 of them (8 micro-batches
# of 8). Usage: check_hf_export.py EXPORT_DIR CORPUS.txt EXPECTED_EVAL_LOSS [TOLERANCE]
# Needs torch and transformers (the GPU machine's python3); prints both losses, exits 1 on a
# mismatch.
import sys

import torch
from transformers import LlamaForCausalLM

export, corpus, expected = sys.argv[1], sys.argv[2], float(sys.argv[3])
tol = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
seq = 256
data = torch.tensor(list(open(corpus, "rb").read()), dtype=torch.long)
total = (len(data) - 1) // seq
n_eval = max(1, round(total * 0.05))
train = total - n_eval
samples = list(range(train, train + min(64, n_eval)))
model = LlamaForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
model.eval()
losses = []
with torch.no_grad():
    for i in range(0, len(samples), 8):
        idx = samples[i:i + 8]
        x = torch.stack([data[s * seq:s * seq + seq] for s in idx])
        y = torch.stack([data[s * seq + 1:s * seq + seq + 1] for s in idx])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        losses.append((loss.item(), len(idx)))
got = sum(l * n for l, n in losses) / sum(n for _, n in losses)
print(f"transformers eval loss {got:.4f}, zinf reported {expected:.4f}, |diff| {abs(got - expected):.4f} (tolerance {tol})")
sys.exit(0 if abs(got - expected) <= tol else 1)
