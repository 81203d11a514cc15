"""Compress a small randomly initialised Llama 4x and show what happened (runs in seconds, no downloads)."""

import torch

import kronc
from kronc.tools.toy import tiny_llama

torch.manual_seed(0)
model = tiny_llama(layers=2, width=128)
ids = torch.randint(0, 128, (1, 16))

small, report = kronc.compile(model, budget="4x", report=True)   # capture -> plan -> rewrite
print(report)                                                     # one line per site: format, bytes, error

with torch.no_grad():
    dense, comp = model(ids).logits, small(ids).logits
print(f"relative logit error: {(comp - dense).norm() / dense.norm():.3f}")
print("generate:", small.generate(ids[:, :4], max_new_tokens=8, do_sample=False).tolist())
