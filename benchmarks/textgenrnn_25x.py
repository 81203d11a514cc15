"""The pretrained textgenrnn character LSTM with its LSTM weights 25x smaller (doped Kronecker paper, case 1).

    python benchmarks/textgenrnn_25x.py --recover-steps 300

textgenrnn (Max Woolf's pretrained char LM, shipped in its PyPI package; see ../shared/DATA.md) has
two 128-unit LSTMs. Their four gate matrices (``rnn_*.weight_ih_l0``, ``rnn_*.weight_hh_l0``) are
compressed 25x in stored bytes (values and sparse indices counted) with kronc's ``lstm-25x``
policy (doped Kronecker), and, for comparison, with uniform magnitude pruning and uniform low rank at
the same bytes. Each is then recovered for the same number of steps by distillation from the dense
model on King James text (40-character contexts, the model's own), doped Kronecker with overlay
annealing and co-matrix dropout. Quality: bits per character on the ABC news text (first
``--eval-chars`` scored characters). Writes ``benchmarks/results/textgenrnn_25x.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronc
from kronc.plan import Plan
from kronc.planning import uniform_plan
from kronc.policies.model import Scope
from kronc.recover.schemes import CoMatrixDropout, OverlayAnnealing, denser_plan
from kronc.tools.data import abc_news_text, kjv_text
from kronc.tools.evaluate import bits_per_char, char_windows, encode_chars
from kronc.tools.models.textgenrnn import CONTEXT
from kronc.tools.zoo import load_textgenrnn

RESULTS = Path(__file__).parent / "results"
BATCH = 64


class CharBatches:
    """Random ``(BATCH, 40)`` context windows of the King James text (the distillation data), seeded."""

    def __init__(self, vocab: dict[str, int], steps: int, seed: int = 0) -> None:
        ids, _ = encode_chars(vocab, kjv_text(max_chars=2_000_000))
        self.windows = char_windows(ids, CONTEXT)
        self.steps, self.seed = steps, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield self.windows[torch.randint(CONTEXT, len(self.windows), (BATCH,), generator=g)]


def plans(dense: nn.Module) -> dict[str, Plan]:
    example = (torch.zeros(1, CONTEXT, dtype=torch.long),)
    cap = kronc.capture(dense, example)
    sites = [s for s in cap.sites if s.kind == "lstm"]
    weights = {s.name: cap.weight(s) for s in sites}
    policy = kronc.load_policy("lstm-25x").model_copy(update={"scope": Scope(kinds=["lstm"])})
    doped_only = kronc.Policy.model_validate({"budget": "25x", "objective": "weight", "scope": {"kinds": ["lstm"]},
                                              "default_formats": [{"kind": "doped", "base": "kronecker"}]})
    return {
        "doped-kron": kronc.plan(cap, doped_only),
        "kronc-plan": kronc.plan(cap, policy),
        "magnitude": uniform_plan(sites, weights, "doped", 25),
        "lowrank": uniform_plan(sites, weights, "lowrank", 25),
    }


def run(name: str, dense: nn.Module, vocab: dict[str, int], plan: Plan, steps: int, schemes: str, eval_text: str,
        eval_chars: int) -> dict[str, Any]:
    anneal, cmr = "anneal" in schemes, "cmr" in schemes
    example = (torch.zeros(1, CONTEXT, dtype=torch.long),)
    student = kronc.apply(dense, denser_plan(plan, 4.0) if anneal else plan, example_inputs=example)
    plain = kronc.apply(dense, plan, example_inputs=example)
    row: dict[str, Any] = {"method": name, "schemes": schemes or "none", "ratio": plan.bytes_before / plan.bytes_after,
                           "bpc_training_free": bits_per_char(plain, vocab, eval_text, max_chars=eval_chars)}
    active: list[Any] = []
    if anneal:
        active.append(OverlayAnnealing(target_density=plan))
    if cmr:
        active.append(CoMatrixDropout(p=0.5))
    t = time.perf_counter()
    result = kronc.recover(student, dense, CharBatches(vocab, steps), steps=steps, lr=3e-3, kd=1.0, hidden=0.0,
                           lm=0.0, temperature=1.0, trainable="factors", schemes=active, progress=False,
                           log_every=max(1, steps // 10))
    row["recover_seconds"] = time.perf_counter() - t
    row["recover_steps"] = len(result.history)
    row["bpc_recovered"] = bits_per_char(student, vocab, eval_text, max_chars=eval_chars)
    print(f"  {name:11s} [{row['schemes']:10s}] {row['ratio']:.1f}x  bpc training-free {row['bpc_training_free']:.3f}"
          f"  recovered {row['bpc_recovered']:.3f}  ({row['recover_seconds']:.0f} s)", flush=True)
    return row


def render(record: dict[str, Any], command: str) -> str:
    dense = record["dense_bpc"]
    lines = [
        "# textgenrnn (pretrained char LSTM): LSTM weights 25x smaller", "",
        f"Command: `{command}`", "",
        f"Evaluation: bits per character on the first {record['eval_chars']:,} scored characters of the ABC news "
        f"text (40-character contexts). Recovery: {record['recover_steps']} steps of {BATCH} King James contexts, "
        "logit distillation from the dense model (T=1), factors only. Bytes: the four LSTM gate matrices, values "
        "and sparse indices counted.", "",
        f"Dense: **{dense:.3f}** bits/char", "",
        "| method | training schemes | ratio | bpc training-free | bpc recovered | loss vs dense | recovery time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['method']} | {r['schemes']} | {r['ratio']:.1f}x | {r['bpc_training_free']:.3f} | "
                     f"{r['bpc_recovered']:.3f} | {100 * (r['bpc_recovered'] / dense - 1):+.1f}% | "
                     f"{r['recover_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--eval-chars", type=int, default=10_000)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, vocab = load_textgenrnn()
    text = abc_news_text()
    record: dict[str, Any] = {"dense_bpc": bits_per_char(dense, vocab, text, max_chars=args.eval_chars),
                              "eval_chars": args.eval_chars, "recover_steps": args.recover_steps, "runs": []}
    print(f"dense bits/char {record['dense_bpc']:.3f}", flush=True)
    table = plans(dense)
    for name in ("doped-kron", "kronc-plan"):
        print(f"{name}:\n{table[name].table()}", flush=True)
    runs = [("doped-kron", "anneal+cmr"), ("doped-kron", ""), ("kronc-plan", "anneal+cmr"), ("magnitude", ""),
            ("lowrank", "")]
    for name, schemes in runs:
        if args.only and name not in args.only.split(","):
            continue
        record["runs"].append(run(name, dense, vocab, table[name], args.recover_steps, schemes, text, args.eval_chars))
    command = ("python benchmarks/textgenrnn_25x.py " + " ".join(sys.argv[1:])).strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "textgenrnn_25x.json").write_text(json.dumps(record, indent=2))
    (RESULTS / "textgenrnn_25x.md").write_text(render(record, command))
    print(render(record, command))


if __name__ == "__main__":
    main()
