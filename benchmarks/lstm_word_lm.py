"""Doped Kronecker on a word-level LSTM language model at 25x (the doped Kronecker paper's headline).

    python benchmarks/lstm_word_lm.py --recover-steps 200
    python benchmarks/lstm_word_lm.py --recover-steps 200 --only none --blockwise   # block-wise doped Kronecker only

1. Trains (once; cached in ``~/.cache/kronc/kjv-word-lstm``) a two-layer word-level LSTM LM on the
   King James text: 5,000-word vocabulary (the rest ``<unk>``), embedding and hidden 256, tied
   nothing. Every 10th block of 10,000 tokens is held out; training uses the rest.
2. Compresses the two LSTM layers (``weight_ih_l*``, ``weight_hh_l*``; embedding and decoder stay
   dense) 25x in stored bytes (values and sparse indices counted) three ways: doped Kronecker
   (kronc's ``lstm-25x`` policy), unstructured magnitude pruning and low rank (uniform, same bytes).
3. Recovers each for the same wall-clock budget with `kronc.recover` (distillation from the dense
   model plus the LM loss on the training text); doped Kronecker additionally with co-matrix dropout
   and overlay annealing (the paper's recipe), ablated without them; with ``--blockwise``, doped
   Kronecker also by block-wise reconstruction of the two LSTM layers (``--bw-*``), then
   ``--recover-steps`` end-to-end steps training scales, norms and biases (schemes column "blockwise").
4. Prints held-out perplexity before and after, the loss against dense, and writes
   ``benchmarks/results/lstm_word_lm.{md,json}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kronc
from kronc.formats import Factorized
from kronc.plan import Plan
from kronc.planning import uniform_plan
from kronc.policies.model import Scope
from kronc.recover.schemes import CoMatrixDropout, OverlayAnnealing, denser_plan
from kronc.tools.data import kjv_text
from kronc.tools.toy import LSTMLanguageModel
from kronc.tools.zoo import default_cache_root

RESULTS = Path(__file__).parent / "results"
VOCAB, EMBED, HIDDEN, LAYERS, BPTT, BATCH = 5000, 256, 256, 2, 35, 32
_WORD = re.compile(r"[a-z]+|[^\sa-z]|\n")


def kjv_tokens() -> tuple[Tensor, Tensor, list[str]]:
    """(train ids, held-out ids, vocabulary): lower-cased words and punctuation, top-5,000 vocabulary."""
    words = _WORD.findall(kjv_text().lower())  # a newline (end of passage) is a token too
    counts = collections.Counter(words)
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(VOCAB - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index.get(w, 0) for w in words], dtype=torch.long)
    block = 10_000
    blocks = ids[: len(ids) // block * block].reshape(-1, block)
    held = torch.arange(len(blocks)) % 10 == 9
    return blocks[~held].reshape(-1), blocks[held].reshape(-1), vocab


def batches(ids: Tensor, batch: int, bptt: int, seed: int) -> Tensor:
    """Random windows of ``bptt + 1`` tokens, shape ``(n, batch, bptt + 1)``, one epoch's worth."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) - bptt - 1, generator=g)[: (len(ids) // (bptt + 1)) // batch * batch]
    return torch.stack([ids[s : s + bptt + 1] for s in starts.tolist()]).reshape(-1, batch, bptt + 1)


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, bptt: int = 128, max_tokens: int = 100_000) -> float:
    """Held-out perplexity over non-overlapping windows (each window starts from a zero state)."""
    model.eval()
    n = min(len(ids) - 1, max_tokens) // bptt
    x = ids[: n * bptt + 1]
    inputs = x[:-1].reshape(n, bptt)
    targets = x[1:].reshape(n, bptt)
    nll = 0.0
    for s in range(0, n, 64):
        logits = model(inputs[s : s + 64])
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[s : s + 64].reshape(-1),
                                                 reduction="sum"))
    return math.exp(nll / (n * bptt))


def train_dense(train: Tensor, steps: int, seed: int = 0) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    model = LSTMLanguageModel(VOCAB, EMBED, HIDDEN, LAYERS, dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    step, epoch = 0, 0
    while step < steps:
        for chunk in batches(train, BATCH, BPTT, seed + epoch):
            if step >= steps:
                break
            model.train()
            logits = model(chunk[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            step += 1
            if step % 200 == 0:
                print(f"  dense step {step} loss {loss.item():.3f} ppl {math.exp(loss.item()):.1f}", flush=True)
        epoch += 1
    model.eval()
    return model


def load_or_train(train: Tensor, steps: int) -> LSTMLanguageModel:
    path = default_cache_root() / "kjv-word-lstm" / f"v{VOCAB}-e{EMBED}-h{HIDDEN}-l{LAYERS}-s{steps}.pt"
    model = LSTMLanguageModel(VOCAB, EMBED, HIDDEN, LAYERS, dropout=0.2)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # tensors only, never code
        return model.eval()
    print(f"training the dense LSTM LM for {steps} steps (cached afterwards in {path})", flush=True)
    t = time.perf_counter()
    model = train_dense(train, steps)
    print(f"  trained in {time.perf_counter() - t:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def lstm_policy() -> kronc.Policy:
    """kronc's shipped ``lstm-25x`` policy, restricted to the LSTM gate matrices."""
    return kronc.load_policy("lstm-25x").model_copy(update={"scope": Scope(kinds=["lstm"])})


def plans(dense: nn.Module) -> dict[str, Plan]:
    """The 25x plans compared: kronc's doped Kronecker plan and two uniform baselines at the same bytes."""
    example = (torch.zeros(1, BPTT, dtype=torch.long),)
    cap = kronc.capture(dense, example)
    sites = [s for s in cap.sites if s.kind == "lstm"]
    weights = {s.name: cap.weight(s) for s in sites}
    doped_only = kronc.Policy.model_validate({"budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
                                              "default_formats": [{"kind": "doped", "base": "kronecker"}]})
    return {
        "doped-kron": kronc.plan(cap, doped_only),
        "kronc-plan": kronc.plan(cap, lstm_policy()),
        "magnitude": uniform_plan(sites, weights, "doped", 25),
        "lowrank": uniform_plan(sites, weights, "lowrank", 25),
    }


def run(name: str, dense: nn.Module, plan: Plan, train: Tensor, held: Tensor, steps: int,
        schemes: str, recovery: str = "distill", bw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress with ``plan`` (denser first when annealing), measure, recover ``steps`` steps (``recovery``
    "blockwise": block-wise reconstruction of the two LSTM layers with ``bw`` settings, then ``steps``
    end-to-end steps training the factors' scales, norms and biases), measure."""
    anneal, cmr = "anneal" in schemes, "cmr" in schemes
    start = denser_plan(plan, 4.0) if anneal else plan
    example = (torch.zeros(1, BPTT, dtype=torch.long),)
    student = kronc.apply(dense, start, example_inputs=example)
    after = kronc.apply(dense, plan, example_inputs=example)  # what the plan gives without training
    row: dict[str, Any] = {
        "method": name, "schemes": schemes or "none", "plan_bytes": plan.bytes_after, "dense_bytes": plan.bytes_before,
        "ratio": plan.bytes_before / plan.bytes_after, "ppl_training_free": perplexity(after, held),
    }
    active: list[Any] = []
    if anneal:
        active.append(OverlayAnnealing(target_density=plan))
    if cmr:
        active.append(CoMatrixDropout(p=0.5))
    t = time.perf_counter()
    recipe = {"batch_size": BATCH, "seq_len": BPTT, "lr": 2e-3, "kd": 1.0, "hidden": 0.0, "lm": 1.0,
              "temperature": 1.0, "trainable": "factors+norms+biases", "progress": False,
              "log_every": max(1, steps // 10)}
    if recovery == "blockwise":
        row["schemes"] = "blockwise"
        result = kronc.recover(student, dense, train, method="blockwise", **recipe,
                               blockwise={**(bw or {}), "e2e_steps": steps})
    else:
        result = kronc.recover(student, dense, train, steps=steps, schemes=active, **recipe)
    row["recover_seconds"] = time.perf_counter() - t
    row["recover_steps"] = len(result.history)
    row["bytes_after_recovery"] = stored_bytes(student)
    row["ppl_recovered"] = perplexity(student, held)
    print(f"  {name:11s} [{row['schemes']:10s}] {row['ratio']:.1f}x  training-free ppl {row['ppl_training_free']:9.2f}"
          f"  recovered {row['ppl_recovered']:8.2f}  ({row['recover_seconds']:.0f} s, {row['recover_steps']} steps)",
          flush=True)
    return row


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the outermost compressed weights (a doped weight's base is counted once, inside it)."""
    outer = {name: m for name, m in model.named_modules() if isinstance(m, Factorized)}
    return sum(m.nbytes() for name, m in outer.items()
               if not any(name.startswith(o + ".") for o in outer if o != name))


def render(record: dict[str, Any], command: str) -> str:
    dense = record["dense_ppl"]
    lines = [
        "# Word-level LSTM LM on the King James text: LSTM layers 25x smaller", "",
        f"Command: `{command}`", "",
        f"Model: 2-layer LSTM, embedding/hidden {EMBED}/{HIDDEN}, vocabulary {VOCAB:,}, trained here "
        f"({record['train_steps']} steps of {BATCH}x{BPTT} tokens). Held-out text: every 10th block of 10,000 KJV "
        f"tokens ({record['held_tokens']:,} tokens; perplexity over the first 100,000 in windows of 128). Recovery: "
        f"distillation (KL, T=1) + next-token loss on the training blocks, {record['recover_steps']} steps of "
        f"{BATCH}x{BPTT} tokens per method. Bytes count values and sparse indices of the LSTM gate matrices.", "",
        f"Dense held-out perplexity: **{dense:.2f}**", "",
        "| method | training schemes | ratio | ppl training-free | ppl recovered | loss vs dense | recovery time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['method']} | {r['schemes']} | {r['ratio']:.1f}x | {r['ppl_training_free']:.2f} | "
                     f"{r['ppl_recovered']:.2f} | {100 * (r['ppl_recovered'] / dense - 1):+.1f}% | "
                     f"{r['recover_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=2500, help="dense training steps of 32x35 tokens (first run)")
    ap.add_argument("--recover-steps", type=int, default=300, help="recovery steps per method (same for all)")
    ap.add_argument("--only", default="", help="comma-separated methods to run (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blockwise", action="store_true",
                    help="also doped-kron with block-wise reconstruction, then --recover-steps e2e steps")
    ap.add_argument("--bw-samples", type=int, default=256, help="blockwise: calibration windows of 35 tokens")
    ap.add_argument("--bw-epochs", type=int, default=20, help="blockwise: passes over them per layer")
    ap.add_argument("--bw-lr", type=float, default=2e-3, help="blockwise: AdamW lr per layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, held, vocab = kjv_tokens()
    print(f"KJV words: {len(train):,} train tokens, {len(held):,} held-out tokens, vocabulary {len(vocab):,}", flush=True)
    dense = load_or_train(train, args.train_steps)
    ppl = perplexity(dense, held)
    print(f"dense held-out perplexity {ppl:.2f}", flush=True)
    record: dict[str, Any] = {"dense_ppl": ppl, "train_steps": args.train_steps, "held_tokens": len(held),
                              "recover_steps": args.recover_steps, "runs": []}
    table = plans(dense)
    for name in ("doped-kron", "kronc-plan"):
        print(f"{name}:\n{table[name].table()}", flush=True)
    runs = [("doped-kron", "anneal+cmr"), ("doped-kron", ""), ("kronc-plan", "anneal+cmr"), ("magnitude", ""),
            ("lowrank", "")]
    for name, schemes in runs:
        if args.only and name not in args.only.split(","):
            continue
        record["runs"].append(run(name, dense, table[name], train, held, args.recover_steps, schemes))
    if args.blockwise:
        bw = {"samples": args.bw_samples, "epochs": args.bw_epochs, "lr": args.bw_lr}
        record["runs"].append(run("doped-kron", dense, table["doped-kron"], train, held, args.recover_steps, "",
                                  "blockwise", bw))
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/lstm_word_lm.py " + " ".join(sys.argv[1:])
    (RESULTS / "lstm_word_lm.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "lstm_word_lm.md").write_text(render(record, command.strip()))
    print(render(record, command.strip()))


if __name__ == "__main__":
    main()
