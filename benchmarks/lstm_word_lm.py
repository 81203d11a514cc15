"""Doped Kronecker on a word-level LSTM language model at 25x (the doped Kronecker paper's headline).

    python benchmarks/lstm_word_lm.py --recover-steps 200
    python benchmarks/lstm_word_lm.py --recover-steps 200 --only doped-kron:blockwise   # block-wise doped Kronecker only
    python benchmarks/lstm_word_lm.py --minutes 10 --marks 4 --only doped-kron:none --append --threads 1
    python benchmarks/lstm_word_lm.py --minutes 10 --marks 4 --only doped-kron:blockwise --append --threads 1

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

With ``--minutes M`` every run gets the same wall-clock budget instead of the same steps: a few timed steps
on a copy of the student set the step count (so the cosine schedule and the overlay annealing end when the
time does), perplexity is measured ``--marks`` times along the run (evaluation time not counted), and
``benchmarks/results/lstm_word_lm.png`` plots perplexity against minutes. ``--only`` picks runs as
``method:schemes`` (``doped-kron:anneal+cmr``, ``doped-kron:none``, ``doped-kron:blockwise``,
``kronc-mixed:none``, ...) or whole methods; ``--append`` adds the runs to the existing results instead of
replacing them (each row keeps its own command), so runs of at most ~15 minutes each build one table.
Block-wise runs spend ``--block-share`` of the minutes reconstructing the two LSTM layers (and the decoder
after them, the tail), then the rest distilling end to end, training ``--bw-e2e-trainable``.
The ``kronc-mixed`` plan lets the planner mix formats and precisions at 25x (`mixed_policy`); ``doped-kron-q`` is
doped Kronecker whose factors may be int8 or int4 (up to 8 Kronecker terms for the bytes).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
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
from kronc.recover.schemes import denser_plan
from kronc.tools.data import kjv_text
from kronc.tools.toy import LSTMLanguageModel
from kronc.tools.zoo import default_cache_root

sys.path.insert(0, str(Path(__file__).parent))
from timed_recovery import Clock, Marks, make_schemes, mark_steps, plot_curves, steps_for  # noqa: E402  (benchmarks/timed_recovery.py)

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


def mixed_policy() -> kronc.Policy:
    """25x with formats and precisions mixed: the ``lstm-25x`` families plus low rank and Kronecker with int8 or
    int4 factors (more rank or terms for the bytes) and quantized dense, the planner choosing per matrix."""
    quant = ["keep", {"dtype": "int8"}, {"dtype": "int4", "group_size": 32}]
    return kronc.Policy.model_validate({
        "budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
        "default_formats": [{"kind": "doped", "base": "kronecker", "terms_max": 2, "density_max": 0.05},
                            {"kind": "kronecker", "terms_max": 8, "precisions": quant},
                            {"kind": "lowrank", "precisions": quant}, {"kind": "dense"}]})


def plans(dense: nn.Module) -> dict[str, Plan]:
    """The 25x plans compared: kronc's doped Kronecker plan and two uniform baselines at the same bytes."""
    example = (torch.zeros(1, BPTT, dtype=torch.long),)
    cap = kronc.capture(dense, example)
    sites = [s for s in cap.sites if s.kind == "lstm"]
    weights = {s.name: cap.weight(s) for s in sites}
    doped_only = kronc.Policy.model_validate({"budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
                                              "default_formats": [{"kind": "doped", "base": "kronecker"}]})
    quant = ["keep", {"dtype": "int8"}, {"dtype": "int4", "group_size": 32}]
    doped_quant = kronc.Policy.model_validate({"budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
                                               "default_formats": [{"kind": "doped", "base": "kronecker", "terms_max": 8,
                                                                    "precisions": quant}]})
    return {
        "doped-kron": kronc.plan(cap, doped_only),
        "doped-kron-q": kronc.plan(cap, doped_quant),
        "kronc-plan": kronc.plan(cap, lstm_policy()),
        "kronc-mixed": kronc.plan(cap, mixed_policy()),
        "magnitude": uniform_plan(sites, weights, "doped", 25),
        "lowrank": uniform_plan(sites, weights, "lowrank", 25),
    }


def run(name: str, dense: nn.Module, plan: Plan, train: Tensor, held: Tensor, steps: int,
        schemes: str, recovery: str = "distill", bw: dict[str, Any] | None = None, minutes: float = 0.0,
        marks: int = 1, lr: float = 2e-3, temperature: float = 1.0) -> dict[str, Any]:
    """Compress with ``plan`` (denser first when annealing), measure, recover, measure.

    ``minutes`` 0: ``steps`` steps; else that wall-clock budget, the steps set by timing a few (`steps_for`),
    with perplexity at ``marks`` points along the way. ``recovery`` "blockwise": block-wise reconstruction of the
    two LSTM layers and the decoder with ``bw`` settings (for ``bw["share"]`` of the minutes), then end-to-end
    steps training ``bw["e2e_trainable"]``."""
    anneal = "anneal" in schemes
    start = denser_plan(plan, 4.0) if anneal else plan

    def ppl(model: nn.Module) -> float:
        return perplexity(model, held)

    example = (torch.zeros(1, BPTT, dtype=torch.long),)
    student = kronc.apply(dense, start, example_inputs=example)
    after = kronc.apply(dense, plan, example_inputs=example)  # what the plan gives without training
    row: dict[str, Any] = {
        "method": name, "schemes": "blockwise" if recovery == "blockwise" else (schemes or "none"),
        "plan_bytes": plan.bytes_after, "dense_bytes": plan.bytes_before, "lr": lr, "temperature": temperature,
        "ratio": plan.bytes_before / plan.bytes_after, "ppl_training_free": perplexity(after, held),
        "formats": sorted({d.spec.describe() for d in plan.decisions}), "minutes_budget": minutes,
    }
    recipe = {"batch_size": BATCH, "seq_len": BPTT, "lr": lr, "kd": 1.0, "hidden": 0.0, "lm": 1.0,
              "temperature": temperature, "trainable": "factors+norms+biases", "progress": False,
              "train_mode": bool(make_schemes(schemes, plan)), "log_every": 50}
    t = time.perf_counter()
    curve = [{"seconds": 0.0, "steps": 0, "phase": "start", "value": perplexity(student, held)}]
    eval_seconds = time.perf_counter() - t
    clock = Clock()
    budget = minutes * 60
    if recovery == "blockwise":
        bw = dict(bw or {})
        e2e_trainable = bw.pop("e2e_trainable", "scales+norms+biases")
        share = bw.pop("share", 0.5)
        if budget:
            bw["max_seconds"] = share * budget
        res = kronc.recover(student, dense, train, method="blockwise", **recipe, blockwise={**bw, "e2e_steps": 0})
        row["blocks"] = [{"name": b.name, "loss_before": b.loss_before, "loss_after": b.loss_after, "steps": b.steps,
                          "kept_initial": b.kept_initial} for b in res.blocks]
        print(f"  {res}", flush=True)
        curve.append(clock.mark(student, ppl, sum(b.steps for b in res.blocks), "blocks"))
        recipe["trainable"] = e2e_trainable
        row["e2e_trainable"] = e2e_trainable
    left, probe = budget - clock.seconds(), time.perf_counter()
    n = steps_for(left, student, dense, lambda _: train, recipe, lambda: make_schemes(schemes, plan)) if budget else steps
    clock.pause(probe)  # timing the steps is not training
    marker = Marks(ppl, mark_steps(n, marks), clock)
    if budget:  # the machine is shared: a step can take longer than the probe's; never more than a quarter over
        recipe["max_seconds"] = 1.25 * left + marks * eval_seconds
    result = kronc.recover(student, dense, train, steps=n, schemes=[*make_schemes(schemes, plan), marker], **recipe)
    seconds = clock.seconds()
    curve += marker.curve
    row["recover_seconds"] = seconds
    row["recover_steps"] = len(result.history)
    row["bytes_after_recovery"] = stored_bytes(student)
    row["ppl_recovered"] = perplexity(student, held)
    curve.append({"seconds": seconds, "steps": len(result.history), "phase": "end", "value": row["ppl_recovered"]})
    row["curve"] = curve
    print(f"  {name:11s} [{row['schemes']:10s}] {row['ratio']:.1f}x  training-free ppl {row['ppl_training_free']:9.2f}"
          f"  recovered {row['ppl_recovered']:8.2f}  ({row['recover_seconds']:.0f} s, {row['recover_steps']} steps)",
          flush=True)
    return row


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the outermost compressed weights (a doped weight's base is counted once, inside it)."""
    outer = {name: m for name, m in model.named_modules() if isinstance(m, Factorized)}
    return sum(m.nbytes() for name, m in outer.items()
               if not any(name.startswith(o + ".") for o in outer if o != name))


def render(record: dict[str, Any], png: str | None = None) -> str:
    dense = record["dense_ppl"]
    lines = [
        "# Word-level LSTM LM on the King James text: LSTM layers 25x smaller", "",
        f"Model: 2-layer LSTM, embedding/hidden {EMBED}/{HIDDEN}, vocabulary {VOCAB:,}, trained here "
        f"({record['train_steps']} steps of {BATCH}x{BPTT} tokens). Held-out text: every 10th block of 10,000 KJV "
        f"tokens ({record['held_tokens']:,} tokens; perplexity over the first 100,000 in windows of 128). Recovery: "
        f"distillation (KL at the row's T) + next-token loss on the training blocks, {BATCH}x{BPTT} tokens per "
        "step, AdamW at the row's lr with warmup and cosine decay; block-wise rows first reconstruct the two LSTM "
        "layers and the decoder one at a time (`kronc.recover(method=\"blockwise\")`), then distil end to end "
        "for the rest of the time. Bytes count values and sparse indices of the LSTM gate matrices. Minutes are "
        "wall-clock training time on this 2-core machine, shared with other jobs (load average in the last "
        "column), evaluation not counted.", "",
        f"Dense held-out perplexity: **{dense:.2f}** (10% above: {1.1 * dense:.2f})", "",
        "| method | training | lr, T | ratio | ppl training-free | ppl recovered | loss vs dense | steps | "
        "recovery time | command (load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['method']} | {r['schemes']}{' (' + r['e2e_trainable'] + ' e2e)' if 'e2e_trainable' in r else ''} "
                     f"| {r.get('lr', 2e-3):g}, {r.get('temperature', 1.0):g} | {r['ratio']:.1f}x "
                     f"| {r['ppl_training_free']:.2f} | {r['ppl_recovered']:.2f} "
                     f"| {100 * (r['ppl_recovered'] / dense - 1):+.1f}% | {r['recover_steps']} "
                     f"| {r['recover_seconds'] / 60:.1f} min | `{r.get('command', record.get('command', ''))}` "
                     f"({r.get('load', '?')}) |")
    curves = [r for r in record["runs"] if len(r.get("curve", [])) > 2]
    if curves:
        lines += ["", "Perplexity along each timed run (minutes trained, steps; `blocks`: after the block phase):", ""]
        for r in curves:
            points = ", ".join(f"{c['value']:.1f} ({c['seconds'] / 60:.1f} min, {c['steps']}{' blocks' if c['phase'] == 'blocks' else ''})"
                               for c in r["curve"])
            lines.append(f"- {r['method']} [{r['schemes']}]: {points}")
    if png and curves:
        lines += ["", f"![perplexity against recovery minutes]({png})"]
    if record.get("notes"):  # findings written into the JSON by hand after the runs (rendered as they are)
        lines += ["", "## Notes", "", *record["notes"]]
    return "\n".join(lines) + "\n"


def selected(only: str, name: str, schemes: str) -> bool:
    """Whether ``--only`` picks the run ``name`` with ``schemes`` (as ``method`` or ``method:schemes``)."""
    if not only:
        return True
    picks = only.split(",")
    return name in picks or f"{name}:{schemes or 'none'}" in picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=2500, help="dense training steps of 32x35 tokens (first run)")
    ap.add_argument("--recover-steps", type=int, default=300, help="recovery steps per method (same for all)")
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget per run instead of --recover-steps")
    ap.add_argument("--marks", type=int, default=4, help="with --minutes: perplexity measurements along each run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--only", default="", help="comma-separated methods or method:schemes to run (default: all)")
    ap.add_argument("--append", action="store_true", help="add the runs to the existing results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blockwise", action="store_true",
                    help="also doped-kron with block-wise reconstruction (same as --only doped-kron:blockwise)")
    ap.add_argument("--bw-samples", type=int, default=256, help="blockwise: calibration windows of 35 tokens")
    ap.add_argument("--bw-epochs", type=int, default=20, help="blockwise: passes over them per layer")
    ap.add_argument("--bw-lr", type=float, default=2e-3, help="blockwise: AdamW lr per layer")
    ap.add_argument("--block-share", type=float, default=0.5, help="blockwise with --minutes: share of the block phase")
    ap.add_argument("--bw-e2e-trainable", default="scales+norms+biases",
                    help="blockwise: what the end-to-end pass trains (scales+norms+biases, factors+norms+biases)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = ap.parse_args()
    if args.render:
        write(json.loads((RESULTS / "lstm_word_lm.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    train, held, vocab = kjv_tokens()
    print(f"KJV words: {len(train):,} train tokens, {len(held):,} held-out tokens, vocabulary {len(vocab):,}", flush=True)
    dense = load_or_train(train, args.train_steps)
    ppl = perplexity(dense, held)
    print(f"dense held-out perplexity {ppl:.2f}", flush=True)
    command = ("python benchmarks/lstm_word_lm.py " + " ".join(sys.argv[1:])).strip()
    path = RESULTS / "lstm_word_lm.json"
    record: dict[str, Any] = {"dense_ppl": ppl, "train_steps": args.train_steps, "held_tokens": len(held), "runs": []}
    if args.append and path.is_file():
        record["runs"] = json.loads(path.read_text())["runs"]
    table = plans(dense)
    for name in ("doped-kron", "doped-kron-q", "kronc-plan", "kronc-mixed"):
        print(f"{name}:\n{table[name].table()}", flush=True)
    runs = [("doped-kron", "anneal+cmr"), ("doped-kron", ""), ("doped-kron-q", ""), ("kronc-plan", "anneal+cmr"),
            ("kronc-mixed", ""), ("magnitude", ""), ("lowrank", ""), ("doped-kron", "blockwise")]
    bw = {"samples": args.bw_samples, "epochs": args.bw_epochs, "lr": args.bw_lr, "share": args.block_share,
          "e2e_trainable": args.bw_e2e_trainable}
    for name, schemes in runs:
        blockwise = schemes == "blockwise"  # only when asked for: --blockwise or --only doped-kron:blockwise
        chosen = (f"{name}:blockwise" in args.only.split(",") or (args.blockwise and selected(args.only, name, ""))
                  if blockwise else selected(args.only, name, schemes))
        if not chosen:
            continue
        print(f"{name} [{schemes or 'none'}]", flush=True)
        row = run(name, dense, table[name], train, held, args.recover_steps, "" if blockwise else schemes,
                  "blockwise" if blockwise else "distill", bw, args.minutes, args.marks, args.lr, args.temperature)
        row["command"] = command
        row["load"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        record["runs"].append(row)
        write(record)
    print(render(record))


def write(record: dict[str, Any]) -> None:
    """The JSON, the markdown and the plot (after every run: a cut-short benchmark keeps what it measured)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lstm_word_lm.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "lstm_word_lm.md").write_text(render(record, "lstm_word_lm.png"))
    plot_curves(record["runs"], record["dense_ppl"], RESULTS / "lstm_word_lm.png", "held-out KJV perplexity",
                "Word-LSTM, LSTM layers 25x smaller: perplexity against recovery time")


if __name__ == "__main__":
    main()
