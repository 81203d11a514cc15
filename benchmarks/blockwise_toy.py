"""Block-wise reconstruction against end-to-end distillation at the same wall-clock, on a toy Llama.

    python benchmarks/blockwise_toy.py --layers 4 --width 128 --budget 10x

A randomly initialised Llama (`kronc.tools.toy.tiny_llama`, weights given power-law spectra so they compress
as trained ones do) is compressed to ``--budget``; then, from the same compressed copy:

* ``blockwise``: `kronc.recover(method="blockwise")` (``--samples`` windows, ``--epochs`` per block);
* ``blockwise + norms``: then ``--e2e-steps`` of distillation training norms and biases only;
* ``distill``: today's end-to-end distillation (KL + hidden states, factors + norms + biases, constant
  lr) for exactly the seconds the block-wise run took (each ``--e2e-lr``).

Reports the output error against the dense model on held-out windows (relative squared error of the
logits per position, and KL at T=1 in nats per position, 64 windows) and tokens per second: per block step (one
block forward + backward) and per end-to-end step (teacher forward, student forward + backward). The
data is a random token stream, so only the error against the dense model means anything here.
Writes ``benchmarks/results/blockwise_toy.md``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kronc
from kronc.policies import Policy
from kronc.recover.losses import relative_mse
from kronc.tools.toy import tiny_llama, with_decaying_spectra


def errors(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        s, t = student(x).logits, teacher(x).logits
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
        return float(relative_mse(s, t)), float(kl)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--budget", default="10x")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--target", default="both", choices=("student_inputs", "teacher_stream", "both"))
    p.add_argument("--e2e-steps", type=int, default=30, help="steps of the norms+biases pass after block-wise")
    p.add_argument("--lr", type=float, default=3e-3, help="block-wise lr")
    p.add_argument("--e2e-lr", default="1e-4,3e-4,1e-3")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/blockwise_toy.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher = with_decaying_spectra(tiny_llama(a.layers, a.width, a.vocab))
    student = kronc.compile(teacher, policy=Policy(budget=a.budget))
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, a.vocab, (200_000,), generator=g)
    held = torch.randint(0, a.vocab, (64, a.seq_len), generator=g)
    common = {"seq_len": a.seq_len, "batch_size": a.batch, "progress": False}
    rows = [("compressed, no recovery", 0.0, *errors(student, teacher, held), "")]

    bw = copy.deepcopy(student)
    t0 = time.perf_counter()
    res = kronc.recover(bw, teacher, train, method="blockwise", **common,
                        blockwise={"samples": a.samples, "epochs": a.epochs, "lr": a.lr, "target": a.target})
    seconds = time.perf_counter() - t0
    per_block = sum(b.tokens for b in res.blocks) / sum(b.seconds for b in res.blocks)
    rows.append(("block-wise", seconds, *errors(bw, teacher, held),
                 f"{per_block:.0f} tok/s per block step ({len(res.blocks)} blocks, "
                 f"{sum(b.kept_initial for b in res.blocks)} kept)"))
    if a.e2e_steps:
        both = copy.deepcopy(bw)
        t1 = time.perf_counter()
        kronc.recover(both, teacher, train, steps=a.e2e_steps, lr=1e-3, trainable="norms+biases", **common)
        rows.append((f"block-wise + {a.e2e_steps} steps norms+biases", seconds + time.perf_counter() - t1,
                     *errors(both, teacher, held), "end-to-end pass lr 1e-3"))
    for lr in [float(x) for x in a.e2e_lr.split(",")]:
        e2e = copy.deepcopy(student)
        out = kronc.recover(e2e, teacher, train, steps=10**6, max_seconds=seconds, lr=lr, schedule="constant",
                            warmup=0.0, **common)
        rows.append((f"end-to-end distill, lr {lr:g}", out.seconds, *errors(e2e, teacher, held),
                     f"{out.tokens / out.seconds:.0f} tok/s per step, {out.steps} steps"))
    lines = [f"Toy Llama ({a.layers} layers, width {a.width}, vocab {a.vocab}) at {a.budget}, {a.threads} thread(s); "
             f"block-wise: {a.samples} windows x {a.seq_len} tokens, {a.epochs} epochs, lr {a.lr:g}, target {a.target}; "
             "end-to-end given the same seconds.", "",
             "| recovery | seconds | logits rel. MSE | KL (nats/pos) | speed |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {s:.1f} | {e:.4g} | {k:.4g} | {note} |" for n, s, e, k, note in rows]
    lines += ["", "per block: " + ", ".join(f"{b.name} {b.loss_before:.3g}->{b.loss_after:.3g}" for b in res.blocks)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
